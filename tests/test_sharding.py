"""prefill_topk over a 4-device CPU mesh: query- and key-split equal one device, no recompiles."""

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

import nsa_jax
from nsa_jax import budget
from tests.test_prefill_topk import count_compiles, ragged_inputs, reference_topk


@pytest.fixture(autouse=True)
def clean_budget(monkeypatch):
  monkeypatch.setattr(budget, "SKIP_CHUNK_ELEMENTS", 0)   # let CPU-sized problems chunk
  budget.reset()
  yield
  budget.reset()


@pytest.fixture(scope="module")
def mesh():
  assert len(jax.devices()) == 4, "tests/conftest.py asks XLA for 4 host devices"
  return nsa_jax.make_mesh(axis_name="shards")


@pytest.mark.parametrize("split", ["queries", "keys"])
@pytest.mark.parametrize("budget_bytes", [None, 4 * 64 * 4])    # unchunked / 4-row chunks
def test_sharded_equals_single_device(mesh, split, budget_bytes):
  rng = np.random.default_rng(0)
  args, b = ragged_inputs(rng, [40, 3, 20], [100, 0, 60])       # T_pad 64, S_pad 256
  ref = np.asarray(reference_topk(args, 48))
  nsa_jax.prime_mesh(mesh)
  out = nsa_jax.prefill_topk(*args, k=48, mesh=mesh, split=split, budget_bytes=budget_bytes)
  assert out.shape == (b.T_pad, 48)
  assert out.sharding.spec == P("shards", None) or out.sharding.spec == P("shards")
  assert {s.data.shape for s in out.addressable_shards} == {(b.T_pad // 4, 48)}
  np.testing.assert_array_equal(np.asarray(out), ref)


@pytest.mark.parametrize("split", ["queries", "keys"])
def test_uneven_sizes_and_k_beyond_a_shard(mesh, split):
  # T = 13 and S = 30 do not divide by 4 devices; k = 16 exceeds the 8 keys of a key shard.
  rng = np.random.default_rng(1)
  args, b = ragged_inputs(rng, [9, 4], [10, 7], token_buckets=[13], key_buckets=[30])
  ref = np.asarray(reference_topk(args, 16))
  out = nsa_jax.prefill_topk(*args, k=16, mesh=mesh, split=split, budget_bytes=4 * 8 * 2)
  np.testing.assert_array_equal(np.asarray(out), ref)


@pytest.mark.parametrize("split", ["queries", "keys"])
def test_no_extra_compiles_per_call(mesh, split):
  nsa_jax.prime_mesh(mesh)
  rng = np.random.default_rng(2)
  kw = dict(token_buckets=[64], key_buckets=[256])
  args, _ = ragged_inputs(rng, [40, 20], [100, 60], **kw)
  nsa_jax.prefill_topk(*args, k=32, mesh=mesh, split=split).block_until_ready()
  reference_topk(args, 32).block_until_ready()              # compiled outside the count
  with count_compiles() as compiles:
    for ext, pre in [([10, 50], [30, 100]), ([64], [192]), ([1, 1, 1], [5, 6, 7])]:
      args, _ = ragged_inputs(rng, ext, pre, **kw)
      out = nsa_jax.prefill_topk(*args, k=32, mesh=mesh, split=split)
      np.testing.assert_array_equal(np.asarray(out), np.asarray(reference_topk(args, 32)))
  assert compiles == []


def test_prime_mesh_primes_every_device(mesh, monkeypatch):
  calls = []
  monkeypatch.setattr(budget, "query_device_memory", lambda d: calls.append(d) or (8 << 30, 80 << 30))
  assert nsa_jax.prime_mesh(mesh) == 4 << 30
  assert sorted(d.id for d in calls) == [0, 1, 2, 3]
  assert all(budget.cached_budget(d) == 4 << 30 for d in mesh.devices.flat)
  rng = np.random.default_rng(3)
  args, _ = ragged_inputs(rng, [10], [10])
  nsa_jax.prefill_topk(*args, k=8, mesh=mesh, split="keys")
  assert len(calls) == 4


def test_sharded_inside_user_jit(mesh):
  nsa_jax.prime_mesh(mesh)
  rng = np.random.default_rng(4)
  args, _ = ragged_inputs(rng, [30, 30], [40, 50])
  f = jax.jit(lambda *a: nsa_jax.prefill_topk(*a, k=24, mesh=mesh, split="keys"))
  np.testing.assert_array_equal(np.asarray(f(*args)), np.asarray(reference_topk(args, 24)))


def test_mesh_errors(mesh):
  rng = np.random.default_rng(5)
  args, _ = ragged_inputs(rng, [3], [2])
  two_axes = Mesh(np.asarray(jax.devices()).reshape(2, 2), ("a", "b"))
  with pytest.raises(ValueError, match="mesh must have exactly one axis"):
    nsa_jax.prefill_topk(*args, k=4, mesh=two_axes)
  with pytest.raises(ValueError, match="mesh must be a jax.sharding.Mesh"):
    nsa_jax.prefill_topk(*args, k=4, mesh=jax.devices())
  with pytest.raises(ValueError, match=r"split must be one of \('queries', 'keys'\)"):
    nsa_jax.prefill_topk(*args, k=4, mesh=mesh, split="rows")
