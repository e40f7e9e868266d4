"""Pure jnp functions: the mathematics of each trick, no Flax, no state."""
