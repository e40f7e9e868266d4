"""HyperAttention (Han et al. 2023, arXiv 2310.05869): approximate attention in near-linear time.

Non-causal core (sortLSH plus a sampled residual): one angular LSH for queries and keys,
h(x) = sign bits of x R (R: `lsh_bits` Gaussian directions), the 2^r buckets taken in Gray-code
order so that neighbouring buckets differ in one bit (bucket c ranks at the inverse Gray code
c ^ c>>1 ^ c>>2 ^ ...; the authors' code sorts by the Gray code of c instead). Queries and keys
are sorted by bucket rank and attend exactly inside the diagonal blocks (n/b blocks of
b = `block_size` keys and the matching queries). The residual (the entries outside a query's
block) is estimated from m = `samples` key columns drawn uniformly (as the authors' code does;
the paper's theory samples by row norms), each weighted n/m, samples in the query's own block
masked: lse_res = log sum_sampled e^(s) + log(n / m). The two parts merge by log-sum-exp,
    lse = log(e^lse_a + e^lse_b),  out = e^(lse_a - lse) out_a + e^(lse_b - lse) out_b,
and the rows go back to their order. Cost O(n (b + m) H) and an O(n log n) sort.

Causal (the paper's recursive split): a segment of length n splits in halves; the two diagonal
halves are causal (recursion, batched as one call), the lower-left quarter (second-half queries,
first-half keys) is the unmasked core, merged into the second half by log-sum-exp; at or below
`min_seq_len` the segment is exact (ops.blockwise_attention). Every random draw comes from
PRNGKey(seed), folded in per recursion level (and drawn independently per segment and head).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np

from jaxtricks.errors import ConfigError
from jaxtricks.ops.blockwise_attention import blockwise_attention_with_lse

_F32 = jnp.float32


def gray_rank(code: jnp.ndarray, bits: int) -> jnp.ndarray:
  """Position of each code in the reflected Gray sequence g(r) = r ^ (r >> 1) (inverse Gray)."""
  shift = 1
  while shift < bits:
    code = code ^ (code >> shift)
    shift *= 2
  return code


def _softmax_parts(logits, v):
  """(softmax(logits) v, logsumexp(logits)); a row of only -inf gives (0, -inf), finite grads."""
  m = jnp.max(logits, axis=-1)
  m = jnp.where(m == -jnp.inf, 0.0, m)
  p = jnp.exp(logits - m[..., None])
  den = jnp.sum(p, axis=-1)
  seen = den > 0
  den_safe = jnp.where(seen, den, 1.0)
  out = jnp.einsum("...TS,...SH->...TH", p, v) / den_safe[..., None]
  return out, jnp.where(seen, m + jnp.log(den_safe), -jnp.inf)


def _merge(out_a, lse_a, out_b, lse_b):
  """Two attentions over disjoint key sets merged by log-sum-exp (lse_a finite)."""
  lse = jnp.logaddexp(lse_a, lse_b)
  return (jnp.exp(lse_a - lse)[..., None] * out_a + jnp.exp(lse_b - lse)[..., None] * out_b, lse)


def _non_causal(q_ZxTxH, k_ZxTxH, v_ZxTxH, key, block_size: int, samples: int, lsh_bits: int):
  """sortLSH block-diagonal attention plus the sampled residual: (out, lse) in float32."""
  z, n, h = q_ZxTxH.shape
  b = min(block_size, n)
  scale = h ** -0.5
  key_lsh, key_samples = jax.random.split(key)
  proj_ZxHxR = jax.random.normal(key_lsh, (z, h, lsh_bits), _F32)
  powers_R = 2 ** jnp.arange(lsh_bits)

  def sort_order(x_ZxTxH):
    bits_ZxTxR = jnp.einsum("ZTH,ZHR->ZTR", x_ZxTxH, proj_ZxHxR) > 0
    codes_ZxT = jnp.sum(bits_ZxTxR * powers_R, axis=-1)
    return jnp.argsort(gray_rank(codes_ZxT, lsh_bits), axis=1, stable=True)

  order_q, order_k = sort_order(q_ZxTxH), sort_order(k_ZxTxH)
  q, k, v = (jnp.take_along_axis(x, o[..., None], axis=1)
             for x, o in ((q_ZxTxH, order_q), (k_ZxTxH, order_k), (v_ZxTxH, order_k)))
  blocks = lambda x: x.reshape(z, n // b, b, h)  # noqa: E731
  logits_ZxJxTxS = jnp.einsum("ZJTH,ZJSH->ZJTS", blocks(q), blocks(k)) * scale  # J: block
  out, lse = _softmax_parts(logits_ZxJxTxS, blocks(v))
  out, lse = out.reshape(z, n, h), lse.reshape(z, n)
  if samples and n > b:
    idx_ZxM = jax.random.randint(key_samples, (z, samples), 0, n)  # positions in sorted keys
    k_ZxMxH, v_ZxMxH = (jnp.take_along_axis(x, idx_ZxM[..., None], axis=1) for x in (k, v))
    logits_ZxTxM = jnp.einsum("ZTH,ZMH->ZTM", q, k_ZxMxH) * scale
    own_ZxTxM = (jnp.arange(n) // b)[None, :, None] == (idx_ZxM // b)[:, None, :]
    out_res, lse_res = _softmax_parts(jnp.where(own_ZxTxM, -jnp.inf, logits_ZxTxM), v_ZxMxH)
    out, lse = _merge(out, lse, out_res, lse_res + np.log(n / samples))
  unsort = jnp.argsort(order_q, axis=1)
  return (jnp.take_along_axis(out, unsort[..., None], axis=1),
          jnp.take_along_axis(lse, unsort, axis=1))


def _causal(q_ZxTxH, k_ZxTxH, v_ZxTxH, key, level: int, cfg: tuple):
  block_size, samples, min_seq_len, lsh_bits = cfg
  z, n, _ = q_ZxTxH.shape
  if n <= min_seq_len:
    out, lse = blockwise_attention_with_lse(q_ZxTxH[:, :, None], k_ZxTxH[:, :, None],
                                            v_ZxTxH[:, :, None], causal=True)
    return out[:, :, 0], lse[:, :, 0]
  half = n // 2
  halves = lambda x: jnp.concatenate([x[:, :half], x[:, half:]], axis=0)  # noqa: E731
  out_d, lse_d = _causal(halves(q_ZxTxH), halves(k_ZxTxH), halves(v_ZxTxH), key, level + 1, cfg)
  out_q, lse_q = _non_causal(q_ZxTxH[:, half:], k_ZxTxH[:, :half], v_ZxTxH[:, :half],
                             jax.random.fold_in(key, level), block_size, samples, lsh_bits)
  out_low, lse_low = _merge(out_d[z:], lse_d[z:], out_q, lse_q)
  return (jnp.concatenate([out_d[:z], out_low], axis=1),
          jnp.concatenate([lse_d[:z], lse_low], axis=1))


def _check(t: int, block_size: int, samples: int, min_seq_len: int, causal: bool,
           lsh_bits: int) -> None:
  """Block size against every length the non-causal core sees (a length <= block_size is one
  block); the causal recursion halves segments longer than min_seq_len."""
  for name, value, low in (("block_size", block_size, 1), ("samples", samples, 0),
                           ("min_seq_len", min_seq_len, 1), ("lsh_bits", lsh_bits, 1)):
    if value < low:
      raise ConfigError(f"hyper_attention: {name}={value} must be at least {low}")
  if lsh_bits > 30:
    raise ConfigError(f"hyper_attention: lsh_bits={lsh_bits} must be at most 30")
  lengths, n = [("sequence", t)], t
  while causal and n > min_seq_len:
    if n % 2:
      raise ConfigError(f"hyper_attention: the causal recursion halves segments longer than "
                        f"min_seq_len={min_seq_len}; segment length {n} is odd")
    n //= 2
    lengths.append(("segment", n))
  for what, n in lengths:
    if n > block_size and n % block_size:
      raise ConfigError(f"hyper_attention: block_size={block_size} does not divide the {what} "
                        f"length {n}")


def hyper_attention(q_BxTxNxH: jnp.ndarray, k_BxTxKxH: jnp.ndarray, v_BxTxKxH: jnp.ndarray, *,
                    block_size: int = 256, samples: int = 256, seed: int | jnp.ndarray = 0,
                    min_seq_len: int = 4096, causal: bool = True, lsh_bits: int = 7
                    ) -> jnp.ndarray:
  """Approximate softmax(q k^T / sqrt(H) [+ causal mask]) v, (B, T, N, H) in q's dtype, float32
  inside. K/V heads are repeated to the N query heads. `block_size` must divide the sequence
  length and every segment of the causal recursion longer than it (a shorter one is one block,
  attended exactly). samples=0: no residual. Deterministic given `seed` (an int or a traced
  integer). min_seq_len only applies to the causal recursion."""
  chex.assert_rank([q_BxTxNxH, k_BxTxKxH, v_BxTxKxH], 4)
  chex.assert_equal_shape([k_BxTxKxH, v_BxTxKxH])
  chex.assert_equal_shape([q_BxTxNxH, k_BxTxKxH], dims=(0, 1, 3))
  b, t, n, h = q_BxTxNxH.shape
  n_kv = k_BxTxKxH.shape[2]
  if n % n_kv:
    raise ConfigError(f"query heads ({n}) must be a multiple of key/value heads ({n_kv})")
  _check(t, block_size, samples, min_seq_len, causal, lsh_bits)
  heads = lambda x: jnp.repeat(x, n // n_kv, axis=2)  # noqa: E731
  rows = lambda x: x.astype(_F32).transpose(0, 2, 1, 3).reshape(b * n, t, h)  # noqa: E731
  q, k, v = rows(q_BxTxNxH), rows(heads(k_BxTxKxH)), rows(heads(v_BxTxKxH))
  key = jax.random.PRNGKey(seed)
  if causal:
    out, _ = _causal(q, k, v, key, 0, (block_size, samples, min_seq_len, lsh_bits))
  else:
    out, _ = _non_causal(q, k, v, key, block_size, samples, lsh_bits)
  return out.reshape(b, n, t, h).transpose(0, 2, 1, 3).astype(q_BxTxNxH.dtype)
