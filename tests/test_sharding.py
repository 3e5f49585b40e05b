"""prefill_topk over a 4-device CPU mesh: query- and key-split equal one device, no recompiles,
with any one-axis mesh (jax.make_mesh Explicit or Auto, Mesh(...)), input layout and jit."""

import jax
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

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


# --------------------------------------------------------------------------- any one-axis mesh

MESHES = {
    "jax.make_mesh": lambda: jax.make_mesh((4,), ("x",)),                      # Explicit
    "jax.make_mesh(Auto)": lambda: jax.make_mesh((4,), ("x",), axis_types=(AxisType.Auto,)),
    "Mesh": lambda: Mesh(np.asarray(jax.devices()), ("x",)),                    # Auto
}


def _layout(args, how, mesh):
  if how == "plain":
    return args
  if how == "device0":
    return tuple(jax.device_put(a, jax.devices()[0]) for a in args)
  return tuple(jax.device_put(a, NamedSharding(mesh, P("x"))) for a in args)


# Arrays committed to one device cannot enter a user's jit that runs on a mesh (jax's rule
# for any jit); eagerly, prefill_topk moves them onto the mesh.
LAYOUT_CALLS = [(layout, call) for layout in ("plain", "device0", "sharded")
                for call in ("eager", "jit", "jit+set_mesh")
                if layout != "device0" or call == "eager"]


@pytest.mark.parametrize("layout,call", LAYOUT_CALLS)
@pytest.mark.parametrize("kind", list(MESHES))
def test_any_mesh_layout_and_call(kind, layout, call):
  """Meshes from jax.make_mesh (Explicit, Auto) and Mesh(...), inputs unsharded, committed to
  one device or sharded over the mesh, eager or in a user's jit: one device's result, laid
  out by rows over the mesh."""
  mesh = MESHES[kind]()
  assert nsa_jax.prime_mesh(mesh) >= 1
  assert all(budget.cached_budget(d) is not None for d in mesh.devices.flat)
  rng = np.random.default_rng(7)
  args, b = ragged_inputs(rng, [40, 3, 20], [100, 0, 60])       # T_pad 64, S_pad 256
  ref = np.asarray(reference_topk(args, 16))
  args = _layout(args, layout, mesh)
  for split in ("queries", "keys"):
    f = lambda *a: nsa_jax.prefill_topk(*a, k=16, mesh=mesh, split=split)
    if call == "eager":
      out = f(*args)
    elif call == "jit":
      out = jax.jit(f)(*args)
    else:
      with jax.set_mesh(mesh):
        out = jax.jit(f)(*args)
    np.testing.assert_array_equal(np.asarray(out), ref, err_msg=split)
    assert out.sharding.device_set == set(mesh.devices.flat)
    assert out.sharding.spec in (P("x", None), P("x")), (split, out.sharding)
    assert {s.data.shape for s in out.addressable_shards} == {(b.T_pad // 4, 16)}


@pytest.mark.parametrize("kind", list(MESHES))
@pytest.mark.parametrize("split", ["queries", "keys"])
def test_any_mesh_uneven_rows(kind, split):
  # T = 13 rows cannot be split evenly: an Explicit mesh returns them replicated.
  mesh = MESHES[kind]()
  rng = np.random.default_rng(8)
  args, _ = ragged_inputs(rng, [9, 4], [10, 7], token_buckets=[13], key_buckets=[30])
  ref = np.asarray(reference_topk(args, 16))
  for f in (nsa_jax.prefill_topk, jax.jit(nsa_jax.prefill_topk,
                                          static_argnames=("k", "mesh", "split"))):
    out = f(*args, k=16, mesh=mesh, split=split)
    np.testing.assert_array_equal(np.asarray(out), ref)
    assert out.sharding.device_set == set(mesh.devices.flat)
    if kind == "jax.make_mesh":
      assert out.sharding.is_fully_replicated


@pytest.mark.parametrize("kind", list(MESHES))
def test_any_mesh_empty_batch(kind):
  mesh = MESHES[kind]()
  rng = np.random.default_rng(9)
  args, _ = ragged_inputs(rng, [9, 4], [10, 7], token_buckets=[16], key_buckets=[32])
  empty = (args[0][:0], args[1], args[2], args[3][:0], args[4][:0], args[5][:0])
  for split in ("queries", "keys"):
    out = nsa_jax.prefill_topk(*empty, k=8, mesh=mesh, split=split)
    assert out.shape == (0, 8) and out.dtype == np.int32
    no_keys = (args[0], args[1][:0], args[2][:0], args[3], 0 * args[4], 0 * args[5])
    out = nsa_jax.prefill_topk(*no_keys, k=8, mesh=mesh, split=split)
    np.testing.assert_array_equal(np.asarray(out), -np.ones((16, 8), np.int32))


def test_checking_under_a_mesh():
  mesh = jax.make_mesh((4,), ("x",))
  nsa_jax.prime_mesh(mesh)
  rng = np.random.default_rng(10)
  args, _ = ragged_inputs(rng, [40, 20], [100, 60])
  ke = np.asarray(args[5]).copy()
  ke[7] = 10_000
  bad = args[:5] + (jax.device_put(ke),)
  f = jax.jit(lambda *a: nsa_jax.prefill_topk(*a, k=8, mesh=mesh, split="keys"))
  f(*bad).block_until_ready()
  with pytest.raises(ValueError, match=r"^prefill_topk: .*ke\[7\] = 10000 > S=256$"):
    with nsa_jax.checking():
      f(*bad)
  with nsa_jax.checking(), pytest.raises(ValueError, match=r"ke\[7\] = 10000 > S=256"):
    nsa_jax.prefill_topk(*bad, k=8, mesh=mesh)
