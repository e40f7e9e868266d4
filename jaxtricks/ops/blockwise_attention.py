"""Exact attention in blocks by the online softmax, memory O(T) in the forward and the backward.

Self-attention does not need O(n^2) memory (Rabe and Staats 2021, arXiv 2112.05682) and
FlashAttention (Dao et al. 2022, arXiv 2205.14135, Algorithm 1): for a block of queries Q_i
and each needed key block j, with S = Q_i K_j^T / sqrt(H) masked to -inf,
    m' = max(m, rowmax S),  l' = e^(m - m') l + rowsum e^(S - m'),
    o' = e^(m - m') o + e^(S - m') V_j,        out = o / l,  lse = m + log l.
The backward recomputes each block from the saved lse (FlashAttention App. B, backward pass):
    P = e^(S - lse),  dV_j += P^T dO,  dP = dO V_j^T,  dS = P (dP - D),  D = rowsum(dO out),
    dQ_i += dS K_j / sqrt(H),  dK_j += dS^T Q_i / sqrt(H)
(an lse cotangent g adds P g to dS: D becomes D - g). Key blocks that the mask hides entirely are
skipped in both passes: causal attention touches the blocks up to the diagonal (about half), a
sliding window those inside its band. Queries are grouped (B, K, G = N/K, T, H) so K/V heads are
never repeated. T and S need not divide the block sizes: the arrays are padded to whole blocks
inside and the padded keys masked.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp

from jaxtricks.errors import ConfigError

_F32 = jnp.float32


def _block_mask(i, j, bq: int, bk: int, s: int, causal: bool, window: int, strict: bool):
  """(bq, bk) boolean: query block i may see key block j (None: all allowed)."""
  q_pos = i * bq + jnp.arange(bq)[:, None]
  k_pos = j * bk + jnp.arange(bk)[None, :]
  ok = None
  if causal:
    ok = k_pos < q_pos if strict else k_pos <= q_pos
    if window:
      ok &= q_pos - k_pos < window
  if s % bk:  # padded keys in the last block
    ok = k_pos < s if ok is None else ok & (k_pos < s)
  return ok


def _key_range(i, bq: int, bk: int, t: int, n_k: int, causal: bool, window: int):
  """Key blocks [lo, hi) that query block i needs."""
  if not causal:
    return 0, n_k
  last_q = jnp.minimum((i + 1) * bq, t) - 1
  lo = jnp.maximum(i * bq - window + 1, 0) // bk if window else 0
  return lo, last_q // bk + 1


def _query_range(j, bq: int, bk: int, t: int, n_q: int, causal: bool, window: int):
  """Query blocks [lo, hi) that see key block j."""
  if not causal:
    return 0, n_q
  hi = jnp.minimum((j + 1) * bk + window - 2, t - 1) // bq + 1 if window else n_q
  return (j * bk) // bq, hi


def _scores(q_i, k_j, i, j, cfg):
  """Scaled, masked float32 logits (B, K, G, bq, bk) of query block i against key block j."""
  causal, window, strict, bq, bk, _, s = cfg
  s_ = jnp.einsum("BKGTH,BKSH->BKGTS", q_i, k_j, preferred_element_type=_F32)
  s_ = s_ * (q_i.shape[-1] ** -0.5)
  mask = _block_mask(i, j, bq, bk, s, causal, window, strict)
  return s_ if mask is None else jnp.where(mask, s_, -jnp.inf)


def _forward(q, k, v, cfg):
  """q (B, K, G, Tp, H), k and v (B, K, Sp, H), padded to whole blocks: out, lse (B, K, G, Tp)."""
  causal, window, _, bq, bk, t, _ = cfg
  n_q, n_k = q.shape[3] // bq, k.shape[2] // bk

  def query_block(i):
    q_i = jax.lax.dynamic_slice_in_dim(q, i * bq, bq, axis=3)

    def body(j, carry):
      m, den, o = carry
      k_j = jax.lax.dynamic_slice_in_dim(k, j * bk, bk, axis=2)
      v_j = jax.lax.dynamic_slice_in_dim(v, j * bk, bk, axis=2)
      s_ = _scores(q_i, k_j, i, j, cfg)
      m_new = jnp.maximum(m, jnp.max(s_, axis=-1))
      m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # rows with nothing allowed yet
      p = jnp.exp(s_ - m_safe[..., None])
      scale = jnp.exp(m - m_safe)
      o = o * scale[..., None] + jnp.einsum("BKGTS,BKSH->BKGTH", p.astype(v.dtype), v_j,
                                            preferred_element_type=_F32)
      return m_new, den * scale + jnp.sum(p, axis=-1), o

    rows = q_i.shape[:-1]
    init = (jnp.full(rows, -jnp.inf, _F32), jnp.zeros(rows, _F32), jnp.zeros(q_i.shape, _F32))
    m, den, o = jax.lax.fori_loop(*_key_range(i, bq, bk, t, n_k, causal, window), body, init)
    seen = den > 0  # a row that may see no key (strict, first row) outputs zero
    den_safe = jnp.where(seen, den, 1.0)
    return (o / den_safe[..., None]).astype(q.dtype), jnp.where(seen, m + jnp.log(den_safe),
                                                              -jnp.inf)

  o, lse = jax.lax.map(query_block, jnp.arange(n_q))  # (n_q, B, K, G, bq, ...)
  o = jnp.moveaxis(o, 0, 3).reshape(q.shape)
  return o, jnp.moveaxis(lse, 0, 3).reshape(q.shape[:-1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _flash(q, k, v, cfg):
  return _forward(q, k, v, cfg)


def _flash_fwd(q, k, v, cfg):
  o, lse = _forward(q, k, v, cfg)
  return (o, lse), (q, k, v, o, lse)


def _flash_bwd(cfg, res, cts):
  causal, window, _, bq, bk, t, _ = cfg
  q, k, v, o, lse = res
  do, dlse = cts
  n_q, n_k = q.shape[3] // bq, k.shape[2] // bk
  scale = q.shape[-1] ** -0.5
  d = jnp.sum(do.astype(_F32) * o.astype(_F32), axis=-1) - dlse
  lse = jnp.where(lse == -jnp.inf, jnp.inf, lse)  # empty rows: P = 0

  def key_block(dq, j):
    k_j = jax.lax.dynamic_slice_in_dim(k, j * bk, bk, axis=2)
    v_j = jax.lax.dynamic_slice_in_dim(v, j * bk, bk, axis=2)

    def body(i, carry):
      dq, dk, dv = carry
      q_i, do_i, dq_i = (jax.lax.dynamic_slice_in_dim(a, i * bq, bq, axis=3) for a in (q, do, dq))
      lse_i, d_i = (jax.lax.dynamic_slice_in_dim(a, i * bq, bq, axis=3) for a in (lse, d))
      p = jnp.exp(_scores(q_i, k_j, i, j, cfg) - lse_i[..., None])
      dv = dv + jnp.einsum("BKGTS,BKGTH->BKSH", p, do_i, preferred_element_type=_F32)
      dp = jnp.einsum("BKGTH,BKSH->BKGTS", do_i, v_j, preferred_element_type=_F32)
      ds = p * (dp - d_i[..., None]) * scale
      dq_i = dq_i + jnp.einsum("BKGTS,BKSH->BKGTH", ds, k_j, preferred_element_type=_F32)
      dk = dk + jnp.einsum("BKGTS,BKGTH->BKSH", ds, q_i, preferred_element_type=_F32)
      return jax.lax.dynamic_update_slice_in_dim(dq, dq_i, i * bq, axis=3), dk, dv

    zeros = jnp.zeros(k_j.shape, _F32)
    dq, dk, dv = jax.lax.fori_loop(*_query_range(j, bq, bk, t, n_q, causal, window), body,
                                   (dq, zeros, zeros))
    return dq, (dk, dv)

  dq, (dk, dv) = jax.lax.scan(key_block, jnp.zeros(q.shape, _F32), jnp.arange(n_k))
  dk, dv = (jnp.moveaxis(a, 0, 2).reshape(k.shape) for a in (dk, dv))
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


_flash.defvjp(_flash_fwd, _flash_bwd)


def _check(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, causal, window, strict, block_q, block_k) -> None:
  chex.assert_rank([q_BxTxNxH, k_BxSxKxH, v_BxSxKxH], 4)
  chex.assert_equal_shape([k_BxSxKxH, v_BxSxKxH])
  chex.assert_equal_shape([q_BxTxNxH, k_BxSxKxH], dims=(0, 3))
  t, n = q_BxTxNxH.shape[1:3]
  s, n_kv = k_BxSxKxH.shape[1:3]
  if n % n_kv:
    raise ConfigError(f"query heads ({n}) must be a multiple of key/value heads ({n_kv})")
  for name, value in (("block_q", block_q), ("block_k", block_k)):
    if value < 1:
      raise ConfigError(f"blockwise_attention: {name}={value} must be at least 1")
  if window < 0:
    raise ConfigError(f"blockwise_attention: window={window} must be >= 0 (0: no window)")
  if not causal and (window or strict):
    raise ConfigError(f"blockwise_attention: window={window} and strict={strict} need "
                      "causal=True")
  if causal and s != t:
    raise ConfigError(f"blockwise_attention: causal attention needs as many keys as queries, "
                      f"got {s} and {t}")


def blockwise_attention_with_lse(q_BxTxNxH: jnp.ndarray, k_BxSxKxH: jnp.ndarray,
                                 v_BxSxKxH: jnp.ndarray, *, causal: bool = True, window: int = 0,
                                 strict: bool = False, block_q: int = 512, block_k: int = 512
                                 ) -> tuple[jnp.ndarray, jnp.ndarray]:
  """`blockwise_attention` and its float32 log-sum-exp of the scaled logits (B, T, N) (-inf for
  a row that sees no key), both differentiable, for merging partial attentions."""
  _check(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, causal, window, strict, block_q, block_k)
  b, t, n, h = q_BxTxNxH.shape
  s, n_kv = k_BxSxKxH.shape[1:3]
  bq, bk = min(block_q, t), min(block_k, s)
  pad_q, pad_k = -t % bq, -s % bk
  q = q_BxTxNxH.reshape(b, t, n_kv, n // n_kv, h).transpose(0, 2, 3, 1, 4)
  q = jnp.pad(q, ((0, 0),) * 3 + ((0, pad_q), (0, 0)))
  k, v = (jnp.pad(a.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, pad_k), (0, 0)))
          for a in (k_BxSxKxH, v_BxSxKxH))
  o, lse = _flash(q, k, v, (causal, window, strict, bq, bk, t, s))
  o = o[:, :, :, :t].transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)
  return o, lse[..., :t].transpose(0, 3, 1, 2).reshape(b, t, n)


def blockwise_attention(q_BxTxNxH: jnp.ndarray, k_BxSxKxH: jnp.ndarray, v_BxSxKxH: jnp.ndarray,
                        *, causal: bool = True, window: int = 0, strict: bool = False,
                        block_q: int = 512, block_k: int = 512) -> jnp.ndarray:
  """Exact softmax(q k^T / sqrt(H) + mask) v, (B, T, N, H) in q's dtype, float32 inside, never
  holding more than one (block_q, block_k) block of logits per query group.

  causal: queries and keys at positions 0..T-1 (S == T); key j is seen by query i iff j <= i
  (j < i with `strict`; a row that sees no key outputs zeros) and, with `window` W > 0, also
  i - j < W. Non-causal: every key is seen (S may differ from T). Blocks are min(block, length);
  lengths that are not multiples are padded inside.
  """
  return blockwise_attention_with_lse(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, causal=causal,
                                      window=window, strict=strict, block_q=block_q,
                                      block_k=block_k)[0]
