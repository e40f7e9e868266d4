"""Merged models: every component's own parameters (adapters, SLoPe's low-rank terms, SPAFIT's
biases, PRepBN's statistics) folded into plain weights, for inference without their cost. Each
component says how in its `merged(model, params)` hook, or `merged_with(model, params,
collections)` where it also needs the model's variable collections (jaxtricks.registry); the
merged model is the same config with each component replaced by the one it merges into, and
gives the same logits.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from jaxtricks.models.config import ModelConfig
from jaxtricks.registry import SLOTS


def merged_params(model: ModelConfig, params: dict, slots: Sequence[str] = SLOTS,
                  collections: dict | None = None) -> tuple[ModelConfig, dict]:
  """(the merged model's config, its parameters) of `model` with `params` (and its variable
  collections besides them, if any), merging the components of `slots` (default: all)."""
  changes = {}
  for slot in slots:
    changes[slot], params = getattr(model, slot).merged_with(model, params, collections or {})
  return dataclasses.replace(model, **changes), params
