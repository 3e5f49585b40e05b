"""Paged-decode MQA logits: reference and xla backend against a float64 numpy oracle."""

import numpy as np
import pytest

import nsa_jax
from nsa_jax import reference
from tests.helpers import assert_same_inf_pattern, calc_diff, paged_mqa_logits_np, paged_problem


def _call(p, backend, **kw):
  return nsa_jax.paged_mqa_logits(p["q_fp8"], p["cache"], p["weights"], p["context_lens"],
                                  p["block_tables"], max_context_len=p["max_context_len"],
                                  backend=backend, **kw)


@pytest.mark.parametrize("next_n", [1, 2])
@pytest.mark.parametrize("backend", ["reference", "xla"])
def test_paged_matches_float64(next_n, backend):
  rng = np.random.default_rng(10 + next_n)
  # a context shorter than next_n, exactly one page, an empty row, odd lengths.
  p = paged_problem(rng, [1, 64, 0, 150, 333], next_n=next_n, H=32)
  if backend == "reference":
    out = reference.paged_mqa_logits(p["q_fp8"], p["cache"].k_fp8, p["cache"].k_scale,
                                     p["weights"], p["context_lens"], p["block_tables"],
                                     max_context_len=p["max_context_len"])
  else:
    out = _call(p, "xla")
  ref = paged_mqa_logits_np(p)
  assert out.shape == ref.shape
  assert_same_inf_pattern(out, ref)
  assert calc_diff(out, ref) < 5e-6
  # The empty request (row 2) is all -inf.
  assert np.isneginf(np.asarray(out).reshape(5, next_n, -1)[2]).all()


def test_paged_bad_pages_are_masked():
  rng = np.random.default_rng(3)
  p = paged_problem(rng, [130], H=32)
  tables = np.asarray(p["block_tables"]).copy()
  tables[0, 1] = 10_000  # out of range page id: its tokens become -inf, nothing is read
  p["block_tables"] = tables
  out = np.asarray(_call(p, "xla"))
  assert np.isfinite(out[0, :64]).all() and np.isneginf(out[0, 64:128]).all()
  assert np.isfinite(out[0, 128:130]).all()
