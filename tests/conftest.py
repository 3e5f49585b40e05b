"""Shared pytest setup: the ``gpu`` marker skips cleanly where no CUDA GPU is present."""

import os

# Four virtual CPU devices, so sharding tests can build meshes on the CI box. Must precede
# the first jax import; harmless for single-device tests.
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=4").strip()

import jax  # noqa: E402
import pytest  # noqa: E402


def _has_gpu() -> bool:
  try:
    return jax.default_backend() == "gpu"
  except RuntimeError:
    return False


def pytest_collection_modifyitems(config, items):
  if _has_gpu():
    return
  skip = pytest.mark.skip(reason="needs a CUDA GPU (run scripts/gpu_ci.sh on a Hopper GPU)")
  for item in items:
    if "gpu" in item.keywords:
      item.add_marker(skip)
