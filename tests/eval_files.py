"""Tiny evaluation files in each standard format, written from the shapes world: rendered test
scenes as PNG files and their captions, questions and classes as COCO, LAVIS, Karpathy, VQAv2,
GQA and classification files lay them out (blip2lab.evaluation.data). Used by
tests/test_eval_cli.py and benchmarks/eval_throughput.py."""

from __future__ import annotations

import json
from pathlib import Path

from blip2lab.evaluate import normalize_answer
from blip2lab.worlds.shapes import world

# VQAv2 answer types of the shapes question types
ANSWER_TYPE = {"exists": "yes/no", "count": "number"}


def scenes(n: int, seed: int = 0) -> list:
    return world.make_split("test", n, seed)


def write_images(root: Path, n: int, seed: int = 0) -> list[str]:
    """COCO-style file names under root/val2014; returns them."""
    folder = root / "val2014"
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i, scene in enumerate(scenes(n, seed)):
        name = f"COCO_val2014_{i + 1:012d}.png"
        world.render(scene).save(folder / name)
        names.append(name)
    return names


def _references(scene, k: int = 3) -> list[str]:
    return [world.caption(scene)] + [world.paraphrases(scene, rng=j) for j in range(k - 1)]


def write_coco_captions(path: Path, n: int, seed: int = 0) -> Path:
    """COCO's caption format; image ids 1..n, file names under val2014/."""
    images, annotations = [], []
    for i, scene in enumerate(scenes(n, seed)):
        images.append({"id": i + 1, "file_name": f"val2014/COCO_val2014_{i + 1:012d}.png",
                       "domain": "in-domain" if i % 2 else "out-domain"})
        annotations += [{"image_id": i + 1, "id": len(annotations), "caption": c} for c in _references(scene)]
    path.write_text(json.dumps({"images": images, "annotations": annotations}))
    return path


def write_lavis_captions(path: Path, n: int, seed: int = 0) -> Path:
    """LAVIS's list; the image id comes from the file name's trailing number."""
    entries = [{"image": f"val2014/COCO_val2014_{i + 1:012d}.png", "caption": _references(scene)}
               for i, scene in enumerate(scenes(n, seed))]
    path.write_text(json.dumps(entries))
    return path


def write_karpathy_captions(path: Path, n: int, seed: int = 0) -> Path:
    entries = [{"filepath": "val2014", "filename": f"COCO_val2014_{i + 1:012d}.png", "cocoid": i + 1,
                "split": "test" if i < n - 1 else "val", "sentences": [{"raw": c} for c in _references(scene)]}
               for i, scene in enumerate(scenes(n, seed))]
    path.write_text(json.dumps({"images": entries, "dataset": "coco"}))
    return path


def _qa(n: int, seed: int) -> list[tuple[int, str, str, str]]:
    """(image id, question, answer, shapes type): per scene its first color or shape question
    and, in turn, a count or an exists question (all three VQAv2 answer types); deterministic."""
    out = []
    for i, scene in enumerate(scenes(n, seed)):
        qa = world.questions(scene)
        second = "count" if i % 2 else "exists"
        out += [(i + 1, *qa[0])] + [(i + 1, q, a, t) for q, a, t in qa if t == second][:1]
    return out


def write_vqav2(questions: Path, annotations: Path, n: int, seed: int = 0) -> tuple[Path, Path]:
    """VQAv2's pair of files (data_subtype val2014); each answer given by 10 humans, 7 of them
    agreeing and 3 giving "no idea". Answers are stored normalised, as VQAv2's are ("two" is
    "2"): the official evaluation normalises only the predictions' number words."""
    qs, anns = [], []
    for qid, (image_id, q, a, t) in enumerate(_qa(n, seed)):
        a = normalize_answer(a)
        qs.append({"image_id": image_id, "question": q, "question_id": qid})
        answers = [{"answer": a, "answer_confidence": "yes", "answer_id": j + 1} for j in range(7)]
        answers += [{"answer": "no idea", "answer_confidence": "no", "answer_id": j + 8} for j in range(3)]
        anns.append({"question_id": qid, "image_id": image_id, "answers": answers, "multiple_choice_answer": a,
                     "answer_type": ANSWER_TYPE.get(t, "other"), "question_type": t})
    questions.write_text(json.dumps({"data_subtype": "val2014", "task_type": "Open-Ended", "questions": qs}))
    annotations.write_text(json.dumps({"data_subtype": "val2014", "annotations": anns}))
    return questions, annotations


def write_gqa(path: Path, n: int, seed: int = 0) -> Path:
    """GQA's questions file; images are named by imageId (pattern COCO_val2014_{image_id}.png)."""
    out = {f"q{qid}": {"imageId": f"{image_id:012d}", "question": q, "answer": a,
                       "types": {"structural": "verify" if t == "exists" else "query", "semantic": t}}
           for qid, (image_id, q, a, t) in enumerate(_qa(n, seed))}
    path.write_text(json.dumps(out))
    return path


def write_classes(path: Path, root: Path, n: int, seed: int = 0) -> Path:
    """Single-object scenes labelled by their shape, under root/classes/."""
    folder = root / "classes"
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    stream = world.iter_split("test", seed)
    while len(entries) < n:
        scene = next(stream)
        if len(scene.objects) != 1:
            continue
        name = f"classes/{len(entries):04d}.png"
        world.render(scene).save(root / name)
        entries.append({"image": name, "label": scene.objects[0].shape})
    path.write_text(json.dumps({"classes": list(world.SHAPES), "images": entries}))
    return path
