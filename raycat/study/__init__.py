"""Studies: a grid of ordinary runs over a base config (grid.py), the comparison across them
(comparison.py, analyses.py, plot.py) and what a run will cost before it runs (costs.py).
"""
