"""Dtype names in configs ('float32', 'bfloat16') to jnp dtypes."""

import jax.numpy as jnp

# float64 needs jax_enable_x64 (the KAN function-fitting experiment turns it on).
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16,
          "float64": jnp.float64}


def resolve_dtype(name: str):
  try:
    return DTYPES[name]
  except KeyError:
    raise ValueError(f"unknown dtype {name!r}; valid: {', '.join(DTYPES)}") from None
