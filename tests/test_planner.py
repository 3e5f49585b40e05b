"""Chunk plans and buckets: static, hashable, deterministic, within the budget."""

import pytest
from hypothesis import given, settings, strategies as st

from nsa_jax import budget, planner
from nsa_jax.planner import ChunkPlan, bucket_size, plan_chunks


def test_skip_small_problems():
  p = plan_chunks(1000, 7999, 1)                 # < 8M logits: never chunked
  assert p == ChunkPlan(1000, 7999, 1000, 1, 1000) and not p.chunked


def test_fits_budget_unchunked():
  p = plan_chunks(4096, 4096, 4096 * 4096 * 4)
  assert not p.chunked and p.rows == 4096


def test_64k_prefill_plan():
  # 64K x 64K logits = 16 GiB; with a 6 GiB budget, 16K-row chunks (4 GiB each), 4 chunks.
  p = plan_chunks(65536, 65536, 6 * 2**30)
  assert (p.rows, p.num_chunks, p.padded_q) == (16384, 4, 65536)
  assert p.chunk_logits_bytes == 4 * 2**30


def test_budget_below_one_row_still_progresses():
  p = plan_chunks(3000, 5000, 1)
  assert (p.rows, p.num_chunks, p.padded_q) == (1, 3000, 3000)


def test_budget_is_not_part_of_the_static_key():
  a = plan_chunks(3000, 5000, 5000 * 4 * 512)
  b = plan_chunks(3000, 5000, 5000 * 4 * 1000)    # same 512-row rung of the ladder
  assert a == b and hash(a) == hash(b) and a.budget_bytes != b.budget_bytes


def test_skip_elements_read_at_call_time(monkeypatch):
  monkeypatch.setattr(budget, "SKIP_CHUNK_ELEMENTS", 0)
  assert plan_chunks(100, 100, 400 * 10).rows == 8
  assert plan_chunks(100, 100, 400 * 10, skip_elements=10**6).rows == 100


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 1 << 20), st.integers(1, 1 << 20), st.integers(1, 1 << 36))
def test_plan_properties(num_q, num_k, budget_bytes):
  p = plan_chunks(num_q, num_k, budget_bytes)
  assert p == plan_chunks(num_q, num_k, budget_bytes)           # deterministic
  hash(p)
  assert (p.num_q, p.num_k) == (num_q, num_k)
  assert p.padded_q == p.rows * p.num_chunks >= num_q
  assert (p.num_chunks - 1) * p.rows < num_q                     # no empty chunk
  if num_q * num_k < budget.SKIP_CHUNK_ELEMENTS or num_q * num_k * 4 <= budget_bytes:
    assert not p.chunked and p.rows == num_q
  else:
    assert p.chunked and p.rows & (p.rows - 1) == 0              # a rung of the ladder
    assert p.rows == 1 or p.chunk_logits_bytes <= budget_bytes
    assert p.rows * 2 * num_k * 4 > budget_bytes or p.rows * 2 >= num_q   # largest rung


@pytest.mark.parametrize("args, match", [
    ((0, 10, 10), "num_q"), ((10, 0, 10), "num_k"), ((10, 10, 0), "budget_bytes"),
    ((10.0, 10, 10), "num_q"), ((10, 10, True), "budget_bytes"),
])
def test_plan_errors(args, match):
  with pytest.raises(ValueError, match=match):
    plan_chunks(*args)


def test_default_bucket_ladder():
  assert bucket_size(0) == planner.MIN_BUCKET
  assert bucket_size(1) == 16 and bucket_size(16) == 16 and bucket_size(17) == 32
  assert bucket_size(1000) == 1024 and bucket_size(1025) == 2048
  assert planner.default_buckets(100) == (16, 32, 64, 128)


def test_given_buckets():
  assert bucket_size(5, [8, 24, 100]) == 8
  assert bucket_size(24, [8, 24, 100]) == 24 and bucket_size(25, [8, 24, 100]) == 100
  with pytest.raises(ValueError, match="exceeds the largest bucket 100"):
    bucket_size(101, [8, 24, 100])
  with pytest.raises(ValueError, match="strictly increasing"):
    bucket_size(1, [8, 8])
  with pytest.raises(ValueError, match="ints >= 1"):
    bucket_size(1, [0, 8])
  with pytest.raises(ValueError, match="non-empty sequence"):
    bucket_size(1, [])
