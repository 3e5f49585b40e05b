"""IndexKCache: slot writes, the sglang/DeepGEMM byte layout, pytree behaviour."""

import jax
import jax.numpy as jnp
import numpy as np

from nsa_jax import IndexKCache, act_quant


def test_write_then_read_and_skip_bad_slots():
  rng = np.random.default_rng(0)
  cache = IndexKCache.create(5)
  k8, s = act_quant(jnp.asarray(rng.standard_normal((4, 128)), jnp.float32))
  slots = jnp.array([0, 130, -1, 5 * 64], jnp.int32)  # -1 and one past the end are skipped
  new = jax.jit(IndexKCache.write)(cache, slots, k8, s)
  kf = np.asarray(new.k_fp8.astype(jnp.float32)).reshape(-1, 128)
  sf = np.asarray(new.k_scale).reshape(-1)
  np.testing.assert_array_equal(kf[[0, 130]], np.asarray(k8.astype(jnp.float32))[[0, 1]])
  np.testing.assert_array_equal(sf[[0, 130]], np.asarray(s)[[0, 1], 0])
  assert np.count_nonzero(sf) == 2


def test_byte_layout_round_trip_and_offsets():
  rng = np.random.default_rng(1)
  k8, s = act_quant(jnp.asarray(rng.standard_normal((3 * 64, 128)), jnp.float32))
  cache = IndexKCache(k8.reshape(3, 64, 128), s.reshape(3, 64))
  data = np.asarray(cache.to_bytes())
  assert data.shape == (3, 64 * 132) and data.dtype == np.uint8
  # Page 1, token 7: fp8 bytes at 7*128, its scale as little-endian float32 at 64*128 + 7*4.
  np.testing.assert_array_equal(data[1, 7 * 128:8 * 128],
                                np.asarray(k8[64 + 7]).view(np.uint8))
  np.testing.assert_equal(data[1, 64 * 128 + 28:64 * 128 + 32].view("<f4")[0], np.asarray(s)[71, 0])
  back = IndexKCache.from_bytes(jnp.asarray(data))
  np.testing.assert_array_equal(np.asarray(back.k_fp8).view(np.uint8),
                                np.asarray(cache.k_fp8).view(np.uint8))
  np.testing.assert_array_equal(np.asarray(back.k_scale), np.asarray(cache.k_scale))


def test_cache_is_a_pytree():
  cache = IndexKCache.create(2)
  leaves = jax.tree_util.tree_leaves(cache)
  assert len(leaves) == 2
  same = jax.tree_util.tree_map(lambda x: x, cache)
  assert isinstance(same, IndexKCache) and same.num_pages == 2 and same.head_dim == 128


def test_token_slots_then_paged_read_gives_back_what_was_written():
  """Decode-style writes: slots from the block table and positions, then every written key
  reads back at its (request, position) through the table, and bad tokens are skipped."""
  from nsa_jax.cache import token_slots
  rng = np.random.default_rng(4)
  P, next_n = 9, 2
  tables = jnp.asarray([[7, 2, 5, -1], [0, 8, -1, -1]], jnp.int32)
  ctx = np.array([150, 65], np.int32)
  req = jnp.asarray(np.repeat([0, 1], next_n).tolist() + [1, 5, 0], jnp.int32)
  pos = jnp.asarray((np.repeat(ctx, next_n) - next_n + np.tile(np.arange(next_n), 2)).tolist()
                    + [200, 3, -1], jnp.int32)  # then: page id -1, request 5, position -1
  slots = np.asarray(jax.jit(token_slots)(tables, req, pos))
  assert slots.tolist() == [5 * 64 + 20, 5 * 64 + 21, 0 * 64 + 63, 8 * 64 + 0, -1, -1, -1]
  k8, s = act_quant(jnp.asarray(rng.standard_normal((7, 128)), jnp.float32))
  cache = jax.jit(IndexKCache.write)(IndexKCache.create(P), jnp.asarray(slots), k8, s)
  kf = np.asarray(cache.k_fp8.astype(jnp.float32))
  for i in range(4):
    b, p = int(req[i]), int(pos[i])
    page = int(tables[b, p // 64])
    np.testing.assert_array_equal(kf[page, p % 64], np.asarray(k8[i].astype(jnp.float32)))
    assert cache.k_scale[page, p % 64] == s[i, 0]
  assert np.count_nonzero(np.asarray(cache.k_scale)) == 4
