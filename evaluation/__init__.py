"""Statistics on predictions: bootstrap intervals, paired comparisons, fairness, sweeps, transfer, and their reports."""
