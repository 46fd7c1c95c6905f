"""notebooks/quickstart.ipynb runs top to bottom."""

from pathlib import Path

import nbformat
from conftest import HANG_GUARD_S
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent


def test_quickstart_notebook_runs(tmp_path):
    nb = nbformat.read(ROOT / "notebooks" / "quickstart.ipynb", as_version=4)
    NotebookClient(nb, timeout=HANG_GUARD_S, startup_timeout=HANG_GUARD_S, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = "".join(o.get("text", "") for cell in nb.cells for o in cell.get("outputs", []))
    assert "student test accuracy" in outputs and "share of the first tap's atoms used" in outputs
    assert any("image/png" in o.get("data", {}) for o in nb.cells[-1].outputs)
    assert (tmp_path / "outputs/quickstart/student/model.safetensors").is_file()
