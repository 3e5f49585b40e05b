"""The notebooks in notebooks/: each runs top to bottom, and each .ipynb matches its .py.

The jupytext percent script ``notebooks/NN_name.py`` is the source of truth (readable diffs);
``NN_name.ipynb`` is generated from it with ``jupytext --sync`` and committed without outputs.
Executing a notebook uses the ``python3`` kernel, which jupyter_client starts with this
interpreter (ipykernel comes with nbmake). Nothing timing-dependent is asserted here or in the
notebooks. ``python -m pytest --nbmake notebooks/`` runs the same notebooks through nbmake.
"""

from __future__ import annotations

import pathlib

import pytest

nbformat = pytest.importorskip("nbformat")
jupytext = pytest.importorskip("jupytext")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK_DIR = pathlib.Path(__file__).resolve().parent.parent / "notebooks"
SCRIPTS = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.py"))
# Per cell; the whole notebook must stay well under two minutes on the CI CPU.
CELL_TIMEOUT_S = 300


def _cells(nb):
  return [(c.cell_type, c.source.strip()) for c in nb.cells]


def test_notebooks_exist():
  names = {p.stem for p in SCRIPTS}
  assert {"01_indexer_walkthrough", "02_budget_and_chunking",
          "03_kernel_performance"} <= names, sorted(names)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_ipynb_in_sync_with_py(script):
  ipynb = script.with_suffix(".ipynb")
  assert ipynb.exists(), f"{ipynb.name} missing: run `jupytext --sync {script.name}` in notebooks/"
  from_py = jupytext.read(script)
  stored = nbformat.read(ipynb, as_version=4)
  assert _cells(from_py) == _cells(stored), (
      f"{ipynb.name} differs from {script.name}: edit the .py, then `jupytext --sync "
      f"{script.name}` (and clear outputs)")
  for c in stored.cells:
    if c.cell_type == "code":
      assert not c.get("outputs") and c.get("execution_count") is None, (
          f"{ipynb.name} has stored outputs; commit it cleared (jupyter nbconvert "
          f"--clear-output --inplace {ipynb.name})")


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_notebook_executes(script):
  nb = nbformat.read(script.with_suffix(".ipynb"), as_version=4)
  client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                   resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
  client.execute()   # raises CellExecutionError with the failing cell's traceback
  errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if o.get("output_type") == "error"]
  assert not errors, errors
