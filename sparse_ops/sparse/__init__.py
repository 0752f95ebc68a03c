"""SparseLinear (one layer per format), the measured format choice, stacked Q/K/V, export and save/load."""
