"""blip2lab.training.datasets on tiny fixture files: COCO captions (Karpathy and LAVIS formats),
VQAv2, WebDataset shards, and the skipping of missing and corrupt images."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from blip2lab.training.datasets import CocoCaptions, VQAv2, WebDatasetCaptions, most_common_answer, webdataset_captions

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255)]


def image_bytes(colour, fmt="PNG", mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (16, 16), colour if mode == "RGB" else 128).save(buf, format=fmt)
    return buf.getvalue()


def write_image(path, colour, fmt="PNG"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(image_bytes(colour, fmt))


def truncated_jpeg() -> bytes:
    data = image_bytes((10, 20, 30), "JPEG")
    return data[: len(data) // 2]


def write_json(path, obj):
    path.write_text(json.dumps(obj))
    return path


# -- COCO captions -------------------------------------------------------------------------


@pytest.fixture
def karpathy(tmp_path):
    """5 images: 2 train (one in restval), 1 val, 2 test; 2 or 3 captions each."""
    root = tmp_path / "coco"
    spec = [  # (folder, cocoid, split, captions)
        ("train2014", 1, "train", ["A red square.", "Red!"]),
        ("val2014", 2, "restval", ["A green square", "green", "Green box"]),
        ("val2014", 3, "val", ["A blue square"]),
        ("val2014", 4, "test", ["A Yellow square.", "yellow"]),
        ("val2014", 5, "test", ["Cyan square", "cyan", "a cyan box"]),
    ]
    entries = []
    for k, (folder, cocoid, split, caps) in enumerate(spec):
        name = f"COCO_{folder}_{cocoid:012d}.jpg"
        write_image(root / folder / name, COLOURS[k], "JPEG")
        entries.append({"filepath": folder, "filename": name, "split": split, "cocoid": cocoid, "imgid": k,
                        "sentences": [{"raw": c, "tokens": c.lower().split()} for c in caps]})
    return write_json(tmp_path / "dataset_coco.json", {"images": entries, "dataset": "coco"}), root


def test_karpathy_train_is_one_item_per_caption_with_restval(karpathy):
    ann, root = karpathy
    ds = CocoCaptions(ann, root, split="train")
    assert len(ds) == 5  # 2 + 3 captions: restval counts as train
    items = [ds[i] for i in range(len(ds))]
    assert [it["image_id"] for it in items] == [1, 1, 2, 2, 2]
    assert [it["text"] for it in items] == ["a red square", "red", "a green square", "green", "green box"]
    assert items[0]["image"].mode == "RGB" and items[0]["image"].size == (16, 16)
    assert items[2]["image"].getpixel((8, 8))[1] > 200  # the green one
    raw = CocoCaptions(ann, root, split="train", clean=False)
    assert raw[0]["text"] == "A red square."
    assert "nothing skipped" in ds.report()


def test_karpathy_split_selection(karpathy):
    ann, root = karpathy
    assert CocoCaptions(ann, root, split="val").image_ids == [3]
    assert CocoCaptions(ann, root, split="test").image_ids == [4, 5]
    assert CocoCaptions(ann, root, split="train").image_ids == [1, 2]
    with pytest.raises(ValueError, match="restval"):
        CocoCaptions(ann, root, split="restval")


def test_karpathy_test_references_and_retrieval(karpathy):
    ann, root = karpathy
    ds = CocoCaptions(ann, root, split="test", one_per_image=True)
    assert len(ds) == 2
    assert ds.references() == {4: ["A Yellow square.", "yellow"], 5: ["Cyan square", "cyan", "a cyan box"]}
    img2txts, txt2img = ds.retrieval_index()
    assert img2txts == [[0, 1], [2, 3, 4]]
    assert txt2img == [0, 0, 1, 1, 1]
    assert ds.texts() == ["a yellow square", "yellow", "cyan square", "cyan", "a cyan box"]
    item = ds[1]  # item i is image i
    assert item["image_id"] == 5 and item["text"] == "cyan square"
    assert item["captions"] == ["cyan square", "cyan", "a cyan box"]
    per_caption = CocoCaptions(ann, root, split="test")
    assert len(per_caption) == 5
    for t in range(5):
        it = per_caption[t]
        assert it["text"] == per_caption.texts()[it["text_index"]]
        assert txt2img[it["text_index"]] == it["image_index"]


def test_lavis_format(tmp_path):
    root = tmp_path / "img"
    write_image(root / "val2014" / "COCO_val2014_000000000007.jpg", COLOURS[0], "JPEG")
    write_image(root / "val2014" / "COCO_val2014_000000000008.png", COLOURS[1])
    train = write_json(tmp_path / "train.json", [
        {"image": "val2014/COCO_val2014_000000000007.jpg", "caption": "A dog.", "image_id": "coco_7"},
        {"image": "val2014/COCO_val2014_000000000008.png", "caption": "A cat", "image_id": "coco_8"},
        {"image": "val2014/COCO_val2014_000000000007.jpg", "caption": "Dog", "image_id": "coco_7"},
    ])
    ds = CocoCaptions(train, root)
    assert len(ds) == 3
    assert ds.image_ids == ["coco_7", "coco_8"]  # entries of one image merged, first-seen order
    assert ds.references() == {"coco_7": ["A dog.", "Dog"], "coco_8": ["A cat"]}
    assert [ds[i]["text"] for i in range(3)] == ["a dog", "dog", "a cat"]
    test = write_json(tmp_path / "test.json", [  # LAVIS test files: caption lists, no image_id
        {"image": "val2014/COCO_val2014_000000000007.jpg", "caption": ["one", "two"]},
        {"image": "val2014/COCO_val2014_000000000008.png", "caption": ["three"]},
    ])
    ev = CocoCaptions(test, root, split="test", one_per_image=True)
    assert ev.references() == {7: ["one", "two"], 8: ["three"]}
    assert ev.retrieval_index() == ([[0, 1], [2]], [0, 0, 1])


def test_missing_annotation_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        CocoCaptions(tmp_path / "nope.json", tmp_path)
    with pytest.raises(FileNotFoundError, match="questions.json"):
        VQAv2(tmp_path / "questions.json", None, tmp_path)
    q = write_json(tmp_path / "q.json", {"questions": []})
    with pytest.raises(FileNotFoundError, match="answers.json"):
        VQAv2(q, tmp_path / "answers.json", tmp_path)
    with pytest.raises(FileNotFoundError, match="shard-9.tar"):
        webdataset_captions([str(tmp_path / "shard-9.tar")])


# -- bad images --------------------------------------------------------------------------


@pytest.fixture
def with_bad_images(tmp_path):
    """LAVIS-style file of 4 images: 0 good, 1 truncated JPEG, 2 missing, 3 good."""
    root = tmp_path / "img"
    write_image(root / "a.png", COLOURS[0])
    (root / "b.jpg").write_bytes(truncated_jpeg())
    write_image(root / "d.png", COLOURS[3])
    ann = write_json(tmp_path / "ann.json", [
        {"image": "a.png", "caption": ["a1", "a2"], "image_id": 0},
        {"image": "b.jpg", "caption": ["b1", "b2"], "image_id": 1},
        {"image": "c.png", "caption": ["c1"], "image_id": 2},
        {"image": "d.png", "caption": ["d1"], "image_id": 3},
    ])
    return ann, root


def test_bad_images_are_replaced_by_the_next_good_one(with_bad_images):
    ann, root = with_bad_images
    ds = CocoCaptions(ann, root)
    ids = [ds[i]["image_id"] for i in range(len(ds))]  # a full pass completes
    assert ids == [0, 0, 3, 3, 3, 3]  # b1, b2, c1 -> the next good item, d1
    assert [ds[i]["image_id"] for i in range(len(ds))] == ids  # deterministic
    assert ds.skipped == {"unreadable": 1, "missing": 1}  # each bad file counted once
    assert [p.rsplit("/", 1)[-1] for p in ds.skipped_paths] == ["b.jpg", "c.png"]
    report = ds.report()
    assert "missing 1" in report and "unreadable 1" in report and "c.png" in report


def test_bad_images_wrap_around(with_bad_images):
    ann, root = with_bad_images
    (root / "d.png").unlink()
    ds = CocoCaptions(ann, root)
    assert ds[-1]["image_id"] == 0  # d1 is the last item: the search wraps to the first
    assert ds.skipped["missing"] == 1


def test_verify_images_drops_bad_ones_for_evaluation(with_bad_images):
    ann, root = with_bad_images
    ds = CocoCaptions(ann, root, split="test", one_per_image=True, verify_images=True)
    assert ds.image_ids == [0, 3]
    assert ds.references() == {0: ["a1", "a2"], 3: ["d1"]}
    assert ds.retrieval_index() == ([[0, 1], [2]], [0, 0, 1])
    assert [ds[i]["image_id"] for i in range(len(ds))] == [0, 3]
    assert ds.skipped == {"unreadable": 1, "missing": 1}


def test_no_readable_image_at_all(tmp_path):
    ann = write_json(tmp_path / "ann.json", [{"image": "gone.png", "caption": "x"}])
    ds = CocoCaptions(ann, tmp_path)
    with pytest.raises(RuntimeError, match="missing 1"):
        ds[0]


# -- VQAv2 ---------------------------------------------------------------------------------


@pytest.fixture
def vqa(tmp_path):
    root = tmp_path / "val2014"
    for k, image_id in enumerate((42, 43)):
        write_image(root / f"COCO_val2014_{image_id:012d}.jpg", COLOURS[k], "JPEG")
    questions = write_json(tmp_path / "questions.json", {"data_subtype": "val2014", "questions": [
        {"image_id": 42, "question": "What colour is it?", "question_id": 420},
        {"image_id": 42, "question": "Is it square?", "question_id": 421},
        {"image_id": 43, "question": "How many?", "question_id": 430},
    ]})

    def answers(words):
        return [{"answer": w, "answer_confidence": "yes", "answer_id": i + 1} for i, w in enumerate(words)]

    annotations = write_json(tmp_path / "annotations.json", {"annotations": [
        {"question_id": 420, "image_id": 42, "answers": answers(["red"] * 6 + ["orange"] * 3 + ["pink"]),
         "multiple_choice_answer": "red", "answer_type": "other", "question_type": "what color is the"},
        {"question_id": 421, "image_id": 42, "answers": answers(["yes"] * 9 + ["no"]),
         "multiple_choice_answer": "yes", "answer_type": "yes/no", "question_type": "is it"},
        {"question_id": 430, "image_id": 43, "answers": answers(["1", "2", "2", "3", "2", "1", "2", "4", "2", "1"]),
         "answer_type": "number", "question_type": "how many"},  # no multiple_choice_answer
    ]})
    return questions, annotations, root


def test_vqav2_fields(vqa):
    questions, annotations, root = vqa
    ds = VQAv2(questions, annotations, root)
    assert len(ds) == 3
    item = ds[0]
    assert item["question"] == "What colour is it?" and item["question_id"] == 420 and item["image_id"] == 42
    assert len(item["answers"]) == 10 and item["answers"][:2] == ["red", "red"]
    assert item["answer"] == "red" and item["answer_type"] == "other"
    assert item["answer_weights"] == pytest.approx({"red": 0.6, "orange": 0.3, "pink": 0.1})
    assert item["image"].mode == "RGB" and item["image"].getpixel((8, 8))[0] > 200
    assert ds[1]["answer"] == "yes" and ds[1]["answer_type"] == "yes/no"
    assert ds[2]["answer"] == "2"  # the most common answer when multiple_choice_answer is absent
    assert most_common_answer(["a", "b", "b", "a"]) == "a"  # a tie goes to the first given
    assert most_common_answer([]) is None


def test_vqav2_without_annotations(vqa, tmp_path):
    questions, _, root = vqa
    ds = VQAv2(questions, None, root)
    item = ds[2]
    assert item["question"] == "How many?" and item["image_id"] == 43
    assert item["answers"] == [] and item["answer"] is None and item["answer_type"] is None
    # test-dev questions point at test2015's image files
    write_image(tmp_path / "test2015" / "COCO_test2015_000000000007.jpg", COLOURS[2], "JPEG")
    dev = write_json(tmp_path / "test-dev.json", {"data_subtype": "test-dev2015", "questions": [
        {"image_id": 7, "question": "Why?", "question_id": 70}]})
    ds = VQAv2(dev, None, tmp_path / "test2015")
    assert ds.subset == "test2015" and ds[0]["question_id"] == 70 and not ds.skipped


def test_vqav2_missing_image_and_unpaired_annotations(vqa, tmp_path):
    questions, annotations, root = vqa
    (root / "COCO_val2014_000000000042.jpg").unlink()
    ds = VQAv2(questions, annotations, root)
    assert [ds[i]["question_id"] for i in range(3)] == [430, 430, 430]
    assert ds.skipped == {"missing": 1} and "missing 1" in ds.report()
    other = write_json(tmp_path / "other.json", {"annotations": []})
    with pytest.raises(ValueError, match="no annotation"):
        VQAv2(questions, other, root)


# -- WebDataset shards ---------------------------------------------------------------------


def write_shards(tmp_path, n_shards=2, per_shard=6, bad=()):
    """Shards of `per_shard` samples; alternately .jpg + .txt and .png + .json caption.
    Keys in `bad` get a truncated JPEG."""
    import webdataset as wds

    urls = []
    for s in range(n_shards):
        url = str(tmp_path / f"shard-{s:02d}.tar")
        with wds.TarWriter(url) as sink:
            for i in range(per_shard):
                key = f"s{s}_{i:03d}"
                colour = COLOURS[i % len(COLOURS)]
                if key in bad:
                    sink.write({"__key__": key, "jpg": truncated_jpeg(), "txt": f"Caption {key}."})
                elif i % 2 == 0:
                    sink.write({"__key__": key, "jpg": image_bytes(colour, "JPEG"), "txt": f"Caption {key}."})
                else:
                    sink.write({"__key__": key, "png": image_bytes(colour, "PNG", mode="L"),
                                "json": json.dumps({"caption": f"Caption {key}.", "width": 16}).encode()})
        urls.append(url)
    return urls


def test_webdataset_reads_and_decodes(tmp_path):
    urls = write_shards(tmp_path, n_shards=1, per_shard=4)
    items = list(webdataset_captions(urls))
    assert [it["image_id"] for it in items] == [f"s0_{i:03d}" for i in range(4)]
    assert [it["text"] for it in items] == [f"caption s0_{i:03d}" for i in range(4)]
    assert all(isinstance(it["image"], Image.Image) and it["image"].mode == "RGB" for it in items)
    assert items[1]["image"].size == (16, 16)  # the grey PNG came back as RGB


def test_webdataset_rank_split_is_disjoint_and_complete(tmp_path):
    urls = write_shards(tmp_path)
    keys = {}
    for rank in range(2):
        ds = webdataset_captions(urls, rank=rank, world_size=2)
        keys[rank] = [it["image_id"] for it in ds]
    assert len(keys[0]) == len(keys[1]) == 6
    assert not set(keys[0]) & set(keys[1])
    assert set(keys[0]) | set(keys[1]) == {f"s{s}_{i:03d}" for s in range(2) for i in range(6)}
    # the brace notation webdataset users write, shuffled: still a partition
    pattern = str(tmp_path / "shard-{00..01}.tar")
    shuffled = [{it["image_id"] for it in webdataset_captions(pattern, shuffle=4, rank=r, world_size=2, seed=3)}
                for r in range(2)]
    assert not shuffled[0] & shuffled[1] and len(shuffled[0] | shuffled[1]) == 12
    with pytest.raises(ValueError, match="2 shards cannot be split over 3 ranks"):
        list(webdataset_captions(urls, rank=0, world_size=3))


def test_webdataset_worker_split(tmp_path, monkeypatch):
    """wds.split_by_worker within one rank, with torch's worker info faked (a real
    num_workers=2 DataLoader costs seconds of process start-up)."""
    import types

    import torch.utils.data

    urls = write_shards(tmp_path, n_shards=4, per_shard=2)
    seen = []
    for worker in range(2):
        info = types.SimpleNamespace(id=worker, num_workers=2, seed=0, dataset=None)
        monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda info=info: info)
        seen.append([it["image_id"] for it in webdataset_captions(urls, rank=1, world_size=2)])
    # rank 1 owns shards 1 and 3; worker 0 reads shard 1, worker 1 shard 3
    assert seen == [["s1_000", "s1_001"], ["s3_000", "s3_001"]]


def test_webdataset_skips_bad_samples_and_shards(tmp_path):
    urls = write_shards(tmp_path, n_shards=1, per_shard=4, bad={"s0_002"})
    import webdataset as wds

    extra = str(tmp_path / "extra.tar")
    with wds.TarWriter(extra) as sink:
        sink.write({"__key__": "notext", "jpg": image_bytes(COLOURS[0], "JPEG")})
        sink.write({"__key__": "noimage", "txt": "a caption"})
        sink.write({"__key__": "ok", "jpg": image_bytes(COLOURS[1], "JPEG"), "txt": "fine"})
    broken = tmp_path / "broken.tar"
    broken.write_bytes(b"this is not a tar file" * 40)
    ds = WebDatasetCaptions(urls + [extra, str(broken)])
    keys = [it["image_id"] for it in ds]
    assert keys == ["s0_000", "s0_001", "s0_003", "ok"]
    assert ds.skipped == {"unreadable": 1, "no_text": 1, "missing": 1, "bad_shard": 1}
    report = ds.report()
    assert "unreadable 1" in report and "s0_002" in report and "bad_shard 1" in report
