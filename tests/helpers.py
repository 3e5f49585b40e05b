"""Test helpers: random indexer problems, float64 numpy oracles and DeepGEMM's calc_diff."""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np

from nsa_jax.quant import act_quant, dequant


COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


class CompileCounter:
  """Backend compiles (jax's monitoring event) from the moment it is made: ``.n``."""

  def __init__(self):
    self.n = 0
    jax.monitoring.register_event_duration_secs_listener(self._on)

  def _on(self, event, duration, **kw):
    if event == COMPILE_EVENT:
      self.n += 1


@contextlib.contextmanager
def count_compiles():
  """Yields a list that collects one entry per XLA backend compile inside the block."""
  events = []

  def listener(name, _secs, **_kw):
    if name == COMPILE_EVENT:
      events.append(name)

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield events
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


def calc_diff(x, y) -> float:
  """DeepGEMM's measure: 1 - 2 sum(xy) / sum(x^2 + y^2), with -inf set to 0 on both sides."""
  x = np.where(np.isneginf(x), 0.0, np.asarray(x, np.float64))
  y = np.where(np.isneginf(y), 0.0, np.asarray(y, np.float64))
  denom = (x * x + y * y).sum()
  return float(1.0 - 2.0 * (x * y).sum() / denom) if denom > 0 else 0.0


def assert_same_inf_pattern(x, y):
  x, y = np.asarray(x), np.asarray(y)
  mism = np.isneginf(x) != np.isneginf(y)
  assert not mism.any(), f"-inf pattern differs at {np.argwhere(mism)[:8].tolist()}"
  assert np.isfinite(x[~np.isneginf(x)]).all(), "non-finite values outside the -inf pattern"


def causal_ragged(ext_lens, total_lens):
  """ks/ke (int32 numpy) for requests extending by ext_lens tokens to total_lens each."""
  ks, ke, start = [], [], 0
  for e, t in zip(ext_lens, total_lens):
    prefix = t - e
    for p in range(e):
      ks.append(start)
      ke.append(start + prefix + p + 1)
    start += t
  return np.asarray(ks, np.int32), np.asarray(ke, np.int32), start


def random_problem(rng, T, S, H=64, D=128, *, ks=None, ke=None):
  """fp8 q/k, scales and weights as the indexer produces them (bf16-rounded inputs).

  Returns a dict with the quantized inputs and the un-quantized bf16 q/k (float32 arrays)."""
  q = rng.standard_normal((T, H, D)).astype(np.float32)
  k = rng.standard_normal((S, D)).astype(np.float32)
  q = np.asarray(jnp.asarray(q, jnp.bfloat16).astype(jnp.float32))
  k = np.asarray(jnp.asarray(k, jnp.bfloat16).astype(jnp.float32))
  q8, qs = act_quant(jnp.asarray(q))
  k8, kscale = act_quant(jnp.asarray(k))
  w_raw = rng.standard_normal((T, H)).astype(np.float32)
  weights = jnp.asarray(w_raw * H ** -0.5 * np.asarray(qs)[..., 0] * D ** -0.5, jnp.float32)
  if ks is None:
    ks = rng.integers(0, S, T).astype(np.int32)
    ke = np.minimum(ks + rng.integers(0, S + 1, T), S).astype(np.int32)
  return dict(q_fp8=q8, k_fp8=k8, k_scale=kscale[:, 0], weights=weights,
              ks=jnp.asarray(ks, jnp.int32), ke=jnp.asarray(ke, jnp.int32),
              q=q, k=k, w_raw=w_raw, q_scale=np.asarray(qs)[..., 0])


def mqa_logits_np(q, k, k_scale, weights, ks, ke):
  """float64 numpy oracle of the ragged logits, -inf outside [ks, ke)."""
  q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
  s = np.maximum(np.einsum("thd,sd->ths", q, k), 0.0)
  out = np.einsum("ths,th->ts", s, np.asarray(weights, np.float64)) * np.asarray(k_scale, np.float64)
  j = np.arange(k.shape[0])
  valid = (j[None] >= np.asarray(ks)[:, None]) & (j[None] < np.asarray(ke)[:, None])
  return np.where(valid, out, -np.inf)


def dequantized(p):
  """float32 numpy q [T,H,D] and k [S,D] reconstructed from the fp8 inputs (k scale separate)."""
  return np.asarray(p["q_fp8"].astype(jnp.float32)), np.asarray(p["k_fp8"].astype(jnp.float32))


def paged_problem(rng, context_lens, next_n=1, H=64, D=128, *, extra_pages=3, max_context_len=None):
  """A shuffled paged cache holding each request's keys, and its block table.

  Returns dict with q_fp8 [B,n,H,D], cache (IndexKCache), weights [B*n,H], context_lens,
  block_tables, max_context_len, and the per-request float32 dequantized keys for oracles."""
  from nsa_jax.cache import IndexKCache
  context_lens = np.asarray(context_lens, np.int32)
  B = len(context_lens)
  L = max_context_len or max(int(context_lens.max()), 1)
  pages_per = [-(-int(c) // 64) for c in context_lens]
  max_pages = max(max(pages_per), -(-L // 64), 1)
  P = sum(pages_per) + extra_pages
  perm = rng.permutation(P)
  tables = np.full((B, max_pages), -1, np.int32)  # entries past the last page: never read
  c = 0
  for b, n_p in enumerate(pages_per):
    tables[b, :n_p] = perm[c:c + n_p]
    c += n_p
  k = jnp.asarray(rng.standard_normal((P * 64, D)), jnp.bfloat16).astype(jnp.float32)
  k8, ks = act_quant(k)
  cache = IndexKCache(k8.reshape(P, 64, D), ks.reshape(P, 64))
  q = jnp.asarray(rng.standard_normal((B, next_n, H, D)), jnp.bfloat16).astype(jnp.float32)
  q8, qs = act_quant(q)
  w = rng.standard_normal((B * next_n, H)).astype(np.float32)
  w = jnp.asarray(w * H ** -0.5 * D ** -0.5 * np.asarray(qs).reshape(B * next_n, H))
  return dict(q_fp8=q8, cache=cache, weights=w, context_lens=jnp.asarray(context_lens),
              block_tables=jnp.asarray(tables), max_context_len=L)


def paged_mqa_logits_np(p):
  """float64 numpy oracle of paged decode logits, -inf at invalid tokens."""
  q = np.asarray(p["q_fp8"].astype(jnp.float32), np.float64)
  B, n, H, D = q.shape
  kp = np.asarray(p["cache"].k_fp8.astype(jnp.float32), np.float64)
  sp = np.asarray(p["cache"].k_scale, np.float64)
  w = np.asarray(p["weights"], np.float64).reshape(B, n, H)
  L = p["max_context_len"]
  out = np.full((B, n, L), -np.inf)
  for b in range(B):
    ctx = int(p["context_lens"][b])
    for t in range(n):
      last = min(ctx, ctx - n + t + 1, L)
      for pos in range(max(last, 0)):
        page = int(p["block_tables"][b, pos // 64])
        s = np.maximum(kp[page, pos % 64] @ q[b, t].T, 0.0)
        out[b, t, pos] = (s * w[b, t]).sum() * sp[page, pos % 64]
  return out.reshape(B * n, L)


def topk_sets_np(logits, ks, ke, k):
  """Per row, the set of valid indices whose value beats the k-th largest strictly, and the
  threshold value: any correct top-k contains the former and fills the rest with ties."""
  logits = np.asarray(logits, np.float64)
  out = []
  for i in range(logits.shape[0]):
    lo, hi = max(int(ks[i]), 0), min(int(ke[i]), logits.shape[1])
    idx = np.arange(lo, max(hi, lo))
    vals = np.where(np.isnan(logits[i, idx]), -np.inf, logits[i, idx])
    if len(idx) <= k:
      out.append((set(idx.tolist()), None, len(idx)))
      continue
    thr = np.sort(vals)[::-1][k - 1]
    out.append((set(idx[vals > thr].tolist()), thr, k))
  return out


def assert_valid_topk(result, logits, ks, ke, k):
  """Checks a top-k result against the oracle allowing any choice among threshold ties."""
  result = np.asarray(result)
  logits = np.asarray(logits, np.float64)
  for i, (must, thr, n) in enumerate(topk_sets_np(logits, ks, ke, k)):
    row = result[i]
    assert (row[n:] == -1).all(), f"row {i}: expected -1 after {n} entries, got {row}"
    chosen = row[:n]
    assert len(set(chosen.tolist())) == n, f"row {i}: duplicates or -1 in {chosen}"
    assert must <= set(chosen.tolist()), f"row {i}: misses {sorted(must - set(chosen.tolist()))[:8]}"
    if thr is not None:
      extra = sorted(set(chosen.tolist()) - must)
      vals = np.where(np.isnan(logits[i, extra]), -np.inf, logits[i, extra])
      assert (vals == thr).all(), f"row {i}: picked non-tied keys {extra[:8]}"
      assert ((chosen >= ks[i]) & (chosen < ke[i])).all()
