"""Evaluation throughput: `blip2lab eval caption` (blip2lab.evaluation.evaluate_captions:
batches, images opened a batch ahead on a thread, predictions fsync'ed per batch) against a
plain loop over `pipe.caption(path)`, on the same model, images and decoding (the paper's COCO
evaluation: 5 beams, 8 to 30 new tokens), in the same run; predictions compared.

    python benchmarks/eval_throughput.py                     # shapes-opt, 48 shapes-world images
    python benchmarks/eval_throughput.py --images 96 --batch-sizes 1,8,16,32 --repeats 2

The files are written from the shapes world (tests/eval_files.py, COCO caption format).
Reported: images/s of the loop and of the command per batch size (generation only: the
command's scoring, timed apart on the same predictions, is taken off), and the metrics' own time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
import eval_files  # noqa: E402

import blip2lab  # noqa: E402
from blip2lab.evaluation import evaluate_captions, read_captions  # noqa: E402
from blip2lab.evaluation.captions import score_captions  # noqa: E402


def plain_loop(pipe, paths: list[Path]) -> tuple[float, list[str]]:
    start = time.perf_counter()
    captions = [pipe.caption(str(p), min_new_tokens=8)[0] for p in paths]
    return time.perf_counter() - start, captions


def command(pipe, annotations: Path, root: Path, out: Path, batch_size: int) -> tuple[float, list[str]]:
    start = time.perf_counter()
    evaluate_captions(pipe, annotations, root, out, batch_size=batch_size, meteor=False, progress=False, restart=True)
    seconds = time.perf_counter() - start
    return seconds, [p["caption"] for p in json.loads((out / "predictions.json").read_text())]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="shapes-opt")
    ap.add_argument("--images", type=int, default=48)
    ap.add_argument("--batch-sizes", default="1,8,16")
    ap.add_argument("--repeats", type=int, default=1, help="runs of each contender, interleaved; median taken")
    ap.add_argument("--out", default=None, help="write the JSON result here too")
    args = ap.parse_args()
    pipe = blip2lab.load(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        eval_files.write_images(root, args.images)
        annotations = eval_files.write_coco_captions(root / "captions.json", args.images)
        data = read_captions(annotations, root)
        paths = [i.path for i in data.images]
        pipe.caption(str(paths[0]))  # warm-up: first-call allocations and lazy builds
        sizes = [int(b) for b in args.batch_sizes.split(",")]
        times: dict[str, list[float]] = {"loop": []} | {f"eval_b{b}": [] for b in sizes}
        outputs: dict[str, list[str]] = {}
        for _ in range(args.repeats):
            times["loop"].append((r := plain_loop(pipe, paths))[0])
            outputs["loop"] = r[1]
            for b in sizes:
                seconds, captions = command(pipe, annotations, root, root / f"run_b{b}", b)
                times[f"eval_b{b}"].append(seconds)
                outputs[f"eval_b{b}"] = captions
        start = time.perf_counter()
        score_captions([{"image_id": i.image_id, "caption": c} for i, c in zip(data.images, outputs["loop"])],
                       data, meteor=False)
        scoring = time.perf_counter() - start
    result = report(times, outputs, scoring, args, sizes)
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


def report(times: dict, outputs: dict, scoring: float, args, sizes: list[int]) -> dict:
    n = args.images
    loop = statistics.median(times["loop"])
    out = {"model": args.model, "images": n, "torch_threads": torch.get_num_threads(), "repeats": args.repeats,
           "load_average_after": [round(x, 1) for x in os.getloadavg()],
           "decoding": "beam 5, 8-30 new tokens (the paper's COCO eval)", "scoring_s (BLEU, ROUGE-L, CIDEr + "
           "NoCaps domains, no METEOR)": round(scoring, 2),
           "loop": {"seconds": round(loop, 2), "images_per_s": round(n / loop, 3)}}
    for b in sizes:
        total = statistics.median(times[f"eval_b{b}"])
        generation = total - scoring
        same = sum(a == c for a, c in zip(outputs["loop"], outputs[f"eval_b{b}"]))
        out[f"eval batch {b}"] = {"seconds_total": round(total, 2), "images_per_s": round(n / generation, 3),
                                  "vs_loop": round(loop / generation, 2), "captions_equal_to_loop": f"{same}/{n}"}
    return out


if __name__ == "__main__":
    main()
