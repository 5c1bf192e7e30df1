"""Tools over the two halves: hyper-parameter sweeps, reports and plots, the demo.
"""
