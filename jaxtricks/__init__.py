"""jaxtricks: recent language-model tricks as pure JAX functions with thin Flax modules."""

from jaxtricks.cpu_threads import reserve_collective_threads

__version__ = "0.1.0"

# Before any JAX backend starts: fake host devices need enough threads for their collectives.
reserve_collective_threads()
