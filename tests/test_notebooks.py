"""The notebooks: committed without outputs, and they run (on the bundled ml-latest-small).

The fast tests run each notebook with small parameters (their first code cell is a parameters
cell that the test replaces); ``-m slow`` runs them exactly as committed.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
QUICK = {
    "01_explore_dataset.ipynb": None,  # already quick
    "02_run_experiment.ipynb": (
        'CONFIG = "ml-latest-small"\nMODELS = ["multvae", "popularity"]\n'
        "EPOCHS = 1\nEASE_LAMBDAS = [200.0]\nTHREADS = 1"
    ),
}


def _execute(path: Path, parameters: str | None) -> nbformat.NotebookNode:
    from nbclient import NotebookClient

    notebook = nbformat.read(path, as_version=4)
    if parameters is not None:
        cell = next(c for c in notebook.cells if c.cell_type == "code")
        assert cell.source.startswith("# Parameters")
        cell.source = "# Parameters (test)\n" + parameters
    client = NotebookClient(
        notebook,
        timeout=900,
        kernel_name="python3",
        resources={"metadata": {"path": str(ROOT)}},
    )
    client.execute()
    return notebook


def _outputs_text(notebook: nbformat.NotebookNode) -> str:
    parts = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            parts.append(output.get("text", ""))
            parts.extend(str(v) for v in output.get("data", {}).values())
    return "\n".join(parts)


def test_notebooks_are_committed_clean() -> None:
    assert [p.name for p in NOTEBOOKS] == list(QUICK)
    for path in NOTEBOOKS:
        notebook = nbformat.read(path, as_version=4)
        nbformat.validate(notebook)
        assert notebook.metadata.kernelspec.name == "python3"
        code = [c for c in notebook.cells if c.cell_type == "code"]
        assert code[0].source.startswith("# Parameters")
        for cell in code:
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: outputs"
            # IPython magics aside, every cell is Python.
            ast.parse("\n".join(line for line in cell.source.splitlines() if line[:1] != "%"))
        sources = "\n".join(c.source for c in code)
        assert "from recvae" in sources or "from pipelines" in sources


@pytest.mark.parametrize(
    "name",
    [
        "01_explore_dataset.ipynb",
        # Trains Mult-VAE and fits EASE in a fresh kernel: over the default suite's budget.
        pytest.param("02_run_experiment.ipynb", marks=pytest.mark.slow),
    ],
)
def test_notebook_runs_with_quick_parameters(name: str) -> None:
    notebook = _execute(ROOT / "notebooks" / name, QUICK[name])
    text = _outputs_text(notebook)
    errors = [o for c in notebook.cells for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    images = [
        o for c in notebook.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})
    ]
    if name.startswith("01"):
        assert "Gini index of item popularity" in text and len(images) >= 2
    else:
        assert "ndcg@100" in text and "multvae" in text and "popularity" in text
        assert "correlation of |PC1| with log activity" in text and len(images) >= 4


@pytest.mark.slow
@pytest.mark.parametrize("name", list(QUICK))
def test_notebook_runs_as_committed(name: str) -> None:
    notebook = _execute(ROOT / "notebooks" / name, None)
    errors = [o for c in notebook.cells for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
