"""Tiny training datasets written to disk in every format `blip2lab train` reads, from the
shapes world: what a user's data looks like (images in a folder, captions in a file)."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

from blip2lab.worlds.shapes import world


def scenes(n: int = 16, seed: int = 0) -> list:
    return world.make_split("train", n, seed)


def write_images(root: Path, items: list, prefix: str = "img") -> list[dict]:
    """Scenes as PNG files under root; rows {"image": file name, "caption", "scene"}."""
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, scene in enumerate(items):
        name = f"{prefix}_{i:03d}.png"
        world.render(scene).save(root / name)
        rows.append({"image": name, "caption": world.caption(scene), "scene": scene})
    return rows


def write_csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["image", "caption"])
        w.writeheader()
        w.writerows({"image": r["image"], "caption": r["caption"]} for r in rows)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps({"image": r["image"], "caption": r["caption"]}) + "\n" for r in rows))
    return path


def write_coco(path: Path, rows: list[dict]) -> Path:
    """The official COCO captions layout: images by id, one annotation per caption."""
    data = {"images": [{"id": i, "file_name": r["image"]} for i, r in enumerate(rows)],
            "annotations": [{"id": i, "image_id": i, "caption": r["caption"]} for i, r in enumerate(rows)]}
    path.write_text(json.dumps(data))
    return path


def write_karpathy(path: Path, rows: list[dict]) -> Path:
    data = {"images": [{"filename": r["image"], "split": "train", "cocoid": i, "sentences": [{"raw": r["caption"]}]}
                       for i, r in enumerate(rows)]}
    path.write_text(json.dumps(data))
    return path


def write_lavis(path: Path, rows: list[dict]) -> Path:
    path.write_text(json.dumps([{"image": r["image"], "caption": [r["caption"]]} for r in rows]))
    return path


def vqa_rows(rows: list[dict], seed: int = 0) -> list[dict]:
    out = []
    for i, r in enumerate(rows):
        q, a, _ = random.Random(seed + i).choice(world.questions(r["scene"], random.Random(i)))
        out.append({"image": r["image"], "question": q, "answer": a})
    return out


def write_lavis_vqa(path: Path, rows: list[dict]) -> Path:
    path.write_text(json.dumps([{"image": r["image"], "question": r["question"], "answer": [r["answer"]]}
                                for r in vqa_rows(rows)]))
    return path


def write_vqav2(folder: Path, rows: list[dict]) -> tuple[Path, Path]:
    """VQAv2's two files, the images renamed as the official pattern wants (subset "train2014")."""
    qs, anns = [], []
    for i, r in enumerate(vqa_rows(rows)):
        name = folder / f"COCO_train2014_{i:012d}.png"
        if not name.exists():
            name.write_bytes((folder / r["image"]).read_bytes())
        qs.append({"image_id": i, "question": r["question"], "question_id": i})
        anns.append({"question_id": i, "multiple_choice_answer": r["answer"], "answers": [{"answer": r["answer"]}] * 10})
    q, a = folder / "questions.json", folder / "annotations.json"
    q.write_text(json.dumps({"questions": qs, "data_subtype": "train2014"}))
    a.write_text(json.dumps({"annotations": anns}))
    return q, a


def write_hf(path: Path, root: Path, rows: list[dict]) -> Path:
    import datasets

    ds = datasets.Dataset.from_dict({"img": [str(root / r["image"]) for r in rows],
                                     "text": [r["caption"] for r in rows]}).cast_column("img", datasets.Image())
    ds.save_to_disk(str(path))
    return path


def write_shards(folder: Path, root: Path, rows: list[dict], n_shards: int = 2) -> list[str]:
    import webdataset as wds

    folder.mkdir(parents=True, exist_ok=True)
    urls = []
    for s in range(n_shards):
        url = str(folder / f"shard-{s:02d}.tar")
        with wds.TarWriter(url) as sink:
            for i, r in enumerate(rows[s::n_shards]):
                sink.write({"__key__": f"s{s}_{i:03d}", "png": (root / r["image"]).read_bytes(),
                            "txt": r["caption"]})
        urls.append(url)
    return urls
