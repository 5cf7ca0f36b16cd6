"""The notebooks under `notebooks/` execute top to bottom on the CPU, in a kernel of this interpreter.

Each notebook runs in a fresh Jupyter kernel (nbclient) started from `sys.executable` (a kernelspec
written for the test, so the venv's packages are the ones exercised, whatever kernels the machine
has registered). A cell that raises fails the test; the notebooks assert what they show. Like
papermill, overrides are injected as a cell after the one tagged `parameters`.

The same notebooks also run with `pytest --nbmake notebooks/` (nbmake, in the dev extra).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
KERNEL = "carve-jax-test"
CELL_TIMEOUT_S = 600


@pytest.fixture(scope="module")
def kernel_name(tmp_path_factory, request):
  """A kernelspec that launches this interpreter, found first through JUPYTER_PATH."""
  root = tmp_path_factory.mktemp("jupyter")
  spec = root / "kernels" / KERNEL
  spec.mkdir(parents=True)
  (spec / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": f"carve_jax tests ({sys.executable})", "language": "python"}))
  mp = pytest.MonkeyPatch()
  mp.setenv("JUPYTER_PATH", str(root))
  request.addfinalizer(mp.undo)
  return KERNEL


def inject_parameters(nb, **params):
  """Inserts `NAME = value` lines after the cell tagged "parameters"; every name must be defined there."""
  idx = [i for i, c in enumerate(nb.cells) if "parameters" in c.get("metadata", {}).get("tags", [])]
  if len(idx) != 1:
    raise ValueError(f"inject_parameters: expected one cell tagged 'parameters', found {len(idx)}")
  defined = {line.split("=")[0].strip() for line in nb.cells[idx[0]].source.splitlines() if "=" in line}
  unknown = sorted(set(params) - defined)
  if unknown:
    raise ValueError(f"inject_parameters: {unknown} are not set in the parameters cell (it sets {sorted(defined)})")
  cell = nbformat.v4.new_code_cell("\n".join(f"{k} = {v!r}" for k, v in params.items()))
  cell.metadata["tags"] = ["injected-parameters"]
  nb.cells.insert(idx[0] + 1, cell)


def execute(nb, kernel_name: str, cwd: Path):
  """Runs every cell; raises CellExecutionError (with the cell and traceback) on the first failure."""
  probe = nbformat.v4.new_code_cell("import sys; print(sys.prefix)")
  nb.cells.append(probe)  # which interpreter ran the cells
  NotebookClient(nb, kernel_name=kernel_name, timeout=CELL_TIMEOUT_S,
                 resources={"metadata": {"path": str(cwd)}}).execute()
  ran_in = "".join(o.get("text", "") for o in nb.cells[-1].outputs).strip()
  assert ran_in == sys.prefix, f"kernel ran {ran_in}, expected this interpreter's {sys.prefix}"
  nb.cells.pop()
  return nb


def images(nb) -> int:
  return sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)


def read(name: str):
  path = NOTEBOOKS / name
  nb = nbformat.read(path, as_version=4)
  nbformat.validate(nb)
  assert path.stat().st_size < 300_000, f"{name} is {path.stat().st_size} bytes: commit it without large outputs"
  return nb


def test_wy_proofs(kernel_name):
  nb = execute(read("wy_proofs.ipynb"), kernel_name, NOTEBOOKS)
  assert images(nb) >= 3  # recurrence vs chunk, error vs chunk size, Kronecker spectra and ranks


def test_explore_model_trains_loads_and_generates(kernel_name, tmp_path):
  nb = read("explore_model.ipynb")
  inject_parameters(nb, OUT_DIR=str(tmp_path / "run"), TRAIN_STEPS=120, SAMPLE_TOKENS=80)
  nb = execute(nb, kernel_name, NOTEBOOKS)
  assert (tmp_path / "run" / "checkpoints" / "120").is_dir()  # trained through the API, restored from disk
  assert images(nb) >= 5  # loss, gamma, c_n maps, c_n per block, gates
  text = "".join(o.get("text", "") for o in nb.cells[-1].outputs)
  assert text.count("--- sample") == 2, text


def test_a_failing_cell_fails_the_run(kernel_name, tmp_path):
  nb = nbformat.v4.new_notebook()
  nb.cells = [nbformat.v4.new_code_cell("x = 1"), nbformat.v4.new_code_cell("assert x == 2, 'proof broken'"),
              nbformat.v4.new_code_cell("open('reached', 'w').write('no')")]
  with pytest.raises(CellExecutionError, match="proof broken"):
    execute(nb, kernel_name, tmp_path)
  assert not (tmp_path / "reached").exists()  # cells after the failure do not run


def test_inject_parameters_rejects_unknown_names():
  nb = read("explore_model.ipynb")
  with pytest.raises(ValueError, match="NOT_A_PARAMETER"):
    inject_parameters(nb, NOT_A_PARAMETER=1)
