"""Thin flax.linen modules over jaxtricks.ops: parameters with logical axis names, and shapes."""
