"""Pallas kernel: topk (not written yet; nsa_jax falls back to the xla backend)."""


def unsupported_reason(*shape_args):
  """Why the kernel cannot take these shapes, or None. Until it exists: always a reason."""
  return "the topk Pallas kernel is not implemented yet"
