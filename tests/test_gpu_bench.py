"""benchmarks/gpu.sh's CPU dry run (--tiny): the same code as the real-size GPU run, with
the packages a bare CUDA machine lacks (open_clip, gradio, scipy, ...) made unimportable,
writes a JSON with every figure, each compared, checked and timed; the stage-1 part runs
benchmarks/stage1_step.py against the LAVIS-style step in a subprocess, the fine-tuning part
benchmarks/finetune_step.py (`blip2lab train finetune` on Salesforce/blip2-opt-2.7b's shape,
shrunk) in the paper's mode and LoRA, its 8-bit mode skipped off CUDA."""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Not on the GPU machine (torch, transformers, accelerate, timm, numpy, safetensors,
# tokenizers and their dependencies only).
ABSENT = ("open_clip", "gradio", "scipy", "faiss", "sklearn", "matplotlib", "pandas", "nbformat", "jupytext")
FIGURES = ("caption_opt_greedy", "caption_opt_beam5", "caption_t5_greedy", "caption_t5_beam5", "itm", "qformer", "vit")
FINETUNE = ("paper", "lora", "lora_8bit")


def _blocking_python(tmp_path: Path) -> Path:
    """An interpreter for gpu.sh's $PYTHON that runs its script with ABSENT unimportable
    (sys.modules[name] = None: `import` fails and importlib.util.find_spec says None)."""
    wrapper = tmp_path / "python"
    prelude = (f"import runpy, sys\nfor name in {ABSENT!r}: sys.modules[name] = None\n"
               "sys.argv = sys.argv[1:]\nrunpy.run_path(sys.argv[0], run_name='__main__')")
    wrapper.write_text(f"#!/bin/sh\nexec '{sys.executable}' -c \"{prelude}\" \"$@\"\n")
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    return wrapper


def test_tiny_dry_run_writes_every_figure(tmp_path):
    out = tmp_path / "gpu.json"
    env = dict(os.environ, PYTHON=str(_blocking_python(tmp_path)), OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--tiny", str(out)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(out.read_text())
    assert data["errors"] == {}, data["errors"]
    assert all(part["status"] == "ok" for part in data["parts"].values()) and len(data["parts"]) == 7
    assert set(data["figures"]) == set(FIGURES) | {"stage1"} | {f"finetune_{m}" for m in FINETUNE}
    _check_finetune({m: data["figures"].pop(f"finetune_{m}") for m in FINETUNE}, proc.stdout)
    stage1 = data["figures"].pop("stage1")
    assert stage1["blip2lab_per_s"] > 0 and stage1["lavis_style_per_s"] > 0 and "stage1" in proc.stdout
    assert abs(stage1["ratio"] - stage1["blip2lab_per_s"] / stage1["lavis_style_per_s"]) < 1e-9
    assert 0 < stage1["peer_encoder_share"] < 1 and stage1["ratio_from_the_encoder_alone"] > 1
    assert set(stage1["loss_mean_abs_diff"]) >= {"itc_loss", "itm_loss", "itg_loss"}
    for name, row in data["figures"].items():
        assert row["transformers_per_s"] > 0 and row["blip2lab_per_s"] > 0, name
        assert abs(row["ratio"] - row["blip2lab_per_s"] / row["transformers_per_s"]) < 1e-9, name
        assert "transformers_peak_gb" in row and "blip2lab_peak_gb" in row, name  # None off CUDA
        assert name in proc.stdout, name  # one printed line per figure
        if name.startswith("caption"):
            assert row["identical"] == row["rows"] == 4, (name, row["identical"])  # tiny: all identical
        else:
            assert row["ok"] and row["max_abs_diff"] <= row["tolerance"], name
    assert 0.0 <= data["figures"]["caption_opt_greedy"]["identical_share_plain_head"] <= 1.0
    assert data["meta"]["mode"] == "tiny" and data["meta"]["dtype"] == "bfloat16"


def _check_finetune(rows: dict, stdout: str) -> None:
    """Each mode trained its steps through `blip2lab train finetune`, with its figures."""
    assert "CUDA" in rows.pop("lora_8bit")["skipped"] and "finetune_lora_8bit   skipped" in stdout
    for mode, row in rows.items():
        assert row["samples_per_s"] > 0 and row["plan_gb"] > 0 and row["peak_gb"] is None, mode  # None off CUDA
        assert row["saved"] and len(row["losses"]) == row["steps"] == 3 and f"finetune_{mode}" in stdout, mode
        assert row["repo"] == "Salesforce/blip2-opt-2.7b" and row["checkpoint_s"] > 0, mode
    assert set(rows["paper"]["by_part"]) == {"ln_vision", "qformer", "llm.projection"}
    assert set(rows["lora"]["by_part"]) == {"llm.model"}


def test_peaked_ids_ignore_the_default_device():
    """The real run builds its models under `with torch.device("cuda")`; the fixed token ids
    come from a CPU generator and must not follow that default (the first H200 run died on
    exactly this). The meta device stands in for CUDA here."""
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu

    plain = gpu.peaked_ids(1000, 8)
    with torch.device("meta"):
        inside = gpu.peaked_ids(1000, 8)
    assert inside.device.type == "cpu" and torch.equal(plain, inside)
