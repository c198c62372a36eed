"""Executes every notebook in notebooks/ in a fresh kernel (public API only).

Each notebook asserts its own claims in its cells, so a broken claim, a removed public
name or an exception fails the test, with the failing cell's traceback in the message.
The committed notebooks carry no outputs; nothing is written back.
"""

import pathlib

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK_DIR = pathlib.Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
# Per-cell limit: far above a notebook's whole runtime (well under 90 s on 2 cores), so
# only a hang trips it.
CELL_TIMEOUT_S = 600


def test_notebooks_exist():
  names = {p.name for p in NOTEBOOKS}
  assert {"writing_a_new_loss.ipynb", "sharded_training_study.ipynb",
          "tour.ipynb"} <= names, names


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path, tmp_path):
  nb = nbformat.read(path, as_version=4)
  for cell in nb.cells:
    if cell.cell_type == "code":
      # Outputs are stripped before committing (they would go stale and bloat diffs).
      assert not cell.outputs and cell.execution_count is None, (
          f"{path.name}: commit the notebook with outputs cleared")
  client = nbclient.NotebookClient(
      nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
      resources={"metadata": {"path": str(tmp_path)}})
  try:
    client.execute()
  except nbclient.exceptions.CellExecutionError as e:
    pytest.fail(f"{path.name} failed:\n{e}", pytrace=False)
