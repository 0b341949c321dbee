"""Real-size fine-tuning through the code of `blip2lab train finetune` (training/run.py `run`:
the source opened, the mode applied, THE training loop, the result saved), on random weights
of Salesforce/blip2-opt-2.7b's exact shape: its published config.json
(tests/published_configs) built by transformers and written as that repository's folder with
a tokenizer of its class and vocabulary size (tests/published.py); nothing is downloaded.

    python benchmarks/finetune_step.py --size real --device cuda --json OUT.json
    python benchmarks/finetune_step.py --size tiny --json OUT.json     # the CPU dry run

Modes, each a few optimiser steps at the same batch on the same captioned images:
    paper       the paper's fine-tuning: the Q-Former and the projection train, the EVA ViT-g
                and OPT-2.7B frozen (OPT in bf16 on a GPU)
    lora        LoRA (r 8) on OPT's attention projections, nothing else trains
    lora_8bit   the same over OPT's linear layers in bitsandbytes 8-bit (CUDA with bitsandbytes
                only; otherwise recorded as skipped, with the reason)
On a GPU each mode runs in a fresh process (spawned), so its peak CUDA memory is its own.

Reported per mode: samples/s from the median step after `warmup` steps; peak CUDA memory
(torch.cuda.max_memory_allocated over the whole run: weights, optimiser state, activations)
beside `blip2lab train --plan`'s estimate of the same run; trainable parameters; each step's
loss. At the real size the paper and LoRA runs leave out the final save (a 10 GB folder, no
part of the step); the 8-bit run saves, the path only a GPU takes (the LLM reloaded at full
precision, the adapters copied in), and its seconds are reported. The JSON is rewritten after
every mode, so a run cut short keeps the modes it finished.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE.parent / "tests")]  # blip2lab from the checkout; published.py
import published  # noqa: E402

REPO = "blip2-opt-2.7b"
MODES = {"paper": (), "lora": ("finetune.mode=lora",), "lora_8bit": ("finetune.mode=lora", "finetune.quantize=8bit")}


@dataclass
class Size:
    batch: int
    steps: int
    warmup: int  # steps left out of the median
    images: int
    workers: int  # DataLoader workers making batches (decoding and cropping 224 px views)
    saves: tuple  # modes whose run ends with its save


SIZES = {"real": Size(batch=16, steps=8, warmup=3, images=64, workers=4, saves=("lora_8bit",)),
         "tiny": Size(batch=2, steps=3, warmup=1, images=4, workers=0, saves=("paper", "lora"))}


@dataclass
class Spec:
    """What a mode's run needs (it may run in a spawned process)."""

    mode: str
    folder: str  # the checkpoint
    data: str  # the image folder with captions.csv
    out: str
    size: str
    device: str


def write_checkpoint(size: str, out: Path, device: str) -> Path:
    """The repository's folder with random weights, at its published shape ("real") or shrunk
    ("tiny", tests/published.py's shrunk_config). Built on `device` (fast init on a GPU),
    stored in fp16, the published LLM's dtype: half the bytes to write and read back."""
    config = published.published(REPO) if size == "real" else published.shrunk_config(REPO)
    with torch.device(device):
        model = published.random_model(REPO, config)
    return published.write_checkpoint(REPO, model.to(torch.float16), out)


def write_data(folder: Path, n: int) -> Path:
    """`n` random 64 px images with COCO-length captions (8-16 words) in captions.csv."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    lines = ["image,caption"]
    for i in range(n):
        pixels = np.random.default_rng(i).integers(0, 256, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img_{i:03d}.png")
        lines.append(f"img_{i:03d}.png,{' '.join(rng.choices(published.WORDS, k=rng.randint(8, 16)))}")
    (folder / "captions.csv").write_text("\n".join(lines) + "\n")
    return folder


def skip_reason(mode: str, device: str) -> str | None:
    if mode != "lora_8bit":
        return None
    if device != "cuda":
        return "bitsandbytes' 8-bit kernels need CUDA"
    if importlib.util.find_spec("bitsandbytes") is None:
        return "bitsandbytes is not installed (pip install 'blip2lab[gpu]', or carry its wheel)"
    return None


@contextlib.contextmanager
def step_clock(R, stamps: list):
    """The run's own loop, with its per-step hook taking the time after each step (its logs
    are floats: the step has finished on the device)."""
    from blip2lab.training import loop

    R.train = functools.partial(loop.train, on_step=lambda step, logs: stamps.append(time.perf_counter()))
    try:
        yield
    finally:
        R.train = loop.train


def run_mode(spec: Spec) -> dict:
    """`blip2lab train finetune --from FOLDER` in `spec.mode`: timings, memory, the plan."""
    from blip2lab.training import run as R
    from blip2lab.training.plan import estimate

    size = SIZES[spec.size]
    sets = (f"data.path={spec.data}", f"model.source={spec.folder}", f"out={spec.out}", "progress=false",
            f"train.max_steps={size.steps}", f"train.batch_size={size.batch}", f"data.num_workers={size.workers}",
            "train.save_every=0", *MODES[spec.mode])
    cfg = R.resolve("finetune", None, sets)
    plan = estimate(cfg, spec.device)
    cuda, stamps, save = spec.device == "cuda", [], spec.mode in size.saves
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    keep = R._save_result
    if not save:  # the real size: a 10 GB folder that is no part of the step (see the docstring)
        R._save_result = lambda *args: None
    start = time.perf_counter()
    try:
        with step_clock(R, stamps):
            summary = R.run(cfg, log=lambda line: None)
    finally:
        R._save_result = keep
    end = time.perf_counter()
    step_s = [b - a for a, b in zip(stamps, stamps[1:])]  # step i (i >= 1)
    median = statistics.median(step_s[size.warmup - 1:] or step_s)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    return {"unit": "samples/s", "mode": spec.mode, "batch": size.batch, "steps": size.steps,
            "samples_per_s": size.batch / median, "step_s": median, "step_s_all": step_s,
            "until_first_step_s": stamps[0] - start, "saved": save, "save_s": end - stamps[-1] if save else None,
            "peak_gb": peak, "reserved_gb": torch.cuda.max_memory_reserved() / 2**30 if cuda else None,
            "plan_gb": plan.bytes["total"] / 2**30, "plan_over_peak": plan.bytes["total"] / 2**30 / peak if peak else None,
            "trainable": summary["parameters"]["trainable"], "by_part": summary["parameters"]["by_part"],
            "losses": [h["loss"] for h in summary["history"]]}


def _entry(spec: dict, out: str) -> None:
    Path(out).write_text(json.dumps(run_mode(Spec(**spec))))


def run_spawned(spec: Spec, scratch: Path) -> dict:
    """run_mode in a fresh process (spawned: nothing inherited), for its own peak memory."""
    import multiprocessing as mp

    out = scratch / f"{spec.mode}.json"
    proc = mp.get_context("spawn").Process(target=_entry, args=(asdict(spec), str(out)))
    proc.start()
    proc.join()
    if proc.exitcode != 0 or not out.is_file():
        raise RuntimeError(f"mode {spec.mode} failed (exit code {proc.exitcode})")
    return json.loads(out.read_text())


def write_json(out: Path, result: dict) -> None:
    """Atomically: the part reading it after a timeout never sees half a file."""
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--json", required=True, help="results, rewritten after every mode")
    args = parser.parse_args()
    result = {"repo": f"Salesforce/{REPO}", "size": args.size, "device": args.device, "modes": {}, "errors": {}}
    out = Path(args.json)
    with tempfile.TemporaryDirectory(prefix="blip2lab-finetune-") as tmp:
        t0 = time.perf_counter()
        folder = write_checkpoint(args.size, Path(tmp) / "checkpoint", args.device)
        data = write_data(Path(tmp) / "images", SIZES[args.size].images)
        result["checkpoint_s"] = time.perf_counter() - t0
        write_json(out, result)
        for mode in args.modes.split(","):
            reason = skip_reason(mode, args.device)
            spec = Spec(mode, str(folder), str(data), str(Path(tmp) / f"out-{mode}"), args.size, args.device)
            try:
                row = {"skipped": reason} if reason else \
                    run_spawned(spec, Path(tmp)) if args.device == "cuda" else run_mode(spec)
            except Exception as err:  # recorded; the next mode runs
                row, result["errors"][mode] = None, f"{type(err).__name__}: {err}"
            if row is not None:
                result["modes"][mode] = row
            shutil.rmtree(spec.out, ignore_errors=True)
            write_json(out, result)


if __name__ == "__main__":
    main()
