"""A user's training data, in the file formats people have: what `blip2lab train` and
`blip2lab capfilt` read (`DataConfig`, `open_data`) and what capfilt writes (`write_captions`).

Formats (`DataConfig.format`, "auto" tells them apart by name and content):
    coco        COCO captions JSON: official ({"images": [{id, file_name}], "annotations":
                [{image_id, caption}]}) or Karpathy's ({"images": [{filename, sentences}]})
    lavis       LAVIS's list JSON [{"image": path, "caption": str | [str]}]
    csv, jsonl  rows with `image` and `caption` columns (names: image_column, text_column)
    folder      a folder of images with `captions.csv` or `captions.jsonl` beside them
    vqav2       VQAv2 questions JSON (`path`) + annotations JSON (`annotations`)
    lavis_vqa   LAVIS's VQA list [{"image", "question", "answer": str | [str]}]
    hf          a Hugging Face `datasets` dataset saved with `save_to_disk` (columns named
                by image_column / text_column, or question_column / answer_column)
    webdataset  `.tar` shards (a file, a brace pattern, or a folder of them): streamed, split
                over ranks and DataLoader workers (training/datasets.py)

Image paths are relative to `images` (default: the caption file's folder). Every item is a
plain dict of a PIL image and strings (STYLE.md point 7); tensors are made by the collate
functions of training/run.py through the processor.

Bad input (the issue's contract): a caption file whose rows lack the named column is an
error naming the column and row; an empty caption and a missing image file are counted
skips, dropped before training (checked at construction: `os.path.isfile` per image); an
unreadable (corrupt) image is a counted skip replaced by the next good item when read
(`datasets._MapStyle`); a shard cut short (its end is not a tar's end) is a counted skip
of that shard ("cut_short"), one that cannot be read a counted skip of its rest.
`report()` says what was skipped; the train command prints it at the start and the end.
"""

from __future__ import annotations

import csv
import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

from PIL import Image
from torch.utils.data import Dataset

from ..config import ConfigError
from ..images import DEFAULT_MAX_PIXELS, CropConfig
from ..processor import clean_caption
from .datasets import WebDatasetCaptions, _MapStyle, most_common_answer

__all__ = ["DataConfig", "Record", "CaptionRecords", "HFCaptions", "open_data", "read_records", "write_captions",
           "detect_format", "CAPTION_FILES"]

Format = Literal["auto", "coco", "lavis", "csv", "jsonl", "folder", "vqav2", "lavis_vqa", "hf", "webdataset"]
CAPTION_FILES = ("captions.csv", "captions.jsonl")  # what a folder of images holds beside them
VQA_FORMATS = ("vqav2", "lavis_vqa")


@dataclass
class DataConfig:
    """Where the training data is and how to read it (the train and capfilt commands)."""

    path: str = ""  # a caption file, a folder, a saved `datasets` dataset, or webdataset shard(s)
    images: Optional[str] = None  # image root for relative paths; None: the caption file's folder
    format: Format = "auto"  # "auto": by extension and content (detect_format)
    annotations: Optional[str] = None  # VQAv2's annotations file (the questions file is `path`)
    image_column: str = "image"  # CSV / JSONL / `datasets` columns
    text_column: str = "caption"
    question_column: str = "question"
    answer_column: str = "answer"
    split: str = "train"  # Karpathy's split, or the split of a saved DatasetDict
    # VQAv2 image files under `images`: formatted with image_id and subset (the official names)
    image_pattern: str = "COCO_{subset}_{image_id:012d}.jpg"
    clean: bool = True  # LAVIS's pre_caption on captions (lower case, punctuation stripped)
    # The paper's training augmentation (Sec. 4: random resized crop 0.5-1.0 + flip), one fresh
    # view per item per epoch. The shapes world needs hflip off and scale (1, 1): its captions
    # name left / right and every object.
    crop: CropConfig = CropConfig()
    num_workers: int = 0  # DataLoader workers making batches (0: in the training process)
    shuffle_buffer: int = 1000  # webdataset: sample shuffle buffer (0: stream in order)

    def __post_init__(self) -> None:
        if self.num_workers < 0 or self.shuffle_buffer < 0:
            raise ConfigError("data.num_workers and data.shuffle_buffer must be >= 0")

    @property
    def is_vqa(self) -> bool:
        return detect_format(self) in VQA_FORMATS


@dataclass
class Record:
    """One (image, text) item of a caption file, or one (image, question, answers) item."""

    path: str
    text: str = ""
    image_id: int = 0  # items of one image share it (stage 1: never each other's ITM negative)
    question: Optional[str] = None
    answers: tuple = ()


# -- format detection --------------------------------------------------------------------------


def detect_format(cfg: DataConfig) -> str:
    """The format of `cfg.path` (`cfg.format` unless "auto"); an error says what was found."""
    if cfg.format != "auto":
        return cfg.format
    path = Path(cfg.path)
    if not cfg.path:
        raise ConfigError("data.path is empty: pass --data PATH (a caption file, a folder, a dataset or shards)")
    if "{" in cfg.path or path.suffix == ".tar":
        return "webdataset"
    if path.is_dir():
        if any((path / name).is_file() for name in CAPTION_FILES):
            return "folder"
        if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
            return "hf"
        if any(path.glob("*.tar")):
            return "webdataset"
        raise ConfigError(f"data.path {path} is a folder without {' or '.join(CAPTION_FILES)}, a saved `datasets` "
                          f"dataset or .tar shards")
    if not path.is_file():
        raise FileNotFoundError(f"data.path not found: {path}")
    if path.suffix in (".csv", ".jsonl"):
        return path.suffix[1:]
    if path.suffix == ".json":
        return _json_format(_read_json(path))
    raise ConfigError(f"data.path {path}: unknown file type {path.suffix!r} (expected .json, .csv, .jsonl, .tar)")


def _json_format(data: Any) -> str:
    if isinstance(data, dict) and "questions" in data:
        return "vqav2"
    if isinstance(data, dict) and "images" in data:
        return "coco"
    if isinstance(data, list) and data and isinstance(data[0], dict):
        return "lavis_vqa" if "question" in data[0] else "lavis"
    raise ConfigError("a caption JSON must be COCO's {'images': ...}, VQAv2's {'questions': ...} or LAVIS's list "
                      "of {'image', 'caption' | 'question'} entries")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e


# -- readers: every format -> a list of Records --------------------------------------------------


def read_records(cfg: DataConfig) -> tuple[list[Record], str]:
    """(records, the image root) of a caption or VQA file, or of a folder."""
    fmt = detect_format(cfg)
    path = Path(cfg.path)
    if fmt == "folder":
        file = next(path / name for name in CAPTION_FILES if (path / name).is_file())
        root = Path(cfg.images) if cfg.images else path
        return _READERS[file.suffix[1:]](file, cfg), str(root)
    if fmt not in _READERS:
        raise ConfigError(f"data.format {fmt!r} is not a caption file (read it with open_data)")
    root = Path(cfg.images) if cfg.images else path.parent
    return _READERS[fmt](path, cfg), str(root)


def _image_ids(records: list[Record]) -> list[Record]:
    """Number the distinct image paths in order of first appearance."""
    ids: dict[str, int] = {}
    for r in records:
        r.image_id = ids.setdefault(r.path, len(ids))
    return records


def _captions(value: Any) -> list[str]:
    return [value] if isinstance(value, str) else [str(v) for v in (value or [])]


def _coco(path: Path, cfg: DataConfig) -> list[Record]:
    data = _read_json(path)
    if "annotations" in data:  # official COCO: images by id, one annotation per caption
        files = {img["id"]: img["file_name"] for img in data["images"]}
        missing = [a["image_id"] for a in data["annotations"] if a["image_id"] not in files]
        if missing:
            raise ValueError(f"{path}: annotations name image_id(s) {missing[:3]} that 'images' lacks")
        return _image_ids([Record(files[a["image_id"]], a.get("caption", "")) for a in data["annotations"]])
    wanted = ("train", "restval") if cfg.split == "train" else (cfg.split,)
    rows = []  # Karpathy's: one entry per image with its sentences
    for img in data["images"]:
        if img.get("split", cfg.split) in wanted:
            rel = os.path.join(img.get("filepath", ""), img["filename"])
            rows += [Record(rel, s.get("raw", "")) for s in img.get("sentences", [])]
    return _image_ids(rows)


def _lavis(path: Path, cfg: DataConfig) -> list[Record]:
    rows = []
    for i, e in enumerate(_read_json(path)):
        if "image" not in e:
            raise ValueError(f"{path}: entry {i} has no 'image' field")
        rows += [Record(e["image"], c) for c in _captions(e.get("caption"))] or [Record(e["image"], "")]
    return _image_ids(rows)


def _table_rows(path: Path) -> list[dict]:
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {n} is not valid JSON: {e}") from e
    return rows


def _column(row: dict, name: str, field: str, path: Path, n: int) -> Any:
    if name not in row:
        raise ValueError(f"{path}: row {n} has no {name!r} column (data.{field}; columns: {sorted(row)})")
    return row[name]


def _table(path: Path, cfg: DataConfig) -> list[Record]:
    """CSV or JSONL rows: image + caption, or image + question + answer (VQA)."""
    rows = _table_rows(path)
    if not rows:
        raise ValueError(f"{path} holds no rows")
    vqa = cfg.question_column in rows[0] and cfg.text_column not in rows[0]
    out = []
    for n, row in enumerate(rows, 1):
        image = str(_column(row, cfg.image_column, "image_column", path, n))
        if vqa:
            q = _column(row, cfg.question_column, "question_column", path, n)
            answers = tuple(_captions(_column(row, cfg.answer_column, "answer_column", path, n)))
            out.append(Record(image, answers[0] if answers else "", question=q, answers=answers))
        else:
            out.append(Record(image, str(_column(row, cfg.text_column, "text_column", path, n) or "")))
    return _image_ids(out)


def _lavis_vqa(path: Path, cfg: DataConfig) -> list[Record]:
    out = []
    for i, e in enumerate(_read_json(path)):
        if "image" not in e or "question" not in e:
            raise ValueError(f"{path}: entry {i} needs 'image' and 'question'")
        answers = tuple(_captions(e.get("answer")))
        out.append(Record(e["image"], most_common_answer(answers) or "", question=e["question"], answers=answers))
    return _image_ids(out)


def _vqav2(path: Path, cfg: DataConfig) -> list[Record]:
    if cfg.annotations is None:
        raise ConfigError(f"{path} is a VQAv2 questions file: name its annotations with data.annotations")
    questions, annotations = _read_json(path), _read_json(Path(cfg.annotations))
    by_qid = {a["question_id"]: a for a in annotations.get("annotations", [])}
    subset = (questions.get("data_subtype") or "").replace("test-dev", "test")
    out = []
    for q in questions["questions"]:
        a = by_qid.get(q["question_id"])
        if a is None:
            raise ValueError(f"question_id {q['question_id']} of {path} has no annotation in {cfg.annotations}")
        answers = tuple(x["answer"] for x in a.get("answers", []))
        answer = a.get("multiple_choice_answer") or most_common_answer(answers) or ""
        out.append(Record(cfg.image_pattern.format(subset=subset, image_id=q["image_id"]), answer,
                          question=q["question"], answers=answers))
    return _image_ids(out)


_READERS = {"coco": _coco, "lavis": _lavis, "csv": _table, "jsonl": _table, "lavis_vqa": _lavis_vqa,
            "vqav2": _vqav2}


# -- datasets ---------------------------------------------------------------------------------


class CaptionRecords(_MapStyle, Dataset):
    """Records as a map-style dataset. Empty captions and missing image files are dropped at
    construction and counted ("empty_caption", "missing"); an unreadable image is counted
    and replaced by the next good item when read (`_MapStyle`).
    Items: {"image": PIL RGB, "text", "image_id", "index", "epoch"} (+ "question", "answers")."""

    def __init__(self, records: list[Record], image_root: str, clean: bool = True, name: str = "data"):
        self.name, self.epoch, self.max_pixels, self.image_size = name, 0, DEFAULT_MAX_PIXELS, None
        self._init_map()
        kept = []
        for r in records:
            full = r.path if os.path.isabs(r.path) else os.path.join(image_root, r.path)
            text = clean_caption(r.text) if clean and r.question is None else r.text.strip()
            if not text:
                self._skip("empty_caption", f"{r.path} (image_id {r.image_id})")
            elif not os.path.isfile(full):
                self._skip("missing", full)
            else:
                kept.append(Record(full, text, r.image_id, r.question, r.answers))
        if not kept:
            raise ValueError(f"{name}: no usable item ({self._skip_summary()})")
        self._items = kept

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _make(self, j: int, image: Image.Image) -> dict:
        r = self._items[j]
        item = {"image": image, "text": r.text, "image_id": r.image_id, "index": j, "epoch": self.epoch}
        return item if r.question is None else item | {"question": r.question, "answers": list(r.answers)}

    def report(self) -> str:
        return f"{self.name}: {len(self)} items; {self._skip_summary()}"


class HFCaptions(_MapStyle, Dataset):
    """A `datasets` dataset saved on disk: an image column (PIL images, {"bytes"/"path"}
    dicts or path strings) and a text column (or question / answer columns)."""

    def __init__(self, cfg: DataConfig):
        import datasets

        ds = datasets.load_from_disk(cfg.path)
        if isinstance(ds, datasets.DatasetDict):
            if cfg.split not in ds:
                raise ConfigError(f"data.split {cfg.split!r} is not a split of {cfg.path} (splits: {sorted(ds)})")
            ds = ds[cfg.split]
        self.vqa = cfg.question_column in ds.column_names and cfg.text_column not in ds.column_names
        needed = [cfg.image_column] + ([cfg.question_column, cfg.answer_column] if self.vqa else [cfg.text_column])
        lacking = [c for c in needed if c not in ds.column_names]
        if lacking:
            raise ConfigError(f"{cfg.path} has no column(s) {lacking} (data.image_column / data.text_column; "
                              f"columns: {ds.column_names})")
        self.ds, self.cfg, self.epoch, self.max_pixels, self.image_size = ds, cfg, 0, DEFAULT_MAX_PIXELS, None
        self._init_map()
        self._items = [Record(f"{cfg.path}[{i}]") for i in range(len(ds))]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _load(self, path: str) -> Optional[Image.Image]:
        row = self.ds[int(path.rsplit("[", 1)[1][:-1])]
        value = row[self.cfg.image_column]
        if isinstance(value, dict):
            value = value.get("bytes") or value.get("path")
        return self._open(value, path)

    def _make(self, j: int, image: Image.Image) -> dict:
        row, cfg = self.ds[j], self.cfg
        item = {"image": image, "image_id": j, "index": j, "epoch": self.epoch}
        if self.vqa:
            answers = _captions(row[cfg.answer_column])
            return item | {"text": answers[0] if answers else "", "question": row[cfg.question_column],
                           "answers": answers}
        return item | {"text": str(row[cfg.text_column] or "").strip()}

    def report(self) -> str:
        return f"{self.cfg.path}: {len(self)} items; {self._skip_summary()}"


class Shards(WebDatasetCaptions):
    """WebDataset shards with the items the collate functions expect (index, epoch, an
    integer image_id from the sample key)."""

    def _shards(self):
        """This rank's shards, less those cut short (counted "cut_short"): a tar ends in two
        zero blocks within its last 512-byte records, and a stream reader would otherwise end
        quietly inside the last sample (a caption cut in half, an image lost unsaid)."""
        for shard in super()._shards():
            if _cut_short(shard["url"]):
                self._skip("cut_short", shard["url"], "the tar does not end where tar files end")
            else:
                yield shard

    def _decode(self, sample: dict) -> Optional[dict]:
        item = super()._decode(sample)
        if item is None:
            return None
        if not item["text"]:
            self._skip("empty_caption", str(item["image_id"]))
            return None
        key = zlib.crc32(str(item["image_id"]).encode())
        return item | {"image_id": key, "index": key, "epoch": self.epoch}


def _cut_short(url: str) -> bool:
    if "://" in url or url.startswith("pipe:"):
        return False  # a remote stream is checked by tarfile as it reads
    size = os.path.getsize(url)
    if size < 1024 or size % 512:
        return True
    with open(url, "rb") as f:
        f.seek(size - 1024)
        return f.read(1024) != bytes(1024)


def _shard_urls(path: str) -> str | list[str]:
    p = Path(path)
    if p.is_dir():
        urls = sorted(str(u) for u in p.glob("*.tar"))
        if not urls:
            raise ConfigError(f"data.path {p} holds no .tar shards")
        return urls
    return path


def open_data(cfg: DataConfig, rank: Optional[int] = None, world_size: Optional[int] = None, seed: int = 0):
    """The dataset of `cfg`: map-style (every format but webdataset) or an iterable of shards."""
    fmt = detect_format(cfg)
    if fmt == "webdataset":
        return Shards(_shard_urls(cfg.path), shuffle=cfg.shuffle_buffer, rank=rank, world_size=world_size,
                      seed=seed, clean=cfg.clean)
    if fmt == "hf":
        return HFCaptions(cfg)
    records, root = read_records(cfg)
    return CaptionRecords(records, root, clean=cfg.clean, name=cfg.path)


# -- writing (capfilt's output) ----------------------------------------------------------------


def write_captions(rows: list[dict], path: str | Path) -> Path:
    """Rows of {"image": path, "caption": str} as a caption file every reader above takes:
    by extension, LAVIS's list JSON (.json, captions of one image merged), CSV or JSONL."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    if path.suffix == ".csv":
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=["image", "caption"])
            writer.writeheader()
            writer.writerows({"image": r["image"], "caption": r["caption"]} for r in rows)
    elif path.suffix == ".jsonl":
        tmp.write_text("".join(json.dumps({"image": r["image"], "caption": r["caption"]}) + "\n" for r in rows))
    elif path.suffix == ".json":
        merged: dict[str, list[str]] = {}
        for r in rows:
            merged.setdefault(r["image"], []).append(r["caption"])
        tmp.write_text(json.dumps([{"image": k, "caption": v} for k, v in merged.items()], indent=1) + "\n")
    else:
        raise ValueError(f"{path}: write .json (LAVIS list), .csv or .jsonl")
    tmp.replace(path)
    return path

