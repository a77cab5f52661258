"""Every notebook runs top to bottom in a real Jupyter kernel (nbclient), on small settings
(LM_NB_QUICK=1), and is committed without outputs."""
import os
import time

import nbformat
import pytest

from conftest import ROOT

NOTEBOOKS = sorted(f for f in os.listdir(os.path.join(ROOT, "notebooks")) if f.endswith(".ipynb"))


def test_there_are_notebooks_and_they_are_stripped():
    assert NOTEBOOKS == ["01_quickstart.ipynb", "02_sharding.ipynb", "03_generation.ipynb"]
    for name in NOTEBOOKS:
        nb = nbformat.read(os.path.join(ROOT, "notebooks", name), as_version=4)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, (
                    f"{name} has outputs: clear them before committing")


@pytest.fixture(scope="module")
def quickstart_workdir(tmp_path_factory):
    """Notebook 01 trains here and notebook 03 generates from it (when 01 ran first)."""
    return str(tmp_path_factory.mktemp("notebooks") / "quickstart")


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_top_to_bottom(name, monkeypatch, quickstart_workdir):
    from nbclient import NotebookClient
    monkeypatch.setenv("LM_NB_QUICK", "1")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("LM_NB_WORKDIR", quickstart_workdir)
    monkeypatch.setenv("LM_NB_CHECKPOINT", quickstart_workdir)
    path = os.path.join(ROOT, "notebooks", name)
    nb = nbformat.read(path, as_version=4)
    t = time.monotonic()
    # Raises CellExecutionError (with the cell and its traceback) on any error.
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": os.path.dirname(path)}}).execute()
    print(f"{name}: {time.monotonic() - t:.0f} s")
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert outputs and not [o for o in outputs if o.output_type == "error"]
