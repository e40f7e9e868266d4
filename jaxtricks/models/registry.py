"""Name -> module builders for the Transformer's swappable parts (attention, MLP, output head).

A trick plugs in by registering a builder here: `builder(config, layer_index) -> nn.Module` for
attention and MLP, `builder(config) -> nn.Module` for the head. The Transformer never changes.
"""

from collections.abc import Callable

ATTENTION: dict[str, Callable] = {}
MLP: dict[str, Callable] = {}
HEAD: dict[str, Callable] = {}


def register(table: dict[str, Callable], name: str):
  def wrap(fn: Callable) -> Callable:
    if name in table:
      raise ValueError(f"{name!r} is registered twice")
    table[name] = fn
    return fn
  return wrap
