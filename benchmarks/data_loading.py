"""Each data format's loading throughput (read, decode, the training crop, tokenise, collate:
one training batch) against the training step it feeds, on the shapes world written to disk.
The loader must not be the bottleneck: ratio = loader samples/s / step samples/s, > 1 is good
(and DataLoader workers, `data.num_workers`, multiply the loader's side).

    python benchmarks/data_loading.py [--n 64] [--batch 16] [--steps 5] [--record]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import train_data as D  # noqa: E402

from blip2lab.training import run as R  # noqa: E402
from blip2lab.training.data_sources import DataConfig, open_data  # noqa: E402


def formats(root: Path, n: int) -> dict[str, DataConfig]:
    images = root / "images"
    rows = D.write_images(images, D.scenes(n))
    D.write_csv(images / "captions.csv", rows)
    D.write_shards(root / "shards", images, rows, n_shards=2)
    D.write_hf(root / "hf", images, rows)
    im = str(images)
    return {"csv": DataConfig(path=str(D.write_csv(root / "c.csv", rows)), images=im),
            "jsonl": DataConfig(path=str(D.write_jsonl(root / "c.jsonl", rows)), images=im),
            "coco": DataConfig(path=str(D.write_coco(root / "coco.json", rows)), images=im),
            "lavis": DataConfig(path=str(D.write_lavis(root / "lavis.json", rows)), images=im),
            "folder": DataConfig(path=im), "hf": DataConfig(path=str(root / "hf"), image_column="img",
                                                            text_column="text"),
            "webdataset": DataConfig(path=str(root / "shards"), shuffle_buffer=0)}


def loader_rate(cfg: R.TrainRunConfig, proc, batches: int) -> float:
    dataset = open_data(cfg.data, rank=0, world_size=1)
    stream = R._stream(cfg, dataset, R.make_collate(proc, ("itc", "itm", "itg"), cfg.data.crop), 0, 1)
    stream(0)  # warm: the first read of a shard or dataset
    t = time.perf_counter()
    for i in range(1, batches + 1):
        stream(i)
    return batches * cfg.train.batch_size / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--record", action="store_true")
    args = p.parse_args()
    root = Path(tempfile.mkdtemp())
    cfgs = formats(root, args.n)
    base = ("model.source=shapes-stage1", f"train.batch_size={args.batch}", "progress=false", "data.crop.hflip=false")
    run_cfg = R.resolve("stage1", None, base + (f"data.path={cfgs['csv'].path}", f"data.images={cfgs['csv'].images}",
                                                f"out={root / 'out'}", f"train.max_steps={args.steps}"))
    t = time.perf_counter()
    R.run(run_cfg, log=lambda _: None)
    step_rate = args.steps * args.batch / (time.perf_counter() - t)  # the whole run: an upper bound on a step's time
    _, proc = R.load_model(run_cfg)
    result = {"step_samples_per_s": step_rate, "batch": args.batch, "formats": {}}
    for name, data in cfgs.items():
        rate = loader_rate(R.TrainRunConfig(data=data, train=run_cfg.train), proc, args.steps)
        result["formats"][name] = {"loader_samples_per_s": rate, "ratio": rate / step_rate}
        print(f"{name:11s} loader {rate:8.1f} samples/s, step {step_rate:6.1f} samples/s, ratio {rate / step_rate:6.1f}")
    if args.record:
        (ROOT / "benchmarks" / "results" / "data_loading.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
