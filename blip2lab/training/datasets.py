"""Datasets of BLIP-2's data: COCO captions (Karpathy split), VQAv2, WebDataset shards.

Every dataset yields plain dicts of a PIL image (upright 8-bit RGB, opened by
`blip2lab.processor.load_image`) and strings; tensors are made later by the processor in the
collate function (STYLE.md point 7), so these files know nothing of tokenizers.

Sources: LAVIS `coco_caption_datasets.py`, `retrieval_datasets.py`, `vqa_datasets.py`,
`laion_dataset.py` (what each item holds), Karpathy's `dataset_coco.json` and the official
VQAv2 files (the formats read here).

Bad images. A missing or unreadable image is skipped, counted and reported, never a crash:
every dataset has `skipped` (a Counter keyed by reason: "missing", "unreadable", and for
shards "no_text" and "bad_shard"), `skipped_paths` (the first MAX_EXAMPLES offenders) and
`report()`. The first MAX_EXAMPLES skips are also logged as warnings, which is what you see
of the skips that happen inside DataLoader worker processes (each worker counts in its own
copy of the dataset).
- Map-style datasets (CocoCaptions, VQAv2) substitute: item i whose image fails is replaced
  by the next item (i+1, i+2, ..., wrapping) whose image loads. Deterministic for a given
  set of bad files, so `BatchStream`'s "batches are a pure function of the step" holds.
  A bad path is remembered and counted once per process, not once per epoch.
  Substitution keeps training going but would silently misalign evaluation (a prediction
  for image i made from image i+1); for evaluation pass `verify_images=True`: every image
  is opened once at construction and items with a bad image are dropped, so references(),
  retrieval_index() and len() cover only the good ones.
- The iterable WebDataset stream simply skips a bad sample, counting it each time it is met.
"""

from __future__ import annotations

import collections
import io
import itertools
import json
import logging
import os
import random
import re
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch
from PIL import Image
from torch.utils.data import Dataset, IterableDataset

from blip2lab import dist
from blip2lab.images import DEFAULT_MAX_PIXELS, load_image
from blip2lab.processor import clean_caption

__all__ = [
    "MAX_EXAMPLES",
    "CocoCaptions",
    "VQAv2",
    "WebDatasetCaptions",
    "webdataset_captions",
    "most_common_answer",
]

log = logging.getLogger(__name__)

MAX_EXAMPLES = 5  # offending paths kept in `skipped_paths` and logged, per dataset (per process)
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # what a WebDataset sample's image may be stored as


# -- skipping bad images ---------------------------------------------------------------------


class _SkipLog:
    """The skip counter every dataset carries (see the module docstring)."""

    def _init_skips(self) -> None:
        self.skipped: collections.Counter = collections.Counter()  # reason -> how many
        self.skipped_paths: list[str] = []  # the first MAX_EXAMPLES offenders

    def _skip(self, reason: str, path: str, error: Any = None) -> None:
        self.skipped[reason] += 1
        if len(self.skipped_paths) < MAX_EXAMPLES:
            self.skipped_paths.append(str(path))
            log.warning("%s: skipped %s (%s)%s", type(self).__name__, path, reason, f": {error}" if error else "")

    def _open(self, source: Any, name: str) -> Optional[Image.Image]:
        """load_image, or None (counted) when the image is missing or unreadable."""
        try:
            return load_image(source, max_pixels=self.max_pixels, target_size=self.image_size)
        except FileNotFoundError as e:
            self._skip("missing", name, e)
        except (ValueError, OSError) as e:  # ValueError: corrupt/too large; OSError: a folder, no permission
            self._skip("unreadable", name, e)
        return None

    def _skip_summary(self) -> str:
        total = sum(self.skipped.values())
        if total == 0:
            return "nothing skipped"
        reasons = ", ".join(f"{reason} {n}" for reason, n in sorted(self.skipped.items()))
        return f"skipped {total} ({reasons}), e.g. {', '.join(self.skipped_paths)}"


def _need_file(path: str | os.PathLike, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def _read_json(path: str | os.PathLike, what: str) -> Any:
    path = _need_file(path, what)
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{what} {path} is not valid JSON: {e}") from e


class _MapStyle(_SkipLog):
    """Substitution of bad images for map-style datasets: subclasses provide `_items`, a list
    whose entries have a `path`, and `_make(j, image)` building the dict of item j."""

    _items: list

    def _init_map(self) -> None:
        self._init_skips()
        self._bad: set[str] = set()  # so each bad file is opened and counted once

    def _load(self, path: str) -> Optional[Image.Image]:
        if path in self._bad:
            return None
        image = self._open(path, path)
        if image is None:
            self._bad.add(path)
        return image

    def _verified(self, entries: list) -> list:
        """`entries` (with a `path`) whose image loads; each file opened once (verify_images)."""
        good: dict[str, bool] = {}
        for e in entries:
            if e.path not in good:
                good[e.path] = self._load(e.path) is not None
        return [e for e in entries if good[e.path]]

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i: int) -> dict:
        n = len(self._items)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {type(self).__name__} of {n} items")
        i %= n
        for j in itertools.chain(range(i, n), range(i)):  # the next good item, wrapping around
            image = self._load(self._items[j].path)
            if image is not None:
                return self._make(j, image)
        raise RuntimeError(f"{type(self).__name__}: no readable image at all; {self._skip_summary()}")

    def _make(self, j: int, image: Image.Image) -> dict:
        raise NotImplementedError


# -- COCO captions ---------------------------------------------------------------------------


class _Image:
    """One image of a caption dataset: where it is and its captions."""

    __slots__ = ("path", "image_id", "captions", "first_text")

    def __init__(self, path: str, image_id: Any, captions: list[str]):
        self.path, self.image_id, self.captions, self.first_text = path, image_id, captions, 0


class _CaptionItem:
    __slots__ = ("path", "image", "caption")

    def __init__(self, path: str, image: int, caption: Optional[int]):
        self.path, self.image, self.caption = path, image, caption  # caption None: one item per image


_COCO_ID = re.compile(r"(\d+)$")


def _id_from_name(rel_path: str) -> Any:
    """LAVIS's rule for test entries without image_id: the trailing number of the file name
    (COCO_val2014_000000391895.jpg -> 391895), else the relative path itself."""
    m = _COCO_ID.search(Path(rel_path).stem)
    return int(m.group(1)) if m else rel_path


class CocoCaptions(_MapStyle, Dataset):
    """COCO-style captions: an image folder and one annotation file, in either format.

    - Karpathy's `dataset_coco.json` (also Flickr30k's `dataset_flickr30k.json`):
      {"images": [{"filepath", "filename", "split", "cocoid" | "imgid", "sentences": [{"raw"}]}]}.
      `split` selects "train", "val" or "test"; "restval" (the 30k val2014 images left over
      by Karpathy's 5k/5k val/test split) counts as "train", the Karpathy convention BLIP-2
      and LAVIS train on. The image is image_root/filepath/filename (filepath may be absent,
      as in Flickr30k). image_id is cocoid, else imgid.
    - LAVIS's annotation lists (`coco_karpathy_{train,val,test}.json`):
      [{"image": path relative to image_root, "caption": str | [str], "image_id"?}].
      Each file is already one split, so `split` selects nothing here (it only names the
      dataset); entries of the same image are merged. A missing image_id is taken from the
      file name as LAVIS's eval datasets do (..._000000391895.jpg -> 391895).

    Items: {"image": PIL RGB, "text": str, "image_id", "image_index": position in
    image_ids, "text_index": position in texts()}; with `one_per_image`, one item per image
    whose "text" is its first caption and "captions" all of them (for caption evaluation),
    and item i is image i.
    clean: apply `clean_caption` (LAVIS's pre_caption: lower case, punctuation stripped, at
        most max_words words) to item texts and texts(); references() always stay raw, as
        COCO's evaluation tokenises the raw ground truth itself.
    verify_images, image_size, max_pixels: see the module docstring and `load_image`.
    """

    def __init__(self, annotation_json: str | os.PathLike, image_root: str | os.PathLike, split: str = "train",
                 one_per_image: bool = False, clean: bool = True, max_words: int = 50,
                 verify_images: bool = False, image_size: Optional[int] = None,
                 max_pixels: Optional[int] = DEFAULT_MAX_PIXELS):
        if split not in ("train", "val", "test"):
            raise ValueError(f"split must be 'train', 'val' or 'test' ('restval' is part of 'train'), got {split!r}")
        self.split, self.one_per_image, self.clean, self.max_words = split, one_per_image, clean, max_words
        self.image_root, self.image_size, self.max_pixels = Path(image_root), image_size, max_pixels
        self.annotation_json = Path(annotation_json)
        data = _read_json(annotation_json, "caption annotation file")
        if isinstance(data, dict) and "images" in data:
            self._images = self._from_karpathy(data["images"])
        elif isinstance(data, list):
            self._images = self._from_lavis(data)
        else:
            raise ValueError(f"{annotation_json}: expected Karpathy's {{'images': [...]}} or LAVIS's list of "
                             f"{{'image', 'caption'}} entries")
        if not self._images:
            raise ValueError(f"{annotation_json}: no image with a caption in split {split!r}")
        self._init_map()
        if verify_images:
            self._images = self._verified(self._images)
        self._texts: list[str] = []
        for img in self._images:
            img.first_text = len(self._texts)
            self._texts.extend(self._text(c) for c in img.captions)
        self._items = [_CaptionItem(img.path, k, c)
                       for k, img in enumerate(self._images)
                       for c in ([None] if one_per_image else range(len(img.captions)))]

    def _from_karpathy(self, entries: list[dict]) -> list[_Image]:
        wanted = ("train", "restval") if self.split == "train" else (self.split,)
        images = []
        for e in entries:
            if e.get("split") not in wanted:
                continue
            rel = os.path.join(e.get("filepath", ""), e["filename"])
            image_id = e["cocoid"] if "cocoid" in e else e.get("imgid", rel)
            captions = [s["raw"].strip() for s in e.get("sentences", [])]
            if captions:
                images.append(_Image(str(self.image_root / rel), image_id, captions))
        return images

    def _from_lavis(self, entries: list[dict]) -> list[_Image]:
        by_path: dict[str, _Image] = {}
        for e in entries:
            caps = e.get("caption", [])
            caps = [caps] if isinstance(caps, str) else list(caps)
            rel = e["image"]
            img = by_path.get(rel)
            if img is None:
                img = by_path[rel] = _Image(str(self.image_root / rel), e.get("image_id", _id_from_name(rel)), [])
            img.captions.extend(c.strip() for c in caps)
        return [img for img in by_path.values() if img.captions]

    def _text(self, caption: str) -> str:
        return clean_caption(caption, self.max_words) if self.clean else caption

    def _make(self, j: int, image: Image.Image) -> dict:
        it = self._items[j]
        img = self._images[it.image]
        if it.caption is None:
            texts = self._texts[img.first_text: img.first_text + len(img.captions)]
            return {"image": image, "text": texts[0], "captions": texts, "image_id": img.image_id,
                    "image_index": it.image, "text_index": img.first_text}
        t = img.first_text + it.caption
        return {"image": image, "text": self._texts[t], "image_id": img.image_id,
                "image_index": it.image, "text_index": t}

    @property
    def image_ids(self) -> list:
        """The images' ids in dataset order (the order of retrieval_index's image indices)."""
        return [img.image_id for img in self._images]

    def texts(self) -> list[str]:
        """Every caption, image by image (cleaned if `clean`): retrieval's text gallery."""
        return list(self._texts)

    def references(self) -> dict[Any, list[str]]:
        """{image_id: [raw captions]}, the ground truth of caption evaluation."""
        return {img.image_id: list(img.captions) for img in self._images}

    def retrieval_index(self) -> tuple[list[list[int]], list[int]]:
        """(img2txts, txt2img) for image-text retrieval (LAVIS `RetrievalEvalDataset`):
        img2txts[k] = the texts() indices of image k's captions (k indexes image_ids),
        txt2img[t] = the image index of text t."""
        img2txts, txt2img = [], []
        for k, img in enumerate(self._images):
            img2txts.append(list(range(img.first_text, img.first_text + len(img.captions))))
            txt2img.extend([k] * len(img.captions))
        return img2txts, txt2img

    def report(self) -> str:
        return (f"{type(self).__name__}({self.annotation_json.name}, {self.split}): {len(self._images)} images, "
                f"{len(self)} items; {self._skip_summary()}")


# -- VQAv2 -----------------------------------------------------------------------------------


def most_common_answer(answers: Sequence[str]) -> Optional[str]:
    """The most frequent answer; a tie goes to the one given first. None for no answers."""
    return collections.Counter(answers).most_common(1)[0][0] if answers else None


class _Question:
    __slots__ = ("path", "question", "annotation")

    def __init__(self, path: str, question: dict, annotation: Optional[dict]):
        self.path, self.question, self.annotation = path, question, annotation


class VQAv2(_MapStyle, Dataset):
    """VQAv2 in its official format, one item per question.

    questions_json: {"questions": [{"image_id", "question", "question_id"}], "data_subtype"?}.
    annotations_json: {"annotations": [{"question_id", "answers": [{"answer"}] (10),
        "multiple_choice_answer", "answer_type", "question_type"}]}; None for questions
        without public answers (test-dev, test), whose items have answers [] and answer None.
        Every question must have an annotation when the file is given.
    image_pattern: the image file under image_root, formatted with image_id and subset.
    subset: the image folder's name for `{subset}` (e.g. "val2014"); by default the
        questions file's data_subtype, where "test-dev2015" becomes "test2015" because
        test-dev's images are a subset of test2015's files.

    Items: {"image", "question", "question_id", "image_id", "answers": the 10 answers,
    "answer": multiple_choice_answer (the official most frequent answer), or the most
    common of `answers` when that field is absent, "answer_weights": {answer: count / 10}
    (LAVIS's VQA training weights), "answer_type", "question_type"}.
    """

    def __init__(self, questions_json: str | os.PathLike, annotations_json: Optional[str | os.PathLike],
                 image_root: str | os.PathLike, image_pattern: str = "COCO_{subset}_{image_id:012d}.jpg",
                 subset: Optional[str] = None, verify_images: bool = False, image_size: Optional[int] = None,
                 max_pixels: Optional[int] = DEFAULT_MAX_PIXELS):
        self.questions_json = Path(questions_json)
        self.image_root, self.image_size, self.max_pixels = Path(image_root), image_size, max_pixels
        qdata = _read_json(questions_json, "VQA questions file")
        if not isinstance(qdata, dict) or "questions" not in qdata:
            raise ValueError(f"{questions_json}: expected {{'questions': [...]}}")
        adata = None if annotations_json is None else _read_json(annotations_json, "VQA annotations file")
        if adata is not None and (not isinstance(adata, dict) or "annotations" not in adata):
            raise ValueError(f"{annotations_json}: expected {{'annotations': [...]}}")
        if subset is None:
            subset = qdata.get("data_subtype")
            if subset is not None:
                subset = subset.replace("test-dev", "test")
        self.subset = subset
        if "{subset" in image_pattern and subset is None:
            raise ValueError(f"image_pattern {image_pattern!r} needs a subset and {questions_json} has no "
                             f"data_subtype; pass subset= (e.g. 'val2014')")
        by_qid = {} if adata is None else {a["question_id"]: a for a in adata["annotations"]}
        if adata is not None:
            lacking = [q["question_id"] for q in qdata["questions"] if q["question_id"] not in by_qid]
            if lacking:
                raise ValueError(f"{len(lacking)} questions of {questions_json} have no annotation in "
                                 f"{annotations_json} (e.g. question_id {lacking[:3]}); are the files a pair?")
        self._items = [
            _Question(str(self.image_root / image_pattern.format(subset=subset, image_id=q["image_id"])), q,
                      by_qid.get(q["question_id"]))
            for q in qdata["questions"]
        ]
        if not self._items:
            raise ValueError(f"{questions_json} holds no questions")
        self._init_map()
        if verify_images:
            self._items = self._verified(self._items)

    def _make(self, j: int, image: Image.Image) -> dict:
        q, a = self._items[j].question, self._items[j].annotation
        answers = [] if a is None else [x["answer"] for x in a.get("answers", [])]
        answer = None if a is None else a.get("multiple_choice_answer") or most_common_answer(answers)
        weights = {k: n / len(answers) for k, n in collections.Counter(answers).items()}
        return {"image": image, "question": q["question"], "question_id": q["question_id"],
                "image_id": q["image_id"], "answers": answers, "answer": answer, "answer_weights": weights,
                "answer_type": None if a is None else a.get("answer_type"),
                "question_type": None if a is None else a.get("question_type")}

    def report(self) -> str:
        return (f"{type(self).__name__}({self.questions_json.name}): {len(self)} questions; "
                f"{self._skip_summary()}")


# -- WebDataset shards -------------------------------------------------------------------------


class WebDatasetCaptions(_SkipLog, IterableDataset):
    """Image-text pairs streamed from WebDataset tar shards (LAVIS `laion_dataset.py`, the
    format img2dataset writes): each sample has an image (.jpg, .jpeg, .png or .webp) and its
    caption in .txt, or in .json's "caption" field. Samples without a caption are skipped
    ("no_text"); so is the rest of a shard that cannot be read ("bad_shard").

    Splitting follows webdataset's: whole shards go round-robin to ranks
    (`wds.split_by_node` semantics, here with the rank/world_size given, else
    blip2lab.dist's, resolved when iteration starts), then to the DataLoader workers of
    each rank (`wds.split_by_worker`). So every rank sees a disjoint part, and all ranks
    together see every sample once per pass; use at least world_size x num_workers shards
    (fewer shards than ranks is an error: a rank with no data would hang the others).

    shuffle: 0 streams in order; n > 0 shuffles the shard order (the same on every rank,
        from seed and epoch, so the split stays disjoint) and samples through a buffer of n.
    Call set_epoch(e) before each epoch for a new order.
    Items: {"image", "text", "image_id": the sample key, "shard": its url}.
    """

    def __init__(self, urls: str | Sequence[str], shuffle: int = 0, rank: Optional[int] = None,
                 world_size: Optional[int] = None, seed: int = 0, clean: bool = True, max_words: int = 50,
                 image_size: Optional[int] = None, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS):
        import braceexpand  # a dependency of webdataset

        if isinstance(urls, str):  # webdataset's notation: "a-{000..009}.tar::b-{00..03}.tar"
            urls = [u for part in urls.split("::") for u in braceexpand.braceexpand(part)]
        self.urls = [str(u) for u in urls]
        if not self.urls:
            raise ValueError("no shard urls given")
        for url in self.urls:  # a local shard that is not there fails now, not in a worker mid-epoch
            if "://" not in url and not url.startswith("pipe:"):
                _need_file(url, "WebDataset shard")
        if shuffle < 0:
            raise ValueError(f"shuffle must be >= 0 (a buffer size), got {shuffle}")
        if (rank is None) != (world_size is None):
            raise ValueError("give both rank and world_size, or neither (then torch.distributed's are used)")
        if world_size is not None and not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size = {world_size}), got {rank}")
        self.shuffle, self.rank, self.world_size, self.seed, self.epoch = shuffle, rank, world_size, seed, 0
        self.clean, self.max_words, self.image_size, self.max_pixels = clean, max_words, image_size, max_pixels
        self._init_skips()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _node(self) -> tuple[int, int]:
        if self.world_size is not None:
            return self.rank, self.world_size
        return dist.rank(), dist.world_size()

    def _shards(self) -> Iterator[dict]:
        urls = list(self.urls)
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + self.epoch).shuffle(urls)  # same on every rank
        rank, world = self._node()
        if len(urls) < world:
            raise ValueError(f"{len(urls)} shards cannot be split over {world} ranks; write more shards")
        for url in itertools.islice(urls, rank, None, world):  # wds.split_by_node, own rank/world
            yield {"url": url}

    def _shard_error(self, exn: Exception) -> bool:
        self._skip("bad_shard", str(exn))
        return True  # go on (webdataset's handler protocol)

    def __iter__(self) -> Iterator[dict]:
        import webdataset as wds

        stream = wds.split_by_worker(self._shards())
        samples = wds.tarfile_to_samples(handler=self._shard_error)(stream)
        if self.shuffle:
            rank, _ = self._node()
            info = torch.utils.data.get_worker_info()
            worker = 0 if info is None else info.id
            rng = random.Random(((self.seed * 1_000_003 + self.epoch) * 8191 + rank) * 131 + worker)
            samples = wds.shuffle(bufsize=self.shuffle, initial=self.shuffle, rng=rng)(samples)
        for sample in samples:
            item = self._decode(sample)
            if item is not None:
                yield item

    def _decode(self, sample: dict) -> Optional[dict]:
        name = f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"
        ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
        if ext is None:
            self._skip("missing", name, "no image in the sample")
            return None
        text = self._caption(sample)
        if text is None:
            self._skip("no_text", name, "no .txt and no .json caption")
            return None
        image = self._open(io.BytesIO(sample[ext]), f"{name}.{ext}")
        if image is None:
            return None
        text = clean_caption(text, self.max_words) if self.clean else text.strip()
        return {"image": image, "text": text, "image_id": sample["__key__"], "shard": sample.get("__url__")}

    @staticmethod
    def _caption(sample: dict) -> Optional[str]:
        if "txt" in sample:
            return sample["txt"].decode("utf-8", errors="replace")
        if "json" in sample:
            try:
                meta = json.loads(sample["json"])
            except (ValueError, UnicodeDecodeError):
                return None
            caption = meta.get("caption") if isinstance(meta, dict) else None
            return caption if isinstance(caption, str) else None
        return None

    def report(self) -> str:
        rank, world = self._node()
        return (f"{type(self).__name__}({len(self.urls)} shards, rank {rank}/{world}): {self._skip_summary()}")


def webdataset_captions(urls: str | Sequence[str], shuffle: int = 0, rank: Optional[int] = None,
                        world_size: Optional[int] = None, **kwargs) -> WebDatasetCaptions:
    """Image-text pairs from WebDataset shards (brace notation or a list); see WebDatasetCaptions."""
    return WebDatasetCaptions(urls, shuffle=shuffle, rank=rank, world_size=world_size, **kwargs)
