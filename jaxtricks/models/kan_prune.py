"""KAN sparsification and pruning (Liu et al. 2024, arXiv 2404.19756, sections 2.5.1-2.5.2).

Edge magnitude |phi|_1 = mean_n |phi(x_n)| over samples. Regularisation (eq. 2.17-2.20):
    L1 of a layer = sum of its edges' |phi|_1,
    entropy of a layer = sum over output nodes o of -sum_i p_oi log p_oi, p_oi = |phi_oi|_1 / sum_i,
    loss += lamb * (lamb_l1 * sum L1 + lamb_entropy * sum entropy);
pykan's form, where |phi|_1 is replaced by std_n(phi) / (std_n(x) + 0.1) (blind to constant
offsets, as the attribution scores are: with it and lamb_entropy = 10 the hellokan network
prunes, with mean |phi| it did not); or the cheap coefficient form (efficient-kan), where |phi|_1
is replaced by |w_s| mean_j |c_j| + |w_b|, with no forward pass over samples.
A hidden node is kept when its attribution score exceeds `node_threshold` (pykan's current
rule), or, with by='l1', when its largest incoming and largest outgoing |phi|_1 both exceed it
(1e-2 in the paper); `prune` returns a smaller network that computes the same
function on the kept paths. Attribution scores propagate importance back from the outputs
(pykan's rule): score of edge (o, i) = score(o) * std(phi_oi) / (std(y_o) + eps), node score =
sum of its outgoing edge scores.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from jaxtricks.models.kan import KAN, forward


def edge_l1(model: KAN, variables: dict, x_NxI: jnp.ndarray) -> list[jnp.ndarray]:
  """Per layer, (O, I) mean |phi| over the samples."""
  _, _, edges = forward(model, variables, x_NxI, return_edges=True)
  return [jnp.mean(jnp.abs(phi), axis=0) for phi in edges]


def edge_std(model: KAN, variables: dict, x_NxI: jnp.ndarray) -> list[jnp.ndarray]:
  """Per layer, (O, I) std_n(phi) / (std_n(x_i) + 0.1): pykan's edge scale, blind to constant
  offsets, which the attribution scores (and so pruning) ignore too."""
  _, inputs, edges = forward(model, variables, x_NxI, return_edges=True)
  # sqrt(var + tiny): a finite gradient (zero) for dead, constant edges, where std's is NaN.
  std = lambda a: jnp.sqrt(jnp.var(a, axis=0) + 1e-20)
  return [std(phi) / (std(x)[None] + 0.1) for x, phi in zip(inputs, edges, strict=True)]


def coef_l1(params: dict, n_layers: int) -> list[jnp.ndarray]:
  """Per layer, (O, I) coefficient-only magnitude |w_s| mean_j |c_j| + |w_b|."""
  out = []
  for layer in range(n_layers):
    p = params[f"layer_{layer}"]
    mag_IxO = (jnp.abs(p["w_spline"]) * jnp.mean(jnp.abs(p["coef"]), axis=-1)
               + jnp.abs(p["w_base"]))
    out.append(mag_IxO.T)
  return out


def l1_and_entropy(l1s: list[jnp.ndarray], form: str = "paper"
                   ) -> tuple[jnp.ndarray, jnp.ndarray]:
  """(sum of the layers' (O, I) edge magnitudes, their entropy in the `form` of Regularizer)."""
  l1 = sum(jnp.sum(a) for a in l1s)
  entropy = 0.0
  for a in l1s:
    if form == "paper":
      p_OxI = a / (jnp.sum(a, axis=1, keepdims=True) + 1e-12)
      entropy = entropy - jnp.sum(p_OxI * jnp.log(p_OxI + 1e-12))
    else:  # pykan's: rows and columns, each normalised by (sum + 1), log2, mean over nodes
      for axis in (1, 0):
        p = a / (jnp.sum(a, axis=axis, keepdims=True) + 1.0)
        entropy = entropy - jnp.mean(jnp.sum(p * jnp.log2(p + 1e-4), axis=axis))
  return l1, entropy


@dataclasses.dataclass(frozen=True)
class Regularizer:
  """reg(params, grid, x) for `train.kan_fit.fit`: lamb (lamb_l1 L1 + lamb_entropy entropy).

  entropy='paper': sum over output nodes of the entropy of their incoming edges' shares;
  'pykan' (pykan >= 0.2): mean row entropy plus mean column entropy of each layer's (O, I) edge
  scales, shares taken against (sum + 1), so a layer whose edges are all small is not pushed to
  spread its mass."""
  model: KAN
  lamb: float = 1e-2
  lamb_l1: float = 1.0
  lamb_entropy: float = 2.0
  form: str = "sample"  # sample (the paper's mean |phi|) | std (pykan's) | coef (no forward pass)
  entropy: str = "paper"  # paper | pykan

  def __call__(self, params: dict, grid: dict, x_NxI: jnp.ndarray) -> jnp.ndarray:
    if self.form == "sample":
      l1s = edge_l1(self.model, {"params": params, "grid": grid}, x_NxI)
    elif self.form == "std":
      l1s = edge_std(self.model, {"params": params, "grid": grid}, x_NxI)
    elif self.form == "coef":
      l1s = coef_l1(params, len(self.model.widths) - 1)
    else:
      raise ValueError(f"regularisation form must be 'sample', 'std' or 'coef', got {self.form!r}")
    if self.entropy not in ("paper", "pykan"):
      raise ValueError(f"entropy must be 'paper' or 'pykan', got {self.entropy!r}")
    l1, entropy = l1_and_entropy(l1s, self.entropy)
    return self.lamb * (self.lamb_l1 * l1 + self.lamb_entropy * entropy)


def attribution(model: KAN, variables: dict, x_NxI: jnp.ndarray,
                eps: float = 1e-4) -> tuple[list[np.ndarray], list[np.ndarray]]:
  """(node scores per layer, inputs first; edge scores (O, I) per layer)."""
  y, _, edges = forward(model, variables, x_NxI, return_edges=True)
  outs = [phi.sum(-1) for phi in edges]  # each layer's output (N, O)
  score = np.ones(y.shape[-1])
  node_scores, edge_scores = [score], []
  for phi, out in zip(reversed(edges), reversed(outs), strict=True):
    scale_OxI = np.asarray(jnp.std(phi, axis=0) / (jnp.std(out, axis=0)[:, None] + eps))
    e = score[:, None] * scale_OxI
    score = e.sum(0)
    edge_scores.insert(0, e)
    node_scores.insert(0, score)
  return node_scores, edge_scores


def _slice_layer(p: dict, grid: dict, keep_in: np.ndarray, keep_out: np.ndarray):
  p = {"coef": p["coef"][keep_in][:, keep_out], "w_base": p["w_base"][keep_in][:, keep_out],
       "w_spline": p["w_spline"][keep_in][:, keep_out]}
  g = dict(grid, knots=grid["knots"][keep_in])  # a uniform marker stays: slicing keeps it true
  if "mask" in grid:
    g["mask"] = grid["mask"][keep_in][:, keep_out]
  return p, g


def _slice_network(model: KAN, variables: dict, keep: list[np.ndarray]) -> tuple[KAN, dict]:
  params, grids = {}, {}
  for layer in range(len(model.widths) - 1):
    name = f"layer_{layer}"
    grid = variables["grid"][name]
    params[name], grids[name] = _slice_layer(variables["params"][name], grid, keep[layer],
                                             keep[layer + 1])
  new_model = dataclasses.replace(model, widths=tuple(len(k) for k in keep))
  return new_model, {"params": params, "grid": grids}


def prune(model: KAN, variables: dict, x_NxI: jnp.ndarray, node_threshold: float = 1e-2,
          keep_inputs: list[int] | None = None, by: str = "attribution",
          edge_threshold: float | None = None) -> tuple[KAN, dict, list[list[int]]]:
  """Removes hidden nodes below the threshold (and inputs not in keep_inputs); returns the
  smaller model, its variables and the kept node indices per layer. by='attribution': a node's
  attribution score (outputs score 1, so the threshold is relative, as pykan prunes today);
  by='l1': the paper's rule, largest incoming and largest outgoing |phi|_1.

  With edge_threshold (pykan's prune(): 3e-2), the edges of the smaller network whose
  attribution score is at most edge_threshold are then masked off (`prune_edges`), and hidden
  nodes left without any incoming or any outgoing edge are removed too. A node without outgoing
  edges contributes nothing; one without incoming edges contributes only a constant, which its
  (then near-zero score) outgoing edges were masked for anyway."""
  if by not in ("attribution", "l1"):
    raise ValueError(f"prune by 'attribution' or 'l1', got {by!r}")
  l1s = [np.asarray(a) for a in edge_l1(model, variables, x_NxI)]
  n = len(l1s)
  scores = attribution(model, variables, x_NxI)[0] if by == "attribution" else None
  keep = [np.arange(model.widths[0]) if keep_inputs is None else np.asarray(sorted(keep_inputs))]
  for layer in range(1, n):
    if scores is not None:
      ok = scores[layer] > node_threshold
      rank = scores[layer]
    else:
      incoming = l1s[layer - 1].max(axis=1)  # node i of layer `layer` is output i of layer-1
      outgoing = l1s[layer].max(axis=0)
      ok = (incoming > node_threshold) & (outgoing > node_threshold)
      rank = incoming * outgoing
    kept = np.flatnonzero(ok)
    keep.append(kept if len(kept) else np.array([int(np.argmax(rank))]))
  keep.append(np.arange(model.widths[-1]))
  model, variables = _slice_network(model, variables, keep)
  if edge_threshold is not None and n > 1:
    scores = attribution(model, variables, x_NxI)[0]
    variables = prune_edges(model, variables, x_NxI, edge_threshold, by="attribution")
    masks = [np.asarray(variables["grid"][f"layer_{layer}"]["mask"]) for layer in range(n)]
    again = [np.arange(model.widths[0])]
    for layer in range(1, n):  # masks are (I, O): node j is output j of layer-1, input j of layer
      alive = np.flatnonzero(masks[layer - 1].any(axis=0) & masks[layer].any(axis=1))
      again.append(alive if len(alive) else np.array([int(np.argmax(scores[layer]))]))
    again.append(np.arange(model.widths[-1]))
    model, variables = _slice_network(model, variables, again)
    keep = [k[a] for k, a in zip(keep, again, strict=True)]
  return model, variables, [k.tolist() for k in keep]


def prune_edges(model: KAN, variables: dict, x_NxI: jnp.ndarray,
                edge_threshold: float = 3e-2, by: str = "l1") -> dict:
  """Switches off edges with |phi|_1 below the threshold (by='l1'), or with an attribution score
  at most the threshold (by='attribution', pykan's prune_edge); a mask in the `grid` collection,
  so further training cannot bring them back."""
  if by == "l1":
    sizes = edge_l1(model, variables, x_NxI)
    keep = lambda a_OxI: a_OxI >= edge_threshold
  elif by == "attribution":
    sizes = [jnp.asarray(e) for e in attribution(model, variables, x_NxI)[1]]
    keep = lambda a_OxI: a_OxI > edge_threshold
  else:
    raise ValueError(f"prune edges by 'l1' or 'attribution', got {by!r}")
  grids = dict(variables["grid"])
  dtype = variables["params"]["layer_0"]["coef"].dtype
  for layer, a_OxI in enumerate(sizes):
    name = f"layer_{layer}"
    old = grids[name].get("mask", jnp.ones(a_OxI.T.shape, dtype))
    grids[name] = dict(grids[name], mask=old * keep(a_OxI).T.astype(dtype))
  return {"params": variables["params"], "grid": grids}
