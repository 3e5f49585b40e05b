"""paged_topk_slots: top-k of paged-decode logits as physical cache slots."""

import jax.numpy as jnp
import numpy as np
import pytest

import nsa_jax
from nsa_jax.topk_slots import decode_key_range, paged_topk_slots
from tests.helpers import paged_problem


def _slots_np(logits, context_lens, tables, next_n, k):
  """Per row, the set of slots of the k largest valid logits (distinct values assumed)."""
  out = []
  L = logits.shape[1]
  for r in range(logits.shape[0]):
    b, t = divmod(r, next_n)
    ctx = int(context_lens[b])
    ke = max(0, min(ctx - next_n + t + 1, ctx, L))
    v = np.where(np.isnan(logits[r, :ke]), -np.inf, logits[r, :ke])
    chosen = np.argsort(-v, kind="stable")[:k] if ke > k else np.arange(ke)
    out.append({int(tables[b, p // 64]) * 64 + int(p % 64) for p in chosen})
  return out


def test_decode_key_range():
  ke = np.asarray(decode_key_range(jnp.asarray([5, 0, 300], jnp.int32), 2, 256))
  np.testing.assert_array_equal(ke, [4, 5, 0, 0, 256, 256])
  ke = np.asarray(decode_key_range(jnp.asarray([5, 2, 300], jnp.int32), 4, 256))
  np.testing.assert_array_equal(ke, [2, 3, 4, 5, 0, 0, 1, 2, 256, 256, 256, 256])


def test_paged_topk_slots_next_n_range():
  logits = jnp.zeros((5, 64), jnp.float32)
  with pytest.raises(ValueError, match=r"^paged_topk_slots: next_n must be in 1\.\.4 \(the "
                     r"tested range\), got next_n=5 from the next_n argument$"):
    paged_topk_slots(logits, jnp.asarray([10], jnp.int32), jnp.zeros((1, 1), jnp.int32),
                     next_n=5, backend="xla")


@pytest.mark.parametrize("next_n", [1, 2, 3, 4])
@pytest.mark.parametrize("backend", ["xla", "interpret"])
def test_paged_topk_slots(next_n, backend):
  rng = np.random.default_rng(next_n)
  p = paged_problem(rng, [300, 17, 129, 0], next_n=next_n, H=8, D=128)
  logits = nsa_jax.paged_mqa_logits(p["q_fp8"], p["cache"], p["weights"], p["context_lens"],
                                    p["block_tables"], max_context_len=p["max_context_len"],
                                    backend="xla")
  k = 64
  kw = dict(backend="pallas", interpret=True) if backend == "interpret" else dict(backend="xla")
  slots = np.asarray(paged_topk_slots(logits, p["context_lens"], p["block_tables"],
                                      next_n=next_n, k=k, num_pages=p["cache"].num_pages, **kw))
  assert slots.shape == (logits.shape[0], k) and slots.dtype == np.int32
  want = _slots_np(np.asarray(logits), np.asarray(p["context_lens"]),
                   np.asarray(p["block_tables"]), next_n, k)
  for r, w in enumerate(want):
    got = slots[r][slots[r] >= 0]
    assert len(got) == len(w) and set(got.tolist()) == w, f"row {r}"
    assert (slots[r][len(w):] == -1).all()


def test_paged_topk_slots_bad_pages_are_minus_one():
  # Request 0's second page id is outside the cache: its tokens have -inf logits and, being
  # among the <= k valid ones, are returned, as -1 rather than a bogus slot.
  logits = jnp.asarray(np.random.default_rng(0).standard_normal((1, 128)), jnp.float32)
  logits = logits.at[0, 64:].set(-jnp.inf)
  tables = jnp.asarray([[3, 99]], jnp.int32)
  slots = np.asarray(paged_topk_slots(logits, jnp.asarray([128], jnp.int32), tables, next_n=1,
                                      k=256, num_pages=10, backend="xla"))
  np.testing.assert_array_equal(np.sort(slots[0][:64]), 3 * 64 + np.arange(64))
  assert (slots[0][64:] == -1).all()


def test_paged_topk_slots_checks_shapes():
  with pytest.raises(ValueError, match="B \\* next_n"):
    paged_topk_slots(jnp.zeros((3, 64), jnp.float32), jnp.zeros((2,), jnp.int32),
                     jnp.zeros((2, 1), jnp.int32), next_n=1, backend="xla")
