"""Privacy machinery beyond what Opacus ships: a faster exact per-sample clipping path (book-keeping)."""
