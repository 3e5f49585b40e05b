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
