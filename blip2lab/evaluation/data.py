"""The standard evaluation files, read into plain records: which image each item needs, and
the references it is scored against. Nothing here opens an image.

Formats (what LAVIS, the COCO / VQA servers and the dataset sites ship):
- captions (COCO Karpathy test, NoCaps, Flickr30k / COCO retrieval):
  * COCO's caption format, {"images": [{"id", "file_name", "domain"?}], "annotations":
    [{"image_id", "caption"}]} (captions_val2014.json, nocaps_val_4500_captions.json);
  * LAVIS's list, [{"image": path, "caption": str | [str], "image_id"?}]
    (coco_karpathy_test.json, flickr30k_test.json); a missing image_id is the file name's
    trailing number, as LAVIS's eval datasets take it;
  * Karpathy's dataset_coco.json / dataset_flickr30k.json, {"images": [{"filename",
    "filepath"?, "split", "sentences": [{"raw"}]}]}, one split of it.
- VQA: VQAv2's (and OK-VQA's) questions + annotations files; GQA's questions file
  ({question_id: {"imageId", "question", "answer", "types"}}), which carries its answers.
- zero-shot classification: {"classes": [names], "images": [{"image", "label"}]}, or an
  image folder with one sub-folder per class.

Anything that would make a score silently partial is an `EvalInputError` naming the file and
the item: malformed JSON, a reference naming an image or question that is not there, an image
without references, duplicate ids. Missing image files are found by `missing_images`.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

__all__ = ["EvalInputError", "ImageRef", "CaptionSet", "Question", "VQASet", "ClassSet", "read_json",
           "read_captions", "read_vqa", "read_classes", "missing_images"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


class EvalInputError(ValueError):
    """An evaluation file (or the images it names) is not what the task needs; says which item."""


@dataclass(frozen=True)
class ImageRef:
    key: str  # the item's key in predictions.jsonl: unique within a run
    image_id: Any  # as the annotation file spells it (COCO: int)
    path: Path


@dataclass
class CaptionSet:
    images: list[ImageRef]
    references: dict[Any, list[str]]  # image_id -> raw reference captions, in file order
    domains: dict[Any, str] = field(default_factory=dict)  # NoCaps: image_id -> in/near/out-domain


@dataclass(frozen=True)
class Question:
    key: str
    question_id: Any
    image_id: Any
    path: Path
    question: str
    answers: tuple[str, ...]  # VQAv2: the 10 human answers; GQA: the one answer
    answer_type: Optional[str]  # VQAv2 "yes/no" | "number" | "other"; GQA the structural type


@dataclass
class VQASet:
    questions: list[Question]
    format: str  # "vqav2" (also OK-VQA) or "gqa"
    # VQAv2 references are stored normalised: the official eval then only fixes their
    # punctuation (evaluate.vqa_score's official_references); GQA's are normalised like answers.
    official_references: bool


@dataclass
class ClassSet:
    images: list[ImageRef]
    labels: list[int]  # per image, an index into classes
    classes: list[str]


def read_json(path: str | os.PathLike, what: str) -> Any:
    path = Path(path)
    if not path.is_file():
        raise EvalInputError(f"{what} not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise EvalInputError(f"{what} {path} is not valid JSON: {err}") from err
    except UnicodeDecodeError as err:
        raise EvalInputError(f"{what} {path} is not UTF-8 text: {err}") from err


def _need(entry: Any, keys: tuple[str, ...], where: str) -> None:
    if not isinstance(entry, dict):
        raise EvalInputError(f"{where} is {type(entry).__name__}, not an object")
    lacking = [k for k in keys if k not in entry]
    if lacking:
        raise EvalInputError(f"{where} lacks {lacking} (has {sorted(entry)[:8]})")


def _unique(refs: list, file: Path, what: str) -> None:
    seen: dict[str, int] = {}
    for i, r in enumerate(refs):
        if r.key in seen:
            raise EvalInputError(f"{file}: {what} {r.key!r} appears twice (entries {seen[r.key]} and {i})")
        seen[r.key] = i


# -- captions ----------------------------------------------------------------------------------


def read_captions(annotations: str | os.PathLike, images: str | os.PathLike, split: str = "test") -> CaptionSet:
    """A caption file in any of the three formats (module docstring); `split` picks one split
    of a Karpathy file and is ignored by the others (each is one split already)."""
    file, root = Path(annotations), Path(images)
    data = read_json(file, "caption annotation file")
    if isinstance(data, dict) and "annotations" in data:
        out = _coco_captions(data, root, file)
    elif isinstance(data, dict) and isinstance(data.get("images"), list):
        out = _karpathy_captions(data["images"], root, file, split)
    elif isinstance(data, list):
        out = _lavis_captions(data, root, file)
    else:
        raise EvalInputError(f"{file}: expected COCO's {{'images', 'annotations'}}, Karpathy's {{'images': [...]}} "
                             f"or LAVIS's list of {{'image', 'caption'}}")
    if not out.images:
        raise EvalInputError(f"{file}: no image to evaluate" + (f" in split {split!r}" if split else ""))
    _unique(out.images, file, "image id")
    return out


def _coco_captions(data: dict, root: Path, file: Path) -> CaptionSet:
    images, refs, domains = [], {}, {}
    for i, e in enumerate(data.get("images") or []):
        _need(e, ("id", "file_name"), f"{file}: images[{i}]")
        images.append(ImageRef(str(e["id"]), e["id"], root / e["file_name"]))
        refs[e["id"]] = []
        if "domain" in e:
            domains[e["id"]] = e["domain"]
    for i, a in enumerate(data["annotations"]):
        _need(a, ("image_id", "caption"), f"{file}: annotations[{i}]")
        if a["image_id"] not in refs:
            raise EvalInputError(f"{file}: annotations[{i}] names image_id {a['image_id']!r}, which is not in "
                                 f"its 'images'")
        if not isinstance(a["caption"], str):
            raise EvalInputError(f"{file}: annotations[{i}] caption is {type(a['caption']).__name__}, not a string")
        refs[a["image_id"]].append(a["caption"].strip())
    bare = [i for i, r in refs.items() if not r]
    if bare:
        raise EvalInputError(f"{file}: {len(bare)} images have no caption (e.g. image_id {bare[:5]})")
    return CaptionSet(images, refs, domains)


def _karpathy_captions(entries: list, root: Path, file: Path, split: str) -> CaptionSet:
    images, refs = [], {}
    for i, e in enumerate(entries):
        _need(e, ("filename", "sentences"), f"{file}: images[{i}]")
        if e.get("split") != split:
            continue
        image_id = e.get("cocoid", e.get("imgid", e["filename"]))
        images.append(ImageRef(str(image_id), image_id, root / e.get("filepath", "") / e["filename"]))
        refs[image_id] = [s["raw"].strip() for s in e["sentences"]]
        if not refs[image_id]:
            raise EvalInputError(f"{file}: images[{i}] ({e['filename']}) has no sentences")
    return CaptionSet(images, refs)


_TRAILING_NUMBER = re.compile(r"(\d+)$")


def _lavis_captions(entries: list, root: Path, file: Path) -> CaptionSet:
    images, refs = [], {}
    for i, e in enumerate(entries):
        _need(e, ("image", "caption"), f"{file}: entry {i}")
        caps = [e["caption"]] if isinstance(e["caption"], str) else list(e["caption"])
        if not caps or not all(isinstance(c, str) for c in caps):
            raise EvalInputError(f"{file}: entry {i} ({e['image']}) needs a caption string or a list of them")
        # LAVIS's eval datasets: the file name's trailing number (COCO_val2014_000000391895.jpg -> 391895)
        m = _TRAILING_NUMBER.search(Path(e["image"]).stem)
        image_id = e.get("image_id", int(m.group(1)) if m else e["image"])
        if image_id not in refs:  # several entries of one image: its captions merge
            images.append(ImageRef(str(image_id), image_id, root / e["image"]))
            refs[image_id] = []
        refs[image_id].extend(c.strip() for c in caps)
    return CaptionSet(images, refs)


# -- VQA -------------------------------------------------------------------------------------


def read_vqa(questions: str | os.PathLike, annotations: Optional[str | os.PathLike], images: str | os.PathLike,
             image_pattern: Optional[str] = None, subset: Optional[str] = None) -> VQASet:
    """VQAv2 / OK-VQA (questions + annotations) or GQA (questions carry the answers).
    image_pattern: the file under `images`, formatted with image_id (and subset); default
    COCO_{subset}_{image_id:012d}.jpg (VQAv2) or {image_id}.jpg (GQA). subset: default the
    questions file's data_subtype, test-dev2015 read as test2015 (its images' folder)."""
    qfile = Path(questions)
    qdata = read_json(qfile, "VQA questions file")
    if isinstance(qdata, dict) and "questions" in qdata:
        if annotations is None:
            raise EvalInputError(f"{qfile} is a VQAv2-format questions file: pass its annotations file too")
        adata = read_json(annotations, "VQA annotations file")
        if not isinstance(adata, dict) or not isinstance(adata.get("annotations"), list):
            raise EvalInputError(f"{annotations}: expected {{'annotations': [...]}} (VQAv2 format)")
        items = _vqav2(qdata, adata["annotations"], Path(images), image_pattern, subset, qfile, Path(annotations))
        out = VQASet(items, "vqav2", official_references=True)
    elif isinstance(qdata, dict) and qdata and all(isinstance(v, dict) and "imageId" in v for v in qdata.values()):
        items = _gqa(qdata, Path(images), image_pattern or "{image_id}.jpg", qfile)
        out = VQASet(items, "gqa", official_references=False)
    else:
        raise EvalInputError(f"{qfile}: expected VQAv2's {{'questions': [...]}} or GQA's {{question_id: "
                             f"{{'imageId', 'question', 'answer'}}}}")
    if not out.questions:
        raise EvalInputError(f"{qfile} holds no questions")
    _unique(out.questions, qfile, "question_id")
    return out


def _vqav2(qdata: dict, annotations: list, root: Path, pattern: Optional[str], subset: Optional[str],
           qfile: Path, afile: Path) -> list[Question]:
    subset = subset or (qdata.get("data_subtype") or "").replace("test-dev", "test") or None
    pattern = pattern or "COCO_{subset}_{image_id:012d}.jpg"
    if "{subset" in pattern and subset is None:
        raise EvalInputError(f"{qfile} has no data_subtype for the image pattern {pattern!r}: pass --subset "
                             f"(e.g. val2014) or --image-pattern")
    by_qid = {}
    for i, a in enumerate(annotations):
        _need(a, ("question_id", "answers"), f"{afile}: annotations[{i}]")
        by_qid[a["question_id"]] = a
    qids = set()
    out = []
    for i, q in enumerate(qdata["questions"]):
        _need(q, ("question_id", "image_id", "question"), f"{qfile}: questions[{i}]")
        qids.add(q["question_id"])
        a = by_qid.get(q["question_id"])
        if a is None:
            raise EvalInputError(f"{qfile}: question_id {q['question_id']} (questions[{i}]) has no annotation in "
                                 f"{afile}; are the files a pair?")
        answers = tuple(x["answer"] for x in a["answers"])
        if not answers:
            raise EvalInputError(f"{afile}: question_id {q['question_id']} has no answers")
        path = root / pattern.format(subset=subset, image_id=q["image_id"])
        out.append(Question(str(q["question_id"]), q["question_id"], q["image_id"], path, q["question"], answers,
                            a.get("answer_type")))
    orphans = [qid for qid in by_qid if qid not in qids]
    if orphans:
        raise EvalInputError(f"{afile}: {len(orphans)} annotations have no matching question in {qfile} "
                             f"(e.g. question_id {orphans[:5]})")
    return out


def _gqa(qdata: dict, root: Path, pattern: str, qfile: Path) -> list[Question]:
    out = []
    for qid, q in qdata.items():
        _need(q, ("imageId", "question", "answer"), f"{qfile}: question {qid}")
        kind = (q.get("types") or {}).get("structural")
        out.append(Question(str(qid), qid, q["imageId"], root / pattern.format(image_id=q["imageId"]), q["question"],
                            (q["answer"],), kind))
    return out


# -- zero-shot classification ------------------------------------------------------------------


def read_classes(annotations: Optional[str | os.PathLike], images: str | os.PathLike) -> ClassSet:
    """A labelled image list ({"classes", "images": [{"image", "label": name or index}]}) or,
    without `annotations`, `images/<class>/<file>` folders (class names: folder names, "_" as " ")."""
    root = Path(images)
    if annotations is None:
        return _class_folders(root)
    file = Path(annotations)
    data = read_json(file, "classification file")
    _need(data, ("classes", "images"), str(file))
    classes = [str(c) for c in data["classes"]]
    index = {c: i for i, c in enumerate(classes)}
    refs, labels = [], []
    for i, e in enumerate(data["images"]):
        _need(e, ("image", "label"), f"{file}: images[{i}]")
        label = e["label"]
        k = label if isinstance(label, int) and 0 <= label < len(classes) else index.get(str(label))
        if k is None:
            raise EvalInputError(f"{file}: images[{i}] ({e['image']}) has label {label!r}, not one of its classes")
        refs.append(ImageRef(str(e["image"]), e["image"], root / e["image"]))
        labels.append(k)
    out = ClassSet(refs, labels, classes)
    _unique(out.images, file, "image")
    return out


def _class_folders(root: Path) -> ClassSet:
    if not root.is_dir():
        raise EvalInputError(f"image folder not found: {root}")
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    refs, labels = [], []
    for k, folder in enumerate(folders):
        for f in sorted(folder.iterdir()):
            if f.suffix.lower() in IMAGE_SUFFIXES:
                refs.append(ImageRef(f"{folder.name}/{f.name}", f"{folder.name}/{f.name}", f))
                labels.append(k)
    if len(folders) < 2 or not refs:
        raise EvalInputError(f"{root}: expected one sub-folder of images per class (at least two classes), or "
                             f"pass --annotations")
    return ClassSet(refs, labels, [f.name.replace("_", " ") for f in folders])


def missing_images(items: list) -> list:
    """The items (anything with a `path`) whose image file does not exist."""
    return [it for it in items if not it.path.is_file()]
