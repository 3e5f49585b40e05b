"""Every ```python block of README.md runs as written, top to bottom, in a fresh interpreter."""

from __future__ import annotations

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
FENCE = re.compile(r"^```python\n(.*?)^```$", re.S | re.M)


def python_blocks(text: str) -> list[tuple[int, str]]:
  """(first line number, code) of each ```python block."""
  return [(text.count("\n", 0, m.start(1)) + 1, m.group(1)) for m in FENCE.finditer(text)]


def as_script(text: str) -> str:
  """The blocks in order, each on its own README line numbers (blank lines between), so that a
  traceback names the README's line."""
  lines = [""] * (text.count("\n") + 1)
  for first, code in python_blocks(text):
    for i, line in enumerate(code.splitlines()):
      lines[first - 1 + i] = line
  return "\n".join(lines) + "\n"


def test_blocks_are_found():
  with open(README) as f:
    blocks = python_blocks(f.read())
  assert len(blocks) >= 5, "README lost its python blocks (or the fence pattern broke)"


def test_readme_python_blocks_run(tmp_path):
  with open(README) as f:
    text = f.read()
  script = tmp_path / "README.md"   # the file name tracebacks show
  script.write_text(as_script(text))
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
             JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax-cache"))
  r = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True,
                     text=True, timeout=600)
  assert r.returncode == 0, f"README.md's python blocks failed:\n{r.stderr[-4000:]}"
  # The values the README's comments promise.
  assert "8 16 15 16" in r.stdout, r.stdout
  assert "True" in r.stdout, r.stdout
  assert os.listdir(tmp_path / "jax-cache"), "enable_compile_cache stored nothing"
