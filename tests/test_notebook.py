"""notebooks/QuickStart.ipynb runs top to bottom without an error (about 2 minutes at 1 thread).

It is executed with nbclient in a Jupyter kernel of this very interpreter (a kernelspec written
for the test), importing this checkout, writing below a temporary folder.
"""

from __future__ import annotations

import json
import os
import sys

import pytest

from conftest import REPO

nbformat = pytest.importorskip("nbformat")  # the dev extra installs nbclient, nbformat, ipykernel, matplotlib
nbclient = pytest.importorskip("nbclient")

NOTEBOOK = REPO / "notebooks" / "QuickStart.ipynb"


@pytest.mark.notebook
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_quickstart_notebook_executes_without_error(tmp_path, monkeypatch):
    kernels = tmp_path / "jupyter" / "kernels" / "python3"
    kernels.mkdir(parents=True)
    (kernels / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (test)", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))  # searched before the system's kernels
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("UE_QUICKSTART_WORKDIR", str(tmp_path / "work"))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()  # raises CellExecutionError, naming the cell, on the first error
    assert (tmp_path / "work" / "em-classwise.safetensors").is_file()
    errors = [o for cell in notebook.cells for o in cell.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
