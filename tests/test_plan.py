"""`blip2lab train --plan` before any weight loads: trainable parameters and memory, the
estimate held against the peak memory of the same run measured on the CPU."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import train_data as D

from blip2lab.cli import main
from blip2lab.paths import MODELS_DIR
from blip2lab.training import run as R
from blip2lab.training.plan import estimate

ROOT = Path(__file__).resolve().parents[1]
BERT = str(MODELS_DIR / "backbones" / "bert")
# A random Q-Former of 19M parameters (78 MB fp32; with gradients and AdamW's moments 310 MB):
# large enough that the interpreter's own memory is small beside it.
SETS = ("model.build.vision.image_size=32", "model.build.vision.patch_size=8", "model.build.vision.width=64",
        "model.build.vision.layers=2", "model.build.vision.heads=4", f"model.qformer_tokenizer={BERT}",
        "model.build.qformer.hidden_size=384", "model.build.qformer.num_layers=6", "model.build.qformer.num_heads=6",
        "model.build.qformer.intermediate_size=1536", "model.build.qformer.num_queries=8",
        "model.build.qformer.max_text_len=32", "train.batch_size=16", "train.max_steps=1", "progress=false",
        "precision=no", "data.crop.hflip=false")

MEASURE = textwrap.dedent("""
    import json, resource, sys
    sys.path.insert(0, sys.argv[1])
    from blip2lab.training import run as R
    import blip2lab.training.plan, accelerate, open_clip, transformers, torch.utils.tensorboard  # imports outside

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()

    def hwm():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))

    cfg = R.resolve("stage1", None, tuple(json.loads(sys.argv[2])))
    base = rss()
    R.run(cfg, log=lambda _: None)
    print(json.dumps({"base": base, "peak": hwm()}))
""")


def test_plan_matches_the_measured_peak_on_the_cpu(tmp_path):
    D.write_csv(tmp_path / "captions.csv", D.write_images(tmp_path, D.scenes(32)))
    sets = list(SETS) + [f"data.path={tmp_path / 'captions.csv'}", f"out={tmp_path / 'out'}"]
    plan = estimate(R.resolve("stage1", None, tuple(sets)), device="cpu")
    proc = subprocess.run([sys.executable, "-c", MEASURE, str(ROOT), json.dumps(sets)], capture_output=True,
                          text=True, timeout=280, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    measured = m["peak"] - m["base"]
    ratio = plan.bytes["total"] / measured
    print(f"plan {plan.bytes['total'] / 2**20:.0f} MB, measured {measured / 2**20:.0f} MB, ratio {ratio:.2f}")
    assert plan.trainable > 15_000_000 and 0.75 < ratio < 1.33, (plan.bytes, measured)


def test_plan_prints_before_any_weight_loads(capsys, monkeypatch):
    import blip2lab.formats.build as build

    monkeypatch.setattr(build, "build_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    assert main(["train", "finetune", "--from", "shapes-opt", "--lora", "--plan", "--batch-size", "8"]) == 0
    text = capsys.readouterr().out
    assert "trainable parameters: " in text and "activations" in text and "in 24 GB" in text
