"""Host-side ragged batch builder: the spec's packing, padding, buckets, and value errors."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import nsa_jax
from nsa_jax.batch import build_ragged_batch
from tests.helpers import causal_ragged


def test_spec_example():
  # Two requests extending by [3, 2] tokens with total lengths [10, 4] (indexer.md).
  b = build_ragged_batch([3, 2], [7, 2])
  assert (b.num_tokens, b.num_keys, b.T_pad, b.S_pad) == (5, 14, 16, 16)
  np.testing.assert_array_equal(b.ks[:5], [0, 0, 0, 10, 10])
  np.testing.assert_array_equal(b.ke[:5], [8, 9, 10, 13, 14])
  np.testing.assert_array_equal(b.positions[:5], [7, 8, 9, 2, 3])
  np.testing.assert_array_equal(b.token_request[:5], [0, 0, 0, 1, 1])
  np.testing.assert_array_equal(b.token_slots[:5], [7, 8, 9, 12, 13])
  np.testing.assert_array_equal(b.key_starts, [0, 10])
  np.testing.assert_array_equal(b.key_positions[:14], list(range(10)) + list(range(4)))
  np.testing.assert_array_equal(b.key_request[:14], [0] * 10 + [1] * 4)
  # Padding: empty ranges, request -1, positions 0, key slots -1.
  assert (b.ks[5:] == 0).all() and (b.ke[5:] == 0).all() and (b.positions[5:] == 0).all()
  assert (b.token_request[5:] == -1).all() and (b.token_slots[5:] == -1).all()
  assert (b.key_positions[14:] == -1).all() and (b.key_request[14:] == -1).all()
  for a in (b.positions, b.ks, b.ke, b.token_request, b.token_slots, b.key_positions,
            b.key_request, b.key_starts):
    assert a.dtype == np.int32
  assert b.token_mask.sum() == 5 and b.key_mask.sum() == 14 and b.num_requests == 2


def test_given_buckets_and_exported():
  b = nsa_jax.build_ragged_batch(np.array([5]), np.array([0]), token_buckets=[8, 64],
                                 key_buckets=[6, 100])
  assert (b.T_pad, b.S_pad) == (8, 6)
  b = build_ragged_batch([9], [50], token_buckets=[8, 64], key_buckets=[6, 100])
  assert (b.T_pad, b.S_pad) == (64, 100)
  with pytest.raises(ValueError, match=r"sum\(extend_lens\)=65 exceeds the largest bucket 64"):
    build_ragged_batch([65], [0], token_buckets=[8, 64])


def test_empty_and_zero_length_requests():
  b = build_ragged_batch([], [])
  assert (b.num_tokens, b.num_keys, b.T_pad, b.S_pad) == (0, 0, 16, 16)
  assert (b.ks == b.ke).all() and (b.token_request == -1).all()
  b = build_ragged_batch([0, 2, 0], [3, 0, 0])
  np.testing.assert_array_equal(b.ks[:2], [3, 3])
  np.testing.assert_array_equal(b.ke[:2], [4, 5])
  np.testing.assert_array_equal(b.key_request[:5], [0, 0, 0, 1, 1])
  np.testing.assert_array_equal(b.key_starts, [0, 3, 5])


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 40), st.integers(0, 60)), max_size=8))
def test_matches_causal_packing(reqs):
  ext = [e for e, _ in reqs]
  pre = [p for _, p in reqs]
  b = build_ragged_batch(ext, pre)
  ks, ke, total = causal_ragged(ext, [e + p for e, p in reqs])
  T = len(ks)
  assert (b.num_tokens, b.num_keys) == (T, total)
  assert b.T_pad >= max(T, 1) and b.S_pad >= max(total, 1)
  np.testing.assert_array_equal(b.ks[:T], ks)
  np.testing.assert_array_equal(b.ke[:T], ke)
  real = b.token_request >= 0
  assert real.sum() == T
  # Each new token's own key slot belongs to it, at its position, and is the last key it sees.
  slots = b.token_slots[real]
  np.testing.assert_array_equal(b.key_request[slots], b.token_request[real])
  np.testing.assert_array_equal(b.key_positions[slots], b.positions[real])
  np.testing.assert_array_equal(slots + 1, b.ke[real])
  np.testing.assert_array_equal(b.ke[real] - b.ks[real], b.positions[real] + 1)
  assert (b.ks[~real] == b.ke[~real]).all()


@pytest.mark.parametrize("ext, pre, match", [
    ([1, -2], [0, 0], r"extend_lens must be >= 0, got \[-2\] at requests \[1\]"),
    ([1, 2], [0, -1], "prefix_lens must be >= 0"),
    ([1, 2], [0], "same length, got 2 and 1"),
    ([[1, 2]], [[0, 0]], "extend_lens must be a 1-D sequence"),
    ([1.5], [0], "extend_lens must hold integers"),
    ([1], [2**31], "packed key axis must fit int32"),
])
def test_value_errors(ext, pre, match):
  with pytest.raises(ValueError, match=match):
    build_ragged_batch(ext, pre)


def test_bad_buckets():
  with pytest.raises(ValueError, match="strictly increasing"):
    build_ragged_batch([1], [0], key_buckets=[16, 8])
