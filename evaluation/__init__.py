"""Statistics on predictions: bootstrap confidence intervals (and, to come, comparisons and fairness)."""
