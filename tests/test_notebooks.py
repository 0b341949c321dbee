"""The notebooks as stored: every jupytext percent `.py` has its `.ipynb` twin with the same
cells, no `.ipynb` carries outputs, and each opens with its `parameters` cell. Running them
(small mode) is nbmake's job: `make test` passes `--nbmake notebooks` with BLIP2LAB_SMALL=1."""

import ast
import json
import re
from pathlib import Path

import pytest

jupytext = pytest.importorskip("jupytext")

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
EXPECTED = ["01_data_and_frozen_backbones", "02_qformer_and_masks", "03_stage1_representation_learning",
            "04_stage2_generative_learning", "05_ablation_representation_learning", "06_ablation_losses",
            "07_attention_maps", "08_beyond_the_paper", "09_official_checkpoints", "10_mini_real",
            "11_your_own_data"]
STEMS = sorted({p.stem for p in NOTEBOOKS.glob("*.py")} | {p.stem for p in NOTEBOOKS.glob("*.ipynb")})


def _cells(path: Path) -> list[tuple[str, str, list]]:
    nb = jupytext.read(path)
    return [(c.cell_type, c.source.strip(), sorted(c.metadata.get("tags", []))) for c in nb.cells]


def test_every_notebook_of_the_issue_is_here():
    assert STEMS == EXPECTED


@pytest.mark.parametrize("stem", STEMS)
def test_pair_exists_and_is_in_sync(stem):
    py, ipynb = NOTEBOOKS / f"{stem}.py", NOTEBOOKS / f"{stem}.ipynb"
    assert py.is_file() and ipynb.is_file(), f"{stem}: both .py and .ipynb must exist (jupytext --sync)"
    assert _cells(py) == _cells(ipynb), f"{stem}: .py and .ipynb differ; run `jupytext --sync notebooks/{stem}.py`"
    formats = jupytext.read(py).metadata.get("jupytext", {}).get("formats", "")
    assert "ipynb" in formats and "py:percent" in formats, f"{stem}: not paired (jupytext --set-formats ipynb,py:percent)"


@pytest.mark.parametrize("stem", STEMS)
def test_ipynb_has_no_outputs(stem):
    nb = json.loads((NOTEBOOKS / f"{stem}.ipynb").read_text())
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] == "code":
            assert cell.get("outputs") == [], f"{stem}: cell {i} has outputs"
            assert cell.get("execution_count") is None, f"{stem}: cell {i} has an execution count"


@pytest.mark.parametrize("stem", STEMS)
def test_opens_with_a_parameters_cell_and_defines_no_classes(stem):
    nb = jupytext.read(NOTEBOOKS / f"{stem}.py")
    code = [c for c in nb.cells if c.cell_type == "code"]
    first = code[0]
    assert "parameters" in first.metadata.get("tags", []), f"{stem}: the first code cell must be tagged 'parameters'"
    assert re.search(r'SMALL = os\.environ\.get\("BLIP2LAB_SMALL", "1"\) == "1"', first.source), stem
    for cell in code:
        source = "\n".join(line for line in cell.source.splitlines() if not line.lstrip().startswith(("%", "!")))
        tree = ast.parse(source)
        classes = [n.name for n in ast.walk(tree) if isinstance(n, ast.ClassDef)]
        assert not classes, f"{stem}: notebooks define no classes (the package does); found {classes}"
