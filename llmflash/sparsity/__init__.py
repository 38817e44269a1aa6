"""Sparsity: calibration statistics, low-rank predictors, sparse FFN execution, evaluation, relufication.

See docs/SPARSITY.md.
"""
