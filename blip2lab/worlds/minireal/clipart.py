"""The clipart image-text dataset of mini-real, built from Debian's Open Clip Art packages.

`openclipart-png` puts 8,121 rendered cliparts under /usr/share/openclipart/png/<category
path>/<name>.png; `openclipart-svg` has the same files as SVG under .../svg/, and only the
SVGs carry the metadata: a Dublin Core block with a human-written title, a description
(about a fifth of them), keywords (dc:subject), the creator and the licence (almost all
public domain, as the Debian package's copyright file says of all of them; the 4 files
whose own metadata says GPL are left out). The folders are the category.

Captions (lower case, in this order, duplicates dropped; `clean_caption` as LAVIS last):
1. the name: the cleaned title; where the title is empty (57 images) or names a whole
   collection (3,529 of 6,838 distinct images: "Lemon SVG theme", "Part of the Flat Icon
   Collection (...)", "gramastar": the patterns in `COLLECTIONS`, found by listing titles
   shared by 15+ files), the file name instead,
   without the author's name, numbers and other file-name junk, plus what the collection
   says about it ("airplane road sign", "folder icon");
2. the description, when it says something (no e-mail, URL, "EPS converted from",
   "Created with Inkscape"...), its first sentence, at most 30 words;
3. the name followed by up to 5 keywords it does not already contain ("pesca, food, fruit").
Items left without a name are dropped. At most 10 images keep any one caption set
(`limit_repeats`: 1,377 generated stars are all "star"): 6,838 distinct images -> 5,094.

Duplicates: 1,221 PNGs are byte-identical copies of another one filed under a second
category (the same chemistry set under science/, education/ and signs_and_symbols/). They
become one item (the first path in sorted order; categories merged), and the split is
decided by a hash of the image bytes, so copies can never straddle train and test, and a
file's split does not depend on which other files were read (a slice gets the same).

Split: sha1(PNG bytes) as an integer mod 100: 0-89 train, 90-94 val, 95-99 test.

Images: alpha composited on white, padded to a square with white (cliparts are often tall
or wide: the squash of `Blip2Processor.image` would distort them), resized to `size`
(Lanczos). 16 PNGs are huge (up to 21k x 30k pixels, 2.5 GB decoded): those are
rendered from their SVG at the target size by rsvg-convert (Debian's librsvg2-bin) instead.
`cache_images` keeps them as one uint8 .npy under runs/ for the feature cache.

Shapes: n items, S image side.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import re
import struct
import subprocess
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
from PIL import Image

from blip2lab.processor import clean_caption

__all__ = ["ROOT", "SPLITS", "COLLECTIONS", "Clipart", "split_of", "read_metadata", "name_from_file",
           "make_captions", "build_cliparts", "limit_repeats", "load_image", "cache_images", "caption_stats"]

ROOT = Path("/usr/share/openclipart")  # where the Debian packages install
MAX_PNG_PIXELS = 50_000_000  # larger PNGs are rendered from the SVG at the target size
SPLITS = ("train", "val", "test")
_NS = {"dc": "http://purl.org/dc/elements/1.1/", "rdf": "http://www.w3.org/1999/02/22-rdf-syntax-ns#",
       "cc": "http://web.resource.org/cc/"}

# Titles that name a collection rather than the picture (regex on the lower-cased title),
# and the word(s) the collection adds to the file-name caption.
COLLECTIONS: tuple[tuple[str, str], ...] = (
    (r"^part of the flat icon collection", "icon"),
    (r"^lemon svg theme$", "icon"),
    (r"^etiquette icons$", "icon"),
    (r"iconset$|icon-theme$|^gold-theme$", "icon"),
    (r"^aiga_symbol_signs$", "sign"),
    (r"^svg road signs$", "road sign"),
    (r"^map symbols$", "map symbol"),
    (r"^australian maps$", "map"),
    (r"^svg gradient collection", "gradient"),
    (r"^clipart by ", ""),
    (r"^various cliparts$", ""),
    (r"^r1[56] s[iu]bmission$|^r15 general$", ""),
    (r"^sallite$", ""),
    (r"^advertising$", "sign"),
    (r"^gramastar$", ""),
)

# Keywords that say nothing about the picture (tooling, collection bookkeeping).
_JUNK_KEYWORDS = frozenset({
    "", "hash", "icon", "icons", "theme", "magick", "lemon theme icon", "mapsym", "unsorted", "special",
    "appicon", "application", "action", "menu", "mime types", "mimetypes", "filesystem", "webpage",
    "united nations member", "clip art", "clipart", "svg", "image", "media", "none", "simple", "white",
    "geometry", "bordered",
})
# File-name tokens that are not words of the name.
_JUNK_FILE_TOKENS = frozenset({"md", "svg", "png", "bw", "img", "icon", "aa", "ab", "ac", "ad"})
_JUNK_DESCRIPTION = re.compile(r"eps converted from|hash\(0x|created with inkscape|^part of .* collection|"
                               r"^uk roadsigns$|vgcats", re.IGNORECASE)


@dataclass(frozen=True)
class Clipart:
    id: str  # the PNG's path under png/ without ".png" (the first of its byte-identical copies)
    title: str  # the raw dc:title ("" when empty)
    name: str  # what the picture is called: caption 1 (see the module docstring)
    description: str  # the cleaned description ("" when there is none worth keeping)
    keywords: tuple[str, ...]  # cleaned dc:subject entries, junk dropped
    categories: tuple[str, ...]  # folder paths of the item and of its byte-identical copies
    creator: str
    license: str  # the cc:license URL ("" when absent)
    sha1: str  # of the PNG bytes: identity and split
    split: str
    captions: tuple[str, ...]

    def png(self, root: Path = ROOT) -> Path:
        return Path(root) / "png" / f"{self.id}.png"


def split_of(sha1: str) -> str:
    """The fixed split of an image, from the hash of its bytes: 90 / 5 / 5."""
    bucket = int(sha1, 16) % 100
    return "train" if bucket < 90 else "val" if bucket < 95 else "test"


# ---------------------------------------------------------------------------------------
# Metadata and captions
# ---------------------------------------------------------------------------------------


def read_metadata(svg: Path) -> dict:
    """title, description, keywords, creator, license of one SVG (empty when absent). Parses
    only up to the end of the <metadata> element, not the drawing."""
    meta = None
    for _, element in ET.iterparse(svg, events=("end",)):
        if element.tag.rsplit("}", 1)[-1] == "metadata":  # some files declare no SVG namespace
            meta = element
            break
    work = meta.find(".//cc:Work", _NS) if meta is not None else None
    if work is None:
        return {"title": "", "description": "", "keywords": [], "creator": "", "license": ""}
    licence = work.find("cc:license", _NS)
    return {
        "title": (work.findtext("dc:title", default="", namespaces=_NS) or "").strip(),
        "description": (work.findtext("dc:description", default="", namespaces=_NS) or "").strip(),
        "keywords": [(li.text or "").strip() for li in work.findall("dc:subject/rdf:Bag/rdf:li", _NS)],
        "creator": (work.findtext("dc:creator/cc:Agent/dc:title", default="", namespaces=_NS) or "").strip(),
        "license": licence.get(f"{{{_NS['rdf']}}}resource", "") if licence is not None else "",
    }


def _words(text: str) -> list[str]:
    """Lower-case words, with '_', '-' and '#' as spaces (file names and keywords use them)."""
    return re.sub(r"[_\-#]+", " ", text.lower()).split()


def clean_title(title: str) -> str:
    """Lower case, '_'/'-' as spaces, nothing in parentheses ("(Wed Aug 25 23:29:46 2004)",
    "(B and W)"), no "by <author>" tail, no digits glued to a word ("aircraft3" -> "aircraft")."""
    text = re.sub(r"\([^)]*\)", " ", title)
    text = re.sub(r"\s+by\s+.*$", "", text, flags=re.IGNORECASE)
    words = [re.sub(r"(?<=[a-z])\d+$", "", w) for w in _words(text)]
    return " ".join(w for w in words if w and not re.fullmatch(r"[\dx]+", w))  # "12", "40x30x80"


def name_from_file(stem: str, creator: str) -> str:
    """A name from a file name: words without numbers, the creator's name (also cut short,
    as file names are: "architetto_frances"), and file-name junk."""
    author = _words(creator)
    kept = []
    for word in _words(stem):
        word = re.sub(r"\d+[a-z]?$", "", word)  # "arrow01" -> "arrow", "01r" -> ""
        if len(word) < 2 or any(ch.isdigit() for ch in word) or word in _JUNK_FILE_TOKENS:
            continue
        if any(a.startswith(word) for a in author if len(word) >= 2):
            continue
        kept.append(word)
    return " ".join(kept)


def _collection_word(title: str) -> Optional[str]:
    lowered = title.lower()
    for pattern, word in COLLECTIONS:
        if re.search(pattern, lowered):
            return word
    return None


def clean_description(text: str) -> str:
    """The first sentence, at most 30 words, without URLs or e-mail addresses; "" when
    what is left is junk or a single word."""
    if _JUNK_DESCRIPTION.search(text):
        return ""
    text = re.sub(r"&quot;|&amp;", " ", text)
    text = re.sub(r"https?://\S+|www\.\S+|\S+@\S+", " ", text)
    text = re.split(r"(?<=[.!?])\s|\n", text.strip(), maxsplit=1)[0]
    words = text.lower().split()
    return " ".join(words[:30]) if len(words) >= 2 else ""


def make_captions(stem: str, meta: dict) -> tuple[str, str, tuple[str, ...], tuple[str, ...]]:
    """(name, description, keywords, captions) of one clipart from its file stem and SVG
    metadata. Captions are deduplicated and end with LAVIS's `clean_caption`."""
    collection = _collection_word(meta["title"]) if meta["title"] else ""
    if meta["title"] and collection is None:
        name = clean_title(meta["title"])
    else:
        base = name_from_file(stem, meta["creator"])
        name = f"{base} {collection}".strip() if base else ""
    description = clean_description(meta["description"])
    author = " ".join(_words(meta["creator"]))
    keywords = []
    for k in meta["keywords"]:
        k = " ".join(_words(k))
        if k not in _JUNK_KEYWORDS and k != author and k not in keywords and not k.isdigit():
            keywords.append(k)
    extra = [k for k in keywords if k not in name.split() and k != name][:5]
    candidates = [name, description, ", ".join([name, *extra]) if name and extra else ""]
    captions: list[str] = []
    for c in candidates:
        c = clean_caption(c)
        if c and c not in captions:
            captions.append(c)
    return name, description, tuple(keywords), tuple(captions)


# ---------------------------------------------------------------------------------------
# The dataset
# ---------------------------------------------------------------------------------------


def _png_ids(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root / "png").with_suffix("")) for p in (root / "png").rglob("*.png"))


def build_cliparts(root: str | Path = ROOT, limit: Optional[int] = None, ids: Optional[Sequence[str]] = None,
                   max_repeats: Optional[int] = 10) -> list[Clipart]:
    """The cliparts (of the first `limit` PNG paths in sorted order, or of `ids`), one per
    distinct image, with captions and split, at most `max_repeats` per caption set
    (`limit_repeats`; None keeps all). Deterministic: the same files give the same items,
    and an item's captions and split never depend on the other files read (its merged
    categories do: they list the copies that were read)."""
    root = Path(root)
    if not (root / "png").is_dir() or not (root / "svg").is_dir():
        raise FileNotFoundError(f"no Open Clip Art under {root}: apt-get install openclipart-png openclipart-svg")
    chosen = list(ids) if ids is not None else _png_ids(root)[:limit]
    by_hash: dict[str, dict] = {}
    for cid in chosen:  # sorted order: the first copy of an image gives the item its id
        sha1 = hashlib.sha1((root / "png" / f"{cid}.png").read_bytes()).hexdigest()
        category = str(Path(cid).parent)
        if sha1 in by_hash:
            if category not in by_hash[sha1]["categories"]:
                by_hash[sha1]["categories"].append(category)
            continue
        by_hash[sha1] = {"id": cid, "categories": [category]}
    items = []
    for sha1, entry in by_hash.items():
        meta = read_metadata(root / "svg" / f"{entry['id']}.svg")
        if meta["license"] and "publicdomain" not in meta["license"].lower():
            continue  # 4 files say GPL in their own metadata; everything kept is public domain
        name, description, keywords, captions = make_captions(Path(entry["id"]).name, meta)
        if not name:
            continue
        items.append(Clipart(id=entry["id"], title=meta["title"], name=clean_caption(name), description=description,
                             keywords=keywords, categories=tuple(entry["categories"]), creator=meta["creator"],
                             license=meta["license"], sha1=sha1, split=split_of(sha1), captions=captions))
    return items if max_repeats is None else limit_repeats(items, max_repeats)


def limit_repeats(items: Sequence[Clipart], max_repeats: int) -> list[Clipart]:
    """At most `max_repeats` items with the very same captions: 1,375 generated stars are all
    "star", 226 playing cards "card". Kept: those with the smallest image hash (an order
    independent of the files read), in their original order. Identical captions for many
    images are false negatives for ITC and teach a captioner one word."""
    groups: dict[tuple[str, ...], list[Clipart]] = {}
    for it in items:
        groups.setdefault(it.captions, []).append(it)
    keep = {it.sha1 for group in groups.values() for it in sorted(group, key=lambda it: it.sha1)[:max_repeats]}
    return [it for it in items if it.sha1 in keep]


def _png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk, without PIL's decompression-bomb check."""
    with path.open("rb") as f:
        head = f.read(24)
    if head[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"{path} is not a PNG file")
    return struct.unpack(">II", head[16:24])


def _open_rgba(item: Clipart, size: int, root: Path) -> Image.Image:
    png = item.png(root)
    w, h = _png_size(png)
    if w * h <= MAX_PNG_PIXELS:
        with Image.open(png) as img:
            return img.convert("RGBA")
    svg = root / "svg" / f"{item.id}.svg"
    rendered = subprocess.run(["rsvg-convert", "--width", str(size), "--height", str(size), "--keep-aspect-ratio",
                               str(svg)], capture_output=True, check=True).stdout  # PNG bytes, fits in S x S
    return Image.open(io.BytesIO(rendered)).convert("RGBA")


def load_image(item: Clipart, size: int = 224, root: str | Path = ROOT) -> np.ndarray:
    """The clipart on white, padded to a square, resized: uint8 (S, S, 3)."""
    rgba = _open_rgba(item, size, Path(root))
    w, h = rgba.size
    side = max(w, h)
    canvas = Image.new("RGBA", (side, side), (255, 255, 255, 255))
    canvas.alpha_composite(rgba, ((side - w) // 2, (side - h) // 2))
    return np.asarray(canvas.convert("RGB").resize((size, size), Image.Resampling.LANCZOS))


def _reserve_disk(path: Path) -> None:
    """Give the (sparse) memory-mapped file its blocks now. Otherwise a disk that fills up
    while the images are written kills the process with SIGBUS (a page of the map with no
    block to go to) instead of raising an error that says what happened."""
    if not hasattr(os, "posix_fallocate"):  # macOS, Windows: no such call; the map stays sparse
        return
    with path.open("r+b") as f:
        try:
            os.posix_fallocate(f.fileno(), 0, path.stat().st_size)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise OSError(e.errno, f"no room for the image cache {path} ({path.stat().st_size / 2**20:.0f} MiB): "
                                       "free some disk or pass a smaller `size`") from e
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # filesystems without fallocate: stay sparse
                raise


def cache_images(items: Sequence[Clipart], out_dir: str | Path = "runs/clipart", size: int = 224,
                 root: str | Path = ROOT) -> np.ndarray:
    """Every item's image as one uint8 array (n, S, S, 3), stored as `images_{S}.npy` with
    the item ids beside it (`images_{S}.json`) and reused when the ids match. Memory-mapped
    on reuse (the 5,094 items `build_cliparts` keeps of 8,121 files, at 224 px: 767 MB)."""
    out = Path(out_dir)
    file, index = out / f"images_{size}.npy", out / f"images_{size}.json"
    ids = [it.id for it in items]
    if file.is_file() and index.is_file() and json.loads(index.read_text()) == ids:
        return np.load(file, mmap_mode="r")
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f"images_{size}.tmp.npy"
    array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(items), size, size, 3))
    try:
        _reserve_disk(tmp)
    except OSError:
        del array
        tmp.unlink()
        raise
    for i, item in enumerate(items):
        array[i] = load_image(item, size, root)
    array.flush()
    del array
    tmp.replace(file)
    index.write_text(json.dumps(ids))
    return np.load(file, mmap_mode="r")


# ---------------------------------------------------------------------------------------
# Statistics (docs/data_card_clipart.md)
# ---------------------------------------------------------------------------------------


def caption_stats(items: Iterable[Clipart]) -> dict:
    """Counts per split, caption-length distribution (words), vocabulary size, licences."""
    items = list(items)
    captions = [c for it in items for c in it.captions]
    lengths = np.array([len(c.split()) for c in captions])
    names = np.array([len(it.name.split()) for it in items])
    vocab = Counter(w for c in captions for w in re.findall(r"[a-z0-9']+", c))  # words without punctuation
    return {
        "items": len(items),
        "per_split": {s: sum(it.split == s for it in items) for s in SPLITS},
        "captions": len(captions),
        "captions_per_item": dict(sorted(Counter(len(it.captions) for it in items).items())),
        "with_description": sum(bool(it.description) for it in items),
        "caption_words": {q: float(np.percentile(lengths, p)) for q, p in
                          (("min", 0), ("p10", 10), ("median", 50), ("p90", 90), ("max", 100))} |
                         {"mean": round(float(lengths.mean()), 2)},
        "name_words": {"mean": round(float(names.mean()), 2), "median": float(np.median(names))},
        "vocabulary": len(vocab),
        "top_words": vocab.most_common(30),
        "licenses": dict(Counter(it.license or "(none given)" for it in items).most_common()),
        "top_categories": Counter(it.categories[0].split("/")[0] for it in items).most_common(),
    }


def main(argv: Optional[Sequence[str]] = None) -> None:
    """python -m blip2lab.worlds.minireal.clipart [--out runs/clipart] [--images]: build the dataset,
    write items.jsonl and stats.json (and the image cache with --images)."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--root", default=str(ROOT))
    parser.add_argument("--out", default="runs/clipart")
    parser.add_argument("--images", action="store_true", help="also cache the 224 px images as .npy")
    args = parser.parse_args(argv)
    items = build_cliparts(args.root)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "items.jsonl").open("w") as f:
        for it in items:
            f.write(json.dumps(asdict(it)) + "\n")
    stats = caption_stats(items)
    (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    print(json.dumps({k: stats[k] for k in ("items", "per_split", "captions", "vocabulary")}))
    if args.images:
        cache_images(items, out, root=args.root)


if __name__ == "__main__":
    main()
