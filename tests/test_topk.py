"""Top-k selection: reference / xla backend against numpy sets (ties allowed at threshold)."""

import jax.numpy as jnp
import numpy as np
import pytest

import nsa_jax
from tests.helpers import assert_valid_topk


def _rows(rng, T, S):
  ks = rng.integers(0, S, T).astype(np.int32)
  ke = np.minimum(ks + rng.integers(0, S + 1, T), S).astype(np.int32)
  return ks, ke


@pytest.mark.parametrize("case", ["distinct", "ties", "all_neg_inf", "few_valid", "k_gt_S", "nan"])
def test_topk_xla(case):
  rng = np.random.default_rng(hash(case) % 2**32)
  T, S, k = 9, 300, 64
  x = rng.standard_normal((T, S)).astype(np.float32)
  ks, ke = _rows(rng, T, S)
  if case == "ties":
    x = np.round(x * 2) / 2
  elif case == "all_neg_inf":
    x[:] = -np.inf
  elif case == "few_valid":
    ke = np.minimum(ks + 5, S).astype(np.int32)
  elif case == "k_gt_S":
    k = 512
  elif case == "nan":
    x[rng.random(x.shape) < 0.1] = np.nan
  out = nsa_jax.topk_indices(jnp.asarray(x), jnp.asarray(ks), jnp.asarray(ke), k=k, backend="xla")
  assert out.shape == (T, k) and out.dtype == jnp.int32
  assert_valid_topk(out, x, ks, ke, k)


def test_topk_distinct_equals_lax_sort_order():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((4, 100)).astype(np.float32)
  ks = np.zeros(4, np.int32)
  ke = np.full(4, 100, np.int32)
  out = np.asarray(nsa_jax.topk_indices(jnp.asarray(x), jnp.asarray(ks), jnp.asarray(ke), k=10,
                                        backend="xla"))
  np.testing.assert_array_equal(out, np.argsort(-x, axis=1)[:, :10])
