"""Dtype names in configs ('float32', 'bfloat16') to jnp dtypes."""

import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def resolve_dtype(name: str):
  try:
    return DTYPES[name]
  except KeyError:
    raise ValueError(f"unknown dtype {name!r}; valid: {', '.join(DTYPES)}") from None
