"""Multi-token prediction loss and speculative acceptance (Gloeckle et al. 2024, arXiv 2404.19737).

Head i (i = 1..n) at position t predicts token t + i:
    L_n = sum_i w_i * mean_t -log P_i(x_{t+i} | x_<=t),
w_i = 1 (the paper's unweighted sum) or, for DeepSeek-V3 style modules (arXiv 2412.19437, eq. 25),
w_1 = 1 and w_i = lambda / (n - 1). Targets past the end of a window are masked.

`heads_cross_entropy` is the memory-efficient form of the paper's Fig. 2: a scan over heads that
computes one head's logits, its loss and the gradient of that loss with respect to the head's
state and the shared output parameters, then frees the logits before the next head. The trunk and
head layers are differentiated as usual; only the (B, T, V) logits are never alive for two heads at
once, so the loss's temporary memory is O(V) instead of O(n V).

Self-speculative decoding (Stern et al. 2018, arXiv 1811.03115) accepts the longest prefix of the
drafts that the next-token head agrees with (greedy), or by the rule of Leviathan et al. 2023
(arXiv 2211.17192): accept a draft x ~ q with probability min(1, p(x) / q(x)); at the first
rejection sample from norm(max(0, p - q)). Both keep the output distribution of plain decoding.
Shape contracts are chex assertions on static shapes (trace time).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np

from jaxtricks.ops.losses import accuracy, cross_entropy

# project(shared_params, h_BxTxD) -> logits_BxTxV
Project = Callable[[dict, jnp.ndarray], jnp.ndarray]
# head_loss(shared_params, h_BxTxD, targets_BxT, weights_BxT) -> (mean loss, accuracy)
HeadLoss = Callable[[dict, jnp.ndarray, jnp.ndarray, jnp.ndarray],
                    tuple[jnp.ndarray, jnp.ndarray]]


def head_weights(n: int, lam: float = 0.0) -> np.ndarray:
  """(n,) loss weight of each head: all ones, or 1 then lambda / (n - 1) when lam > 0."""
  w = np.ones(n, np.float32)
  if lam > 0 and n > 1:
    w[1:] = lam / (n - 1)
  return w


def shift_targets(targets_BxT: jnp.ndarray, weights_BxT: jnp.ndarray | None,
                  n: int) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Targets (n, B, T) of heads 1..n and their weights; head i's last i - 1 positions masked."""
  chex.assert_rank(targets_BxT, 2, custom_message="shift_targets: targets_BxT")
  if weights_BxT is not None:
    chex.assert_equal_shape([targets_BxT, weights_BxT], custom_message="shift_targets: weights")
  if weights_BxT is None:
    weights_BxT = jnp.ones(targets_BxT.shape, jnp.float32)
  pad = lambda x, i: jnp.pad(x[:, i:], ((0, 0), (0, i)))
  return (jnp.stack([pad(targets_BxT, i) for i in range(n)]),
          jnp.stack([pad(weights_BxT.astype(jnp.float32), i) for i in range(n)]))


def _head_loss(project: Project, shared: dict, h_BxTxD, targets_BxT, weights_BxT):
  logits_BxTxV = project(shared, h_BxTxD)
  total, count = cross_entropy(logits_BxTxV, targets_BxT, weights_BxT)
  correct, _ = accuracy(logits_BxTxV, targets_BxT, weights_BxT)
  count = jnp.maximum(count, 1.0)
  return total / count, correct / count


def heads_cross_entropy_naive(project: Project, shared: dict, h_NxBxTxD, targets_NxBxT,
                              weights_NxBxT, head_w_N) -> tuple[jnp.ndarray, dict]:
  """The plain form: every head's logits at once, differentiated by ordinary autodiff."""
  _check_heads("heads_cross_entropy_naive", h_NxBxTxD, targets_NxBxT, weights_NxBxT, head_w_N)
  losses, accs = zip(*[_head_loss(project, shared, h_NxBxTxD[i], targets_NxBxT[i],
                                  weights_NxBxT[i]) for i in range(h_NxBxTxD.shape[0])],
                     strict=True)
  losses_N, accs_N = jnp.stack(losses), jnp.stack(accs)
  return jnp.sum(jnp.asarray(head_w_N) * losses_N), {"loss": jax.lax.stop_gradient(losses_N),
                                                      "accuracy": jax.lax.stop_gradient(accs_N)}


def _check_heads(name: str, h_NxBxTxD, targets_NxBxT, weights_NxBxT, head_w_N) -> None:
  """h (n, B, T, D), targets and weights (n, B, T), head weights (n,)."""
  chex.assert_rank(h_NxBxTxD, 4, custom_message=f"{name}: h_NxBxTxD")
  chex.assert_shape([targets_NxBxT, weights_NxBxT], h_NxBxTxD.shape[:3],
                    custom_message=f"{name}: targets_NxBxT, weights_NxBxT")
  chex.assert_equal(np.shape(head_w_N), h_NxBxTxD.shape[:1], custom_message=f"{name}: head_w_N")


def _scan_heads(f: HeadLoss, shared, h_NxBxTxD, targets_NxBxT, weights_NxBxT,
                with_grads: bool):
  def one(_, xs):
    h_BxTxD, targets_BxT, weights_BxT = xs
    if not with_grads:
      return None, (*f(shared, h_BxTxD, targets_BxT, weights_BxT), None, None)
    (loss, acc), (g_shared, g_h) = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(
        shared, h_BxTxD, targets_BxT, weights_BxT)
    return None, (loss, acc, g_shared, g_h)
  _, out = jax.lax.scan(one, None, (h_NxBxTxD, targets_NxBxT, weights_NxBxT))
  return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused(one_head, shared, h_NxBxTxD, targets_NxBxT, weights_NxBxT, head_w_N):
  losses_N, accs_N, _, _ = _scan_heads(one_head, shared, h_NxBxTxD, targets_NxBxT, weights_NxBxT,
                                       with_grads=False)
  return jnp.sum(head_w_N * losses_N), (losses_N, accs_N)


def _fused_fwd(one_head, shared, h_NxBxTxD, targets_NxBxT, weights_NxBxT, head_w_N):
  losses_N, accs_N, g_shared_N, g_h_NxBxTxD = _scan_heads(
      one_head, shared, h_NxBxTxD, targets_NxBxT, weights_NxBxT, with_grads=True)
  # Weighted sums over heads, kept as residuals: one parameter-sized tree and (n, B, T, D).
  g_shared = jax.tree.map(lambda g: jnp.tensordot(head_w_N, g, axes=1), g_shared_N)
  g_h_NxBxTxD = g_h_NxBxTxD * head_w_N[:, None, None, None].astype(g_h_NxBxTxD.dtype)
  res = (g_shared, g_h_NxBxTxD, targets_NxBxT, weights_NxBxT, losses_N)
  return (jnp.sum(head_w_N * losses_N), (losses_N, accs_N)), res


def _fused_bwd(one_head, res, cotangents):
  del one_head
  g_shared, g_h_NxBxTxD, targets_NxBxT, weights_NxBxT, losses_N = res
  g_objective = cotangents[0]  # per-head losses and accuracies are metrics (no gradient)
  zeros_int = np.zeros(targets_NxBxT.shape, jax.dtypes.float0)
  return (jax.tree.map(lambda g: g_objective * g, g_shared), g_objective * g_h_NxBxTxD,
          zeros_int, jnp.zeros_like(weights_NxBxT), jnp.zeros_like(losses_N))


_fused.defvjp(_fused_fwd, _fused_bwd)


def heads_cross_entropy(project: Project, shared: dict, h_NxBxTxD: jnp.ndarray,
                        targets_NxBxT: jnp.ndarray, weights_NxBxT: jnp.ndarray,
                        head_w_N, head_loss: HeadLoss | None = None
                        ) -> tuple[jnp.ndarray, dict]:
  """Memory-efficient L_n: (objective, {'loss': (n,), 'accuracy': (n,)}) with the gradients of
  the objective equal to `heads_cross_entropy_naive`'s. Per-head metrics carry no gradient.
  `head_loss` replaces the cross entropy of `project`'s logits by a function computing one
  head's (mean loss, accuracy) itself (the vocabulary-parallel loss: jaxtricks.train.vocab_loss).
  """
  _check_heads("heads_cross_entropy", h_NxBxTxD, targets_NxBxT, weights_NxBxT, head_w_N)
  one_head = functools.partial(_head_loss, project) if head_loss is None else head_loss
  objective, (losses_N, accs_N) = _fused(one_head, shared, h_NxBxTxD, targets_NxBxT,
                                         weights_NxBxT, jnp.asarray(head_w_N, jnp.float32))
  return objective, {"loss": jax.lax.stop_gradient(losses_N),
                     "accuracy": jax.lax.stop_gradient(accs_N)}


def draft_acceptance(preds_NxBxT: jnp.ndarray, weights_NxBxT: jnp.ndarray
                     ) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Acceptance of greedy drafts from the heads' argmax predictions (n, B, T) (head i at
  position t predicts token t + i): accept_K (n - 1,), how often head k + 1's prediction at t
  equals the next-token head's at t + k, the one that verifies it; and the tokens per forward a
  chain of all the drafts from t would give, 1 + sum_j prod_{i <= j} match_i, averaged over the
  positions whose every draft has a target (weights: shift_targets's)."""
  chex.assert_rank(preds_NxBxT, 3, custom_message="draft_acceptance: preds_NxBxT")
  chex.assert_equal_shape([preds_NxBxT, weights_NxBxT], custom_message="draft_acceptance")
  n = preds_NxBxT.shape[0]
  verify = lambda k: jnp.pad(preds_NxBxT[0][:, k:], ((0, 0), (0, k)))  # noqa: E731
  match_KxBxT = jnp.stack([preds_NxBxT[k] == verify(k) for k in range(1, n)]).astype(jnp.float32)
  w_KxBxT = weights_NxBxT[1:]
  accept_K = jnp.sum(match_KxBxT * w_KxBxT, axis=(1, 2)) / jnp.maximum(
      jnp.sum(w_KxBxT, axis=(1, 2)), 1.0)
  chain_BxT = 1.0 + jnp.sum(jnp.cumprod(match_KxBxT, axis=0), axis=0)
  w_BxT = weights_NxBxT[-1]  # every draft from t has a target
  expected = jnp.sum(chain_BxT * w_BxT) / jnp.maximum(jnp.sum(w_BxT), 1.0)
  return accept_K, expected


def greedy_accepts(drafts_BxK: jnp.ndarray, predicted_BxK: jnp.ndarray) -> jnp.ndarray:
  """(B,) length of the longest prefix where drafts equal the next-token head's predictions."""
  chex.assert_rank(drafts_BxK, 2, custom_message="greedy_accepts: drafts_BxK")
  chex.assert_equal_shape([drafts_BxK, predicted_BxK], custom_message="greedy_accepts")
  match_BxK = (drafts_BxK == predicted_BxK).astype(jnp.int32)
  return jnp.sum(jnp.cumprod(match_BxK, axis=1), axis=1)


def speculative_accepts(p_BxKxV: jnp.ndarray, q_BxKxV: jnp.ndarray, drafts_BxK: jnp.ndarray,
                        rng: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Leviathan et al. acceptance for K drafts: (B,) number accepted, (B,) the residual sample
  norm(max(0, p - q)) at the first rejected position (meaningless where all were accepted).

  p: target probabilities at each draft's position; q: the drafting distributions.
  """
  chex.assert_rank(p_BxKxV, 3, custom_message="speculative_accepts: p_BxKxV")
  chex.assert_equal_shape([p_BxKxV, q_BxKxV], custom_message="speculative_accepts: p and q")
  chex.assert_shape(drafts_BxK, p_BxKxV.shape[:2], custom_message="speculative_accepts: drafts")
  k_u, k_r = jax.random.split(rng)
  p_d = jnp.take_along_axis(p_BxKxV, drafts_BxK[..., None], axis=-1)[..., 0]
  q_d = jnp.take_along_axis(q_BxKxV, drafts_BxK[..., None], axis=-1)[..., 0]
  u_BxK = jax.random.uniform(k_u, drafts_BxK.shape)
  # u < p/q without dividing by zero (q(d) > 0 for a sampled draft).
  ok_BxK = (u_BxK * q_d < p_d).astype(jnp.int32)
  n_B = jnp.sum(jnp.cumprod(ok_BxK, axis=1), axis=1)
  at = jnp.minimum(n_B, drafts_BxK.shape[1] - 1)[:, None, None]
  p_BxV = jnp.take_along_axis(p_BxKxV, at, axis=1)[:, 0]
  q_BxV = jnp.take_along_axis(q_BxKxV, at, axis=1)[:, 0]
  residual_BxV = jnp.maximum(p_BxV - q_BxV, 0.0)
  # p == q exactly leaves no residual mass; then p itself is the right distribution.
  residual_BxV = jnp.where(jnp.sum(residual_BxV, -1, keepdims=True) > 0, residual_BxV, p_BxV)
  resample_B = jax.random.categorical(k_r, jnp.log(residual_BxV), axis=-1).astype(jnp.int32)
  return n_B, resample_B


def loss_temp_bytes(n: int, batch: int, seq_len: int, d_model: int, vocab: int,
                    efficient: bool) -> int:
  """XLA's compiled temporary memory for the gradient of L_n with respect to the head states and
  an unembedding (float32), from the compiled executable's memory analysis (nothing runs)."""
  project = lambda shared, h_BxTxD: h_BxTxD @ shared["unembed"]
  fn = heads_cross_entropy if efficient else heads_cross_entropy_naive

  def loss(shared, h_NxBxTxD, targets_NxBxT, weights_NxBxT):
    return fn(project, shared, h_NxBxTxD, targets_NxBxT, weights_NxBxT, np.ones(n, np.float32))[0]

  f32 = jax.ShapeDtypeStruct
  args = ({"unembed": f32((d_model, vocab), jnp.float32)},
          f32((n, batch, seq_len, d_model), jnp.float32), f32((n, batch, seq_len), jnp.int32),
          f32((n, batch, seq_len), jnp.float32))
  compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(*args).compile()
  return int(compiled.memory_analysis().temp_size_in_bytes)
