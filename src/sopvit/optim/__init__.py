"""Optimisation rules shared by pre-training and evaluation: the schedule functions and the parameter
groups (one no-decay rule, layer-wise decay), the optimizer and per-parameter clipping."""
