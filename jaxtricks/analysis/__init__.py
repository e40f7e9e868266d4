"""Analyses of trained models: layer linearity and linear replacement of blocks."""
