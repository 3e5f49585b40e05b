"""Pallas kernel: paged_mqa_logits (not written yet; nsa_jax falls back to the xla backend)."""


def unsupported_reason(*shape_args):
  """Why the kernel cannot take these shapes, or None. Until it exists: always a reason."""
  return "the paged_mqa_logits Pallas kernel is not implemented yet"
