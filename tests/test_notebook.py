"""docs/lightning_mnist.ipynb runs, cell by cell, in a real Jupyter kernel, as a learner opens
it from a clone (the notebook in docs/, the script and ./data beside docs/), on the tiny MNIST."""

import os
import re
import shutil
import signal
from pathlib import Path

import nbclient  # with ipykernel, pinned in tests/requirements.txt
import nbformat
import pytest
from conftest import ROOT, SCRIPT
from tensorboard import manager

NOTEBOOK = ROOT / "docs" / "lightning_mnist.ipynb"


def stream_text(cell, name: str) -> str:
    return "".join(output.text for output in cell.outputs if output.get("name") == name)


def shown_lines(text: str) -> list[str]:
    """The lines a notebook shows for a stream: a carriage return starts its line again."""
    return [line.rsplit("\r", 1)[-1] for line in text.split("\n")]


@pytest.fixture(scope="module")
def executed(tiny_mnist, tmp_path_factory):
    clone = tmp_path_factory.mktemp("clone")
    shutil.copy(SCRIPT, clone)
    shutil.copytree(SCRIPT.parent / "mnist_kit", clone / "mnist_kit", ignore=shutil.ignore_patterns("__pycache__"))
    (clone / "docs").mkdir()
    shutil.copy(NOTEBOOK, clone / "docs")
    shutil.copytree(tiny_mnist, clone / "data")
    notebook = nbformat.read(clone / "docs" / NOTEBOOK.name, as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=300, resources={"metadata": {"path": str(clone / "docs")}})
    try:
        client.execute()  # raises CellExecutionError, with the cell and its traceback, if a cell fails
    finally:
        stop_tensorboards_of(clone)
    return clone, notebook


def stop_tensorboards_of(clone: Path) -> None:
    """Stop the TensorBoard servers that the notebook's %tensorboard started, and no other."""
    for info in manager.get_all():  # every server this machine's users started, each with its pid
        try:
            if Path(f"/proc/{info.pid}/cwd").resolve() == clone.resolve():
                os.kill(info.pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass


def code_cell(notebook, start: str):
    (cell,) = [cell for cell in notebook.cells if cell.cell_type == "code" and cell.source.startswith(start)]
    return cell


def test_the_notebook_runs_from_docs_and_writes_its_run_in_the_repository(executed):
    clone, notebook = executed
    assert not (clone / "docs" / "lightning_logs").exists() and not (clone / "docs" / "data").exists()
    (run,) = (clone / "lightning_logs").iterdir()
    printed = stream_text(code_cell(notebook, "from lightning_mnist import train_and_test"), "stdout")
    accuracy, checkpoint, folder = printed.rstrip("\n").rsplit("\n", 1)[-1].split(" ")
    assert Path(folder) == run and Path(checkpoint).parent == run / "checkpoints" and Path(checkpoint).is_file()
    assert float(accuracy.rstrip("%")) > 90  # the tiny MNIST is easy
    predicted = stream_text(code_cell(notebook, "import torch"), "stdout")
    assert re.fullmatch(r"tensor\(\[(\d, ){7}\d\]\)\n", predicted)
    html = [output for output in code_cell(notebook, "%load_ext tensorboard").outputs if "data" in output]
    assert html and "tensorboard-frame" in html[0]["data"]["text/html"]


def test_the_progress_display_does_not_pile_up_in_a_notebook(executed):
    _, notebook = executed
    for start in ("%run lightning_mnist.py", "from lightning_mnist import train_and_test"):
        cell = code_cell(notebook, start)
        lines = shown_lines(stream_text(cell, "stdout") + stream_text(cell, "stderr"))
        # Terminal bars under the training bar leave a line per validation in a notebook.
        assert not [line for line in lines if "Validation" in line or "\x1b[" in line], lines
        # One line for the training bar, which shows the validation's results as it goes on.
        assert any(re.match(r"Epoch \d+: 100%.*val_acc=", line) for line in lines), lines


def test_fast_dev_run_in_the_notebook_says_its_accuracy_is_no_result(executed):
    _, notebook = executed
    printed = stream_text(code_cell(notebook, "%run lightning_mnist.py --fast-dev-run"), "stdout")
    assert "Test accuracy: " in printed and "not a result" in printed
