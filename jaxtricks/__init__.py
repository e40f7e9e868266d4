"""jaxtricks: recent language-model tricks as pure JAX functions with thin Flax modules."""

__version__ = "0.1.0"
