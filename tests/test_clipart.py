"""The clipart dataset from Debian's openclipart-png / openclipart-svg (installed by `make`):
captions, duplicates, the fixed split and the images, on small slices."""

import dataclasses
import errno

import numpy as np
import pytest

from blip2lab.worlds.minireal import clipart as C

COUCH = "buildings/furniture/soft_blue_couch_jonadab_01"
GIMP = "computer/icons/lemon-theme/apps/gimp"  # title "Lemon SVG theme": a collection
CORMORANT = "animals/birds/cormorant-md"  # empty title
CHEMISTRY = ["education/chemical_science_experience_01", "science/chemical_science_experience_01",
             "signs_and_symbols/chemical_science_experience_01"]  # one image filed three times
TEST_TUBE = "science/provetta_plasma_sangue_a_01"  # 67 x 411: tall


def test_text_cleaning_rules():
    assert C.clean_title("Part of the Flat Icon Collection (Wed Aug 25 23:29:46 2004)") == "part of the flat icon collection"
    assert C.clean_title("Aircraft3") == "aircraft"
    assert C.clean_title("Crawfish (B and W)") == "crawfish"
    assert C.clean_title("MPCAD Box 40x30x80") == "mpcad box"
    assert C.name_from_file("dino_architetto_francesc_01", "Architetto Francesco Rollandin") == "dino"
    assert C.name_from_file("star_82pt31step", "codifiedivining") == "star"
    assert C.clean_description("EPS converted from  http://aiga.org") == ""
    assert C.clean_description("jean.victor.balin@gmail.com") == ""
    assert C.clean_description("A ladybug. Drawn by hand.") == "a ladybug."
    assert C.clean_description("Mascot") == ""  # one word says no more than the title


def test_captions_of_known_cliparts():
    items = {it.id: it for it in C.build_cliparts(ids=[COUCH, GIMP, CORMORANT])}
    assert items[COUCH].captions == ("soft blue couch", "soft blue couch, furniture")
    assert items[GIMP].captions == ("gimp icon", "gimp icon, computer")  # file name + what the collection is
    assert items[CORMORANT].captions == ("cormorant", "cormorant, animal, bird")  # no title: the file name
    assert items[COUCH].license == "http://web.resource.org/cc/PublicDomain"


def test_identical_images_become_one_item_with_all_categories():
    (item,) = C.build_cliparts(ids=CHEMISTRY)
    assert item.id == CHEMISTRY[0] and item.categories == ("education", "science", "signs_and_symbols")


def test_split_is_a_fixed_function_of_the_image_bytes():
    buckets = ("0" * 40, "59", "5a", "5e", "5f", "63", "64")  # 0, 89, 90, 94, 95, 99, 100 (mod 100: 0)
    assert [C.split_of(h) for h in buckets] == ["train", "train", "val", "val", "test", "test", "train"]
    (couch,) = C.build_cliparts(ids=[COUCH])
    (tube,) = C.build_cliparts(ids=[TEST_TUBE])
    assert (couch.sha1[:12], couch.split) == ("6fa9cd0d3aab", "train")
    assert (tube.sha1[:12], tube.split) == ("6d848cc89517", "test")


def test_a_slice_builds_deterministically_and_items_do_not_depend_on_the_slice():
    a = C.build_cliparts(limit=120)
    b = C.build_cliparts(limit=120)
    assert a == b and len(a) > 100
    assert {it.split for it in a} == {"train", "val", "test"}
    alone = {it.id: it for it in C.build_cliparts(ids=[it.id for it in a[::17]], max_repeats=None)}
    for it in a[::17]:  # only the categories merged from byte-identical copies depend on what else was read
        assert dataclasses.replace(alone[it.id], categories=it.categories) == it


def test_repeated_captions_are_capped_by_image_hash():
    base = C.build_cliparts(ids=[COUCH])[0]
    items = [dataclasses.replace(base, id=f"x{i}", sha1=f"{h:040x}") for i, h in enumerate([5, 3, 9, 1])]
    kept = C.limit_repeats(items, 2)
    assert [it.id for it in kept] == ["x1", "x3"]  # the two smallest hashes, in their original order


def test_images_on_white_padded_square(tmp_path):
    (tube,) = C.build_cliparts(ids=[TEST_TUBE])
    img = C.load_image(tube, size=96)
    assert img.shape == (96, 96, 3) and img.dtype == np.uint8
    assert (img[:, :20] == 255).all() and (img[:, -20:] == 255).all()  # a tall picture: white on both sides
    assert (img[:, 40:56] < 200).any()  # and the tube in the middle
    items = C.build_cliparts(ids=[COUCH, TEST_TUBE])
    cached = C.cache_images(items, tmp_path, size=32)
    assert cached.shape == (2, 32, 32, 3) and (tmp_path / "images_32.json").is_file()
    np.testing.assert_array_equal(cached[1], C.load_image(items[1], size=32))
    assert C.cache_images(items, tmp_path, size=32).filename == cached.filename  # reused, not rebuilt


def test_a_full_disk_raises_instead_of_killing_the_process(tmp_path, monkeypatch):
    # Writing into a sparse memory map on a full disk is a SIGBUS (it killed a CI run); the
    # cache reserves its blocks first, so a full disk is an OSError that says so.
    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(C.os, "posix_fallocate", full, raising=False)
    items = C.build_cliparts(ids=[COUCH])
    with pytest.raises(OSError, match="no room for the image cache"):
        C.cache_images(items, tmp_path, size=32)
    assert not list(tmp_path.glob("*.npy"))  # no half-written cache left behind


def test_statistics_of_a_slice():
    stats = C.caption_stats(C.build_cliparts(limit=60))
    assert stats["items"] == sum(stats["per_split"].values())
    assert stats["caption_words"]["min"] >= 1 and stats["vocabulary"] > 50
    assert sum(stats["licenses"].values()) == stats["items"]


def test_missing_packages_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="openclipart-png"):
        C.build_cliparts(root=tmp_path)
