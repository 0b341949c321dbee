"""CapFilt on the shapes world: a training set where a share of the captions is wrong (one
object's colour swapped, or another scene's caption), stage 1 trained on it as it is and
after `blip2lab capfilt` (captioner and filter: the shipped shapes-stage1 model, trained on
clean data, as BLIP's come from COCO), retrieval R@1 both ways on held-out scenes.

    python benchmarks/capfilt_shapes.py [--n 600] [--noise 0.4] [--steps 300] [--out runs/capfilt]

Writes OUT/capfilt_shapes.json (and benchmarks/results/capfilt_shapes.json with --record).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BATCH = 16
sys.path.insert(0, str(ROOT))

from blip2lab.pipeline import Blip2Pipeline, load  # noqa: E402
from blip2lab.training import run as R  # noqa: E402
from blip2lab.training.capfilt import CapFiltConfig, capfilt  # noqa: E402
from blip2lab.worlds.shapes import recipe, world  # noqa: E402


def noisy_caption(scene, others, rng: random.Random) -> tuple[str, str]:
    """A wrong caption: one object's colour swapped, or another scene's caption."""
    if rng.random() < 0.5:
        objs = list(scene.ordered)
        i = rng.randrange(len(objs))
        colour = rng.choice([c for c in world.COLORS if c != objs[i].color])
        phrases = [o.phrase() if j != i else o.phrase().replace(o.color, colour) for j, o in enumerate(objs)]
        return " and ".join(phrases), "swapped_colour"
    return world.caption(rng.choice(others)), "other_scene"


def write_data(out: Path, n: int, noise: float, seed: int) -> dict:
    scenes = world.make_split("train", n, seed)
    rng = random.Random(seed)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    rows, kinds = [], {"clean": 0, "swapped_colour": 0, "other_scene": 0}
    for i, s in enumerate(scenes):
        world.render(s).save(images / f"{i:04d}.png")
        text, kind = (world.caption(s), "clean") if rng.random() >= noise else noisy_caption(s, scenes, rng)
        kinds[kind] += 1
        rows.append(f"{i:04d}.png,{text}")
    (images / "captions.csv").write_text("image,caption\n" + "\n".join(rows) + "\n")
    return kinds


def start_folder(out: Path, seed: int) -> Path:
    """The shipped frozen ViT and a BERT-initialised Q-Former, not trained yet."""
    preset = recipe.PRESETS["shipped"]
    config = recipe.shapes_config(None, preset)
    Blip2Pipeline(recipe.build_model(config, seed=seed), recipe.processor_for(config)).save(out / "start")
    return out / "start"


def stage1(data: Path, out: Path, start: Path, steps: int, seed: int) -> float:
    t = time.perf_counter()
    R.run(R.resolve("stage1", None, (f"data.path={data}", f"out={out}", f"model.source={start}",
                                     f"train.max_steps={steps}", f"train.batch_size={BATCH}", "train.lr=1e-3",
                                     "train.min_lr=5e-5", "train.warmup_steps=30", "train.itm_easy_negatives=0.5",
                                     f"train.seed={seed}", "data.crop.hflip=false", "data.crop.scale=[1.0,1.0]",
                                     "progress=false")))
    return time.perf_counter() - t


def retrieval(folder: Path, gallery: int, seed: int) -> dict:
    r = recipe.eval_retrieval(load(str(folder)), world.make_gallery("test", gallery, seed), k_test=16)
    return {k: v for k, v in r.items() if k.endswith("r1") or k.endswith("@1")} or r


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=600)
    p.add_argument("--noise", type=float, default=0.4)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--gallery", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/capfilt")
    p.add_argument("--record", action="store_true")
    args = p.parse_args()
    out = Path(args.out)
    kinds = write_data(out, args.n, args.noise, args.seed)
    start = start_folder(out, args.seed)
    raw_s = stage1(out / "images", out / "raw", start, args.steps, args.seed)
    report = capfilt("shapes-stage1", str(out / "images" / "captions.csv"), out / "images" / "filtered.csv",
                     cfg=CapFiltConfig(samples=2, threshold=0.5, seed=args.seed))
    filtered_s = stage1(out / "images" / "filtered.csv", out / "filtered", start, args.steps, args.seed)
    result = {"n": args.n, "noise": args.noise, "captions": kinds, "steps": args.steps, "capfilt": report,
              "raw": retrieval(out / "raw", args.gallery, args.seed) | {"train_s": raw_s},
              "filtered": retrieval(out / "filtered", args.gallery, args.seed) | {"train_s": filtered_s}}
    text = json.dumps(result, indent=2, default=str)
    (out / "capfilt_shapes.json").write_text(text + "\n")
    if args.record:
        (ROOT / "benchmarks" / "results" / "capfilt_shapes.json").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
