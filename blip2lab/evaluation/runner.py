"""The resumable, batched loop under every evaluation command.

A run lives in one output folder:
- run.json: what the run is (task, model, input files with their sha256, options). A later
  command on the same folder continues the run only if it is the same run; anything else is
  refused by name (`--restart` discards the folder's results instead).
- predictions.jsonl: one line per finished item, appended and fsync'ed batch by batch, so a
  killed run loses at most the batch in flight; a line torn by the kill is dropped on resume.
  Items whose image could not be used are lines too ({"key", "skipped": reason}), so a
  resumed run does not retry them and metrics.json can count them.
- work/: intermediate tensors of the retrieval protocol (image features, ITM logits), chunk
  by chunk, under the same rule.
- predictions.json and metrics.json at the end, written atomically.

Images are opened and transformed on a background thread one batch ahead of the model
(`batches`), which is where most of a plain `pipe.caption` loop's time goes on small models.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import shutil
import threading
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor

from .data import EvalInputError, missing_images

__all__ = ["RunDir", "file_record", "batches", "run_items", "check_images", "skipped_summary", "SKIP_HINT"]

RUN_FILE, PARTIAL_FILE, WORK_DIR = "run.json", "predictions.jsonl", "work"
SKIP_HINT = "pass --skip-bad-images to leave such images out (counted in metrics.json)"
MAX_LISTED = 20  # skipped items named in metrics.json


def file_record(path: str | os.PathLike) -> dict:
    """An input file as run.json records it: resolved path, size and sha256."""
    path = Path(path)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"path": str(path.resolve()), "bytes": path.stat().st_size, "sha256": digest.hexdigest()}


class RunDir:
    """One evaluation's output folder (module docstring)."""

    def __init__(self, out: str | os.PathLike, settings: dict, restart: bool = False):
        self.out = Path(out)
        self.settings = json.loads(json.dumps(settings, default=str))  # as it reads back from disk
        run = self.out / RUN_FILE
        if restart and self.out.exists():
            for name in (RUN_FILE, PARTIAL_FILE, "predictions.json", "metrics.json"):
                (self.out / name).unlink(missing_ok=True)
            shutil.rmtree(self.out / WORK_DIR, ignore_errors=True)
        if run.is_file():
            before = json.loads(run.read_text())
            if before != self.settings:
                differ = sorted(k for k in set(before) | set(self.settings) if before.get(k) != self.settings.get(k))
                raise EvalInputError(f"{self.out} holds a run with other settings ({', '.join(differ)} differ): "
                                     f"pass another --out, or --restart to discard its results")
        else:
            self.out.mkdir(parents=True, exist_ok=True)
            _write_atomic(run, self.settings)
        self.work = self.out / WORK_DIR

    def done(self) -> dict[str, dict]:
        """Finished items by key. A torn last line (the run was killed mid-write) is cut off."""
        path = self.out / PARTIAL_FILE
        if not path.is_file():
            return {}
        records, good_bytes = {}, 0
        with open(path, "rb") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:
                    break
                if not line.endswith(b"\n"):
                    break
                records[record["key"]] = record
                good_bytes += len(line)
        if good_bytes != path.stat().st_size:
            with open(path, "r+b") as f:
                f.truncate(good_bytes)
        return records

    def append(self, records: Sequence[dict]) -> None:
        if not records:
            return
        with open(self.out / PARTIAL_FILE, "a", encoding="utf-8") as f:
            f.write("".join(json.dumps(r) + "\n" for r in records))
            f.flush()
            os.fsync(f.fileno())

    def write(self, name: str, obj: Any) -> Path:
        return _write_atomic(self.out / name, obj)

    def save_tensors(self, name: str, tensors: dict[str, Tensor]) -> None:
        """A work file, atomically: it exists whole or not at all."""
        self.work.mkdir(exist_ok=True)
        tmp = self.work / (name + ".tmp")
        torch.save(tensors, tmp)
        tmp.replace(self.work / name)

    def load_tensors(self, name: str) -> Optional[dict[str, Tensor]]:
        path = self.work / name
        return torch.load(path, mmap=True, weights_only=True) if path.is_file() else None


def _write_atomic(path: Path, obj: Any) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    tmp.replace(path)
    return path


def check_images(items: list, skip_bad: bool) -> list[dict]:
    """Missing image files: an error naming them, or (skip_bad) skip records for them."""
    missing = missing_images(items)
    if missing and not skip_bad:
        named = ", ".join(f"{it.key} ({it.path})" for it in missing[:5])
        raise EvalInputError(f"{len(missing)} of {len(items)} images are missing, e.g. {named}; {SKIP_HINT}")
    return [{"key": it.key, "skipped": f"missing: {it.path}"} for it in missing]


def skipped_summary(records: Sequence[dict]) -> dict:
    """What metrics.json says about left-out items: how many, and the first MAX_LISTED."""
    skipped = [r for r in records if "skipped" in r]
    return {"skipped": len(skipped), "skipped_items": [{"key": r["key"], "reason": r["skipped"]}
                                                       for r in skipped[:MAX_LISTED]]}


def batches(items: Sequence, load: Callable[[Any], Tensor], batch_size: int,
            skip_bad: bool) -> Iterator[tuple[list, Optional[Tensor], list[dict]]]:
    """(good items, their pixels (B, 3, S, S) or None, skip records) per batch of `items`,
    loaded one batch ahead on a thread. An image that cannot be decoded stops the run with an
    error naming it, or with `skip_bad` becomes a skip record."""
    q: queue.Queue = queue.Queue(maxsize=2)
    stop = threading.Event()

    def produce() -> None:
        for s in range(0, len(items), batch_size):
            if stop.is_set():
                return
            q.put(_load_batch(items[s: s + batch_size], load))
        q.put(None)

    threading.Thread(target=produce, daemon=True, name="blip2lab-eval-images").start()
    try:
        while (batch := q.get()) is not None:
            good, pixels, bad = batch
            if bad and not skip_bad:
                it, err = bad[0]
                raise EvalInputError(f"image of item {it.key} ({it.path}) cannot be used: {err}; {SKIP_HINT}")
            yield good, pixels, [{"key": it.key, "skipped": f"unreadable: {err}"} for it, err in bad]
    finally:
        stop.set()


def _load_batch(items: Sequence, load: Callable[[Any], Tensor]) -> tuple[list, Optional[Tensor], list]:
    good, pixels, bad = [], [], []
    opened: dict[Path, Any] = {}  # VQA asks several questions of one image: open it once a batch
    for it in items:
        try:
            if it.path not in opened:
                opened[it.path] = load(it.path)
        except (OSError, ValueError) as err:  # missing, unreadable, too large (load_image's errors)
            opened[it.path] = err
        if isinstance(opened[it.path], Exception):
            bad.append((it, opened[it.path]))
        else:
            pixels.append(opened[it.path])
            good.append(it)
    return good, (torch.stack(pixels) if pixels else None), bad


def run_items(run: RunDir, items: Sequence, load: Callable[[Any], Tensor], work: Callable[[list, Tensor], list[dict]],
              batch_size: int, skip_bad: bool, progress: bool, desc: str) -> list[dict]:
    """`work(items, pixels) -> records` over every item not done yet, batch by batch, each
    batch's records appended to predictions.jsonl; returns every item's record, in order."""
    from tqdm.auto import tqdm

    done = run.done()
    todo = [it for it in items if it.key not in done]
    missing = check_images(todo, skip_bad)
    run.append(missing)
    gone = {r["key"] for r in missing}
    todo = [it for it in todo if it.key not in gone]
    with tqdm(total=len(items), initial=len(items) - len(todo), desc=desc, unit="item", disable=not progress) as bar:
        for good, pixels, skipped in batches(todo, load, batch_size, skip_bad):
            run.append(skipped + (work(good, pixels) if good else []))
            bar.update(len(good) + len(skipped))
    done = run.done()
    return [done[it.key] for it in items]
