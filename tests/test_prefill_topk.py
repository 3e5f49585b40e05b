"""prefill_topk: chunked == unchunked, traceable, no per-call queries or compiles, bounded memory."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import nsa_jax
from nsa_jax import budget, ops
from nsa_jax.batch import build_ragged_batch
from tests.helpers import count_compiles

KiB, GiB = 2 ** 10, 2 ** 30


def ragged_inputs(rng, ext, pre, *, H=4, D=128, **buckets):
  """Device arrays for a bucket-padded ragged batch, placed with device_put (jnp.asarray would
  compile a conversion per shape and spoil the compile counts). Returns (args, batch)."""
  b = build_ragged_batch(ext, pre, **buckets)
  T, S = b.T_pad, b.S_pad
  host = (rng.standard_normal((T, H, D)).astype(ml_dtypes.float8_e4m3fn),
          rng.standard_normal((S, D)).astype(ml_dtypes.float8_e4m3fn),
          rng.uniform(0.5, 1.5, S).astype(np.float32),
          rng.standard_normal((T, H)).astype(np.float32), b.ks, b.ke)
  return tuple(jax.device_put(x) for x in host), b


def reference_topk(args, k):
  q, kf, sc, w, ks, ke = args
  return ops.topk_indices(ops.mqa_logits(q, kf, sc, w, ks, ke, backend="xla"), ks, ke, k=k,
                          backend="xla")


@pytest.fixture(autouse=True)
def clean_budget():
  budget.reset()
  yield
  budget.reset()


@pytest.fixture
def small_problems(monkeypatch):
  """Lets CPU-sized problems chunk: sglang skips chunking below 8M logits."""
  monkeypatch.setattr(budget, "SKIP_CHUNK_ELEMENTS", 0)


@pytest.fixture
def fake_memory(monkeypatch):
  state = dict(free=64 * GiB, total=80 * GiB, calls=0)

  def fake(device):
    state["calls"] += 1
    return state["free"], state["total"]

  monkeypatch.setattr(budget, "query_device_memory", fake)
  return state


@pytest.mark.parametrize("budget_bytes", [None, 10 ** 9, 300 * 4 * 16, 300 * 4 * 5, 1])
def test_chunked_equals_unchunked(small_problems, budget_bytes):
  rng = np.random.default_rng(0)
  args, b = ragged_inputs(rng, [60, 3, 30], [100, 0, 40])       # T_pad 128, S_pad 256
  ref = np.asarray(reference_topk(args, 32))
  out = nsa_jax.prefill_topk(*args, k=32, budget_bytes=budget_bytes)
  assert out.shape == (b.T_pad, 32) and out.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(out), ref)
  assert (np.asarray(out)[~b.token_mask] == -1).all()            # padding rows come back -1


def test_k_larger_than_keys_and_empty_rows(small_problems):
  rng = np.random.default_rng(1)
  args, b = ragged_inputs(rng, [5, 0, 7], [2, 4, 0])              # S = 18 keys, k = 64
  ref = np.asarray(reference_topk(args, 64))
  out = np.asarray(nsa_jax.prefill_topk(*args, k=64, budget_bytes=4 * 32 * 3))
  np.testing.assert_array_equal(out, ref)
  n_valid = (b.ke - b.ks)[:, None]
  assert ((out >= 0) == (np.arange(64)[None] < n_valid)).all()


def test_plan_uses_the_cached_budget(small_problems, fake_memory):
  fake_memory["free"] = 2 * 16 * 256 * 4                           # 16 rows of 256 keys
  assert budget.prime() == 16 * 256 * 4
  plan = nsa_jax.prefill.plan_for(128, 256)
  assert (plan.rows, plan.num_chunks) == (16, 8)
  assert nsa_jax.prefill.plan_for(128, 256, budget_bytes=10 ** 9).num_chunks == 1


def test_traceable_inside_user_jit(small_problems):
  rng = np.random.default_rng(2)
  args, _ = ragged_inputs(rng, [50, 20], [10, 90])
  budget.prime()

  @jax.jit
  def user(q, kf, sc, w, ks, ke):
    return nsa_jax.prefill_topk(q, kf, sc, w, ks, ke, k=16, budget_bytes=4 * 256 * 8) + 0

  np.testing.assert_array_equal(np.asarray(user(*args)), np.asarray(reference_topk(args, 16)))


def test_no_queries_after_prime(fake_memory):
  budget.prime()
  rng = np.random.default_rng(3)
  for _ in range(5):
    ext = rng.integers(1, 30, 2)
    args, _ = ragged_inputs(rng, ext, rng.integers(0, 30, 2))
    nsa_jax.prefill_topk(*args, k=8).block_until_ready()
  assert fake_memory["calls"] == 1


def test_same_shape_calls_compile_nothing(small_problems):
  budget.prime()
  rng = np.random.default_rng(4)
  args, _ = ragged_inputs(rng, [40, 20], [30, 10])
  f = lambda *a: nsa_jax.prefill_topk(*a, k=16, budget_bytes=4 * 128 * 8)
  f(*args).block_until_ready()
  with count_compiles() as compiles:
    for ext, pre in [([1, 58], [5, 30]), ([33, 7], [0, 10]), ([60], [68])]:
      args, b = ragged_inputs(rng, ext, pre, token_buckets=[64], key_buckets=[128])
      f(*args).block_until_ready()
  assert compiles == []


def test_sweep_compiles_at_most_once_per_bucket(small_problems, fake_memory):
  fake_memory["free"] = 2 * 4 * 64 * 256                          # forces chunking at larger buckets
  budget.prime()
  rng = np.random.default_rng(5)
  seen = set()
  with count_compiles() as compiles:
    for _ in range(100):
      n = int(rng.integers(1, 4))
      args, b = ragged_inputs(rng, rng.integers(1, 40, n), rng.integers(0, 60, n), H=2)
      out = nsa_jax.prefill_topk(*args, k=8)
      assert (np.asarray(out)[~b.token_mask] == -1).all()
      seen.add((b.T_pad, b.S_pad))
  assert 1 <= len(compiles) <= len(seen), (len(compiles), sorted(seen))
  print(f"sweep: {len(compiles)} compiles for {len(seen)} buckets")
  assert fake_memory["calls"] == 1


def test_transfer_guard_disallow_on_hot_call(small_problems):
  budget.prime()
  rng = np.random.default_rng(6)
  args, _ = ragged_inputs(rng, [40, 20], [30, 10])
  ref = nsa_jax.prefill_topk(*args, k=16, budget_bytes=4 * 128 * 8)
  with jax.transfer_guard("disallow"):
    out = nsa_jax.prefill_topk(*args, k=16, budget_bytes=4 * 128 * 8)
    out.block_until_ready()
    out2 = nsa_jax.prefill_topk(*args, k=16)                       # the cached budget
    out2.block_until_ready()
  np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))
  np.testing.assert_array_equal(np.asarray(out2), np.asarray(ref))


def test_small_free_memory_bounds_temp_memory(small_problems, fake_memory):
  rng = np.random.default_rng(7)
  args, _ = ragged_inputs(rng, [500], [524])                      # T_pad 512, S_pad 1024
  fake_memory["free"] = 2 * 64 * KiB                               # budget: 64 KiB = 16 rows
  budget.prime()

  def temp_bytes(**kw):
    f = jax.jit(lambda *a: nsa_jax.prefill_topk(*a, k=64, **kw))
    return f.lower(*args).compile().memory_analysis().temp_size_in_bytes, f(*args)

  full, out_full = temp_bytes(budget_bytes=10 ** 9)
  chunked, out_chunked = temp_bytes()
  assert nsa_jax.prefill.plan_for(512, 1024).rows == 16
  assert full >= 512 * 1024 * 4                                     # the whole logits
  assert chunked < full / 4, (chunked, full)
  np.testing.assert_array_equal(np.asarray(out_chunked), np.asarray(out_full))


@pytest.mark.parametrize("kw, match", [
    (dict(k=0), "prefill_topk: k must be a static int >= 1"),
    (dict(budget_bytes=0), "prefill_topk: budget_bytes must be a static int >= 1 or None, got 0"),
    (dict(budget_bytes=1.5), "budget_bytes"),
    (dict(split="keys"), "split applies only with a mesh"),
    (dict(backend="cuda"), "backend must be one of"),
])
def test_argument_errors(kw, match):
  rng = np.random.default_rng(8)
  args, _ = ragged_inputs(rng, [3], [2])
  with pytest.raises(ValueError, match=match):
    nsa_jax.prefill_topk(*args, **kw)


def test_shape_errors_name_the_argument():
  rng = np.random.default_rng(9)
  args, _ = ragged_inputs(rng, [3], [2])
  q, kf, sc, w, ks, ke = args
  with pytest.raises(ValueError, match=r"prefill_topk: weights must have shape \[16, 4\]"):
    nsa_jax.prefill_topk(q, kf, sc, w[:, :2], ks, ke)
  with pytest.raises(ValueError, match="prefill_topk: ke must have dtype int32"):
    nsa_jax.prefill_topk(q, kf, sc, w, ks, ke.astype(jnp.float32))


@pytest.mark.gpu
def test_gpu_auto_backend_chunked_matches_unchunked():
  rng = np.random.default_rng(10)
  args, b = ragged_inputs(rng, [3000, 1000], [1000, 3000], H=64)  # T_pad 4096, S_pad 8192
  budget.prime()
  full = np.asarray(nsa_jax.prefill_topk(*args, k=2048, budget_bytes=2 ** 40))
  chunked = np.asarray(nsa_jax.prefill_topk(*args, k=2048, budget_bytes=8192 * 4 * 512))
  same = [set(a[a >= 0]) == set(c[c >= 0]) for a, c in zip(full, chunked)]
  assert np.mean(same) > 0.99
  ref = np.asarray(reference_topk(args, 2048))
  overlap = np.mean([len(set(a[a >= 0]) & set(r[r >= 0])) / max(1, (r >= 0).sum())
                     for a, r in zip(chunked[:b.num_tokens], ref[:b.num_tokens])])
  assert overlap > 0.99


def test_key_split_candidates_list_ties_in_ascending_index():
  """The key-split merge (nsa_jax.sharding) ranks candidate lists with lax.top_k, which keeps
  the tie rule only if equal logits come in ascending index within a list: the chunk top-k
  with keys (the merge's input) must give that order with the Pallas kernels too."""
  from nsa_jax import prefill
  rng = np.random.default_rng(7)
  args, b = ragged_inputs(rng, [24, 8], [1200, 0], H=16)   # > 512 keys: several tiles
  q, kf, sc, w, ks, ke = args
  # Every 100th key repeats key 0 (one scale for all): a group of ~12 equal logits per query,
  # spread over several kernel tiles.
  kf = np.asarray(kf).copy()
  kf[::100] = kf[0]
  kf, sc = jax.device_put(kf), jax.device_put(np.ones(sc.shape, np.float32))
  plan = prefill.plan_for(b.T_pad, b.S_pad, budget_bytes=1 << 30)
  # k = 600 of ~1200 keys: the group is chosen whole in about half the rows.
  idx, keys = prefill.chunked_topk(q, kf, sc, w, ks, ke, plan=plan, k=600, backend="pallas",
                                   interpret=True, with_keys=True)
  ref = np.asarray(reference_topk((q, kf, sc, w, ks, ke), 600))
  idx, keys = np.asarray(idx), np.asarray(keys)
  np.testing.assert_array_equal(np.sort(idx, axis=1), np.sort(ref, axis=1))
  ties = 0
  for r in range(idx.shape[0]):
    for v in np.unique(keys[r][idx[r] >= 0]):
      at = idx[r][(keys[r] == v) & (idx[r] >= 0)]
      ties += len(at) > 1
      assert (np.diff(at) > 0).all(), f"row {r}: equal logits out of index order: {at}"
  assert ties > 0   # the input does tie
