"""`blip2lab eval caption | vqa | retrieval | zeroshot` on tiny files of every format written from
the shapes world (tests/eval_files.py), each command's metrics.json checked against the library
functions called directly on the same model (the same numbers); resuming a killed run; bad
input named or counted, never a silent partial score."""

import json

import eval_files as E
import pytest
import torch
from PIL import Image

import blip2lab
from blip2lab.cli import main as cli
from blip2lab.evaluate import caption_metrics, retrieval_eval, vqa_accuracy
from blip2lab.evaluation import EvalInputError, evaluate_captions, evaluate_retrieval, read_captions, read_vqa
from blip2lab.evaluation import retrieval as retrieval_module
from blip2lab.evaluation.retrieval import LAVIS_TEXT_LEN
from blip2lab.processor import clean_caption

N = 4
FAST = dict(num_beams=1, max_new_tokens=24)  # greedy: the decoding path is tested elsewhere
FAST_FLAGS = ["--num-beams", "1", "--max-new-tokens", "24", "--quiet"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalfiles")
    E.write_images(root, N)
    out = {"root": root, "coco": E.write_coco_captions(root / "coco.json", N),
           "lavis": E.write_lavis_captions(root / "lavis.json", N),
           "karpathy": E.write_karpathy_captions(root / "karpathy.json", N + 1),
           "gqa": E.write_gqa(root / "gqa.json", N), "classes": E.write_classes(root / "classes.json", root, 6)}
    out["questions"], out["answers"] = E.write_vqav2(root / "questions.json", root / "answers.json", N)
    return out


@pytest.fixture(scope="module")
def pipe():
    return blip2lab.load("shapes-opt")  # links shapes-stage1 for retrieval


def _images(files):
    return [Image.open(files["root"] / "val2014" / f"COCO_val2014_{i + 1:012d}.png") for i in range(N)]


def _read(path):
    return json.loads(path.read_text())


class Killed(BaseException):
    """Stands for the process being killed mid-run (not an Exception: nothing may catch it)."""


def test_the_three_caption_formats_read_alike(files):
    coco = read_captions(files["coco"], files["root"])
    lavis = read_captions(files["lavis"], files["root"])
    karpathy = read_captions(files["karpathy"], files["root"])  # its last image is in "val"
    assert coco.references == lavis.references == karpathy.references
    assert [i.path for i in coco.images] == [i.path for i in lavis.images] == [i.path for i in karpathy.images]


class _StubMeteor:
    """METEOR's JVM takes ~20 s to start on a loaded CI machine: the suite stands in for it (as
    tests/test_evaluate.py skips it); the number only has to reach metrics.json unchanged."""

    def compute_score(self, gts, res):
        return 0.25 + len(res) / 1000, None


def test_caption_command_scores_as_the_library(files, pipe, tmp_path, monkeypatch):
    monkeypatch.setattr("blip2lab.evaluate._meteor", _StubMeteor)
    out = tmp_path / "caption"
    assert cli(["eval", "caption", "--model", "shapes-opt", "--annotations", str(files["coco"]),
                "--images", str(files["root"]), "--out", str(out), *FAST_FLAGS]) == 0
    metrics, predictions = _read(out / "metrics.json"), _read(out / "predictions.json")
    direct = pipe.caption(_images(files), min_new_tokens=8, **FAST)  # the paper's COCO eval: at least 8
    assert predictions == [{"image_id": i + 1, "caption": c} for i, c in enumerate(direct)]
    refs = read_captions(files["coco"], files["root"]).references
    library = caption_metrics({i + 1: c for i, c in enumerate(direct)}, refs)
    for ours, theirs in (("BLEU-4", "Bleu_4"), ("METEOR", "METEOR"), ("ROUGE-L", "ROUGE_L"), ("CIDEr", "CIDEr")):
        assert metrics[ours] == library[theirs]
    assert {"CIDEr/in-domain", "CIDEr/out-domain"} <= metrics.keys()  # NoCaps-style domains
    assert (metrics["images"], metrics["scored"], metrics["skipped"]) == (N, N, 0)
    assert metrics["settings"]["decoding"]["min_new_tokens"] == 8 and metrics["settings"]["prompt"] == "a photo of"


def test_vqa_command_scores_as_the_library(files, pipe, tmp_path):
    out = tmp_path / "vqa"
    assert cli(["eval", "vqa", "--model", "shapes-opt", "--questions", str(files["questions"]), "--annotations",
                str(files["answers"]), "--images", str(files["root"] / "val2014"), "--image-pattern",
                "COCO_{subset}_{image_id:012d}.png", "--out", str(out), *FAST_FLAGS]) == 0
    data = read_vqa(files["questions"], files["answers"], files["root"] / "val2014",
                    "COCO_{subset}_{image_id:012d}.png")
    images = {i + 1: im for i, im in enumerate(_images(files))}
    direct = pipe.answer([images[q.image_id] for q in data.questions], [q.question for q in data.questions],
                         min_new_tokens=1, **FAST)
    library = vqa_accuracy(direct, [list(q.answers) for q in data.questions],
                           [q.answer_type for q in data.questions], official_references=True)
    metrics = _read(out / "metrics.json")
    assert {k: metrics[k] for k in library} == library
    assert {"accuracy/yes/no", "accuracy/number", "accuracy/other"} <= metrics.keys()
    assert _read(out / "predictions.json") == [{"question_id": q.question_id, "answer": a}
                                               for q, a in zip(data.questions, direct)]
    gqa = tmp_path / "gqa"
    assert cli(["eval", "vqa", "--model", "shapes-opt", "--questions", str(files["gqa"]), "--images",
                str(files["root"] / "val2014"), "--image-pattern", "COCO_val2014_{image_id}.png", "--out", str(gqa),
                *FAST_FLAGS]) == 0
    exact = vqa_accuracy(direct, [[q.answers[0]] for q in data.questions])["accuracy"]  # GQA: one answer each
    assert _read(gqa / "metrics.json")["accuracy"] == exact


def test_retrieval_command_scores_as_the_library(files, pipe, tmp_path):
    out = tmp_path / "retrieval"
    assert cli(["eval", "retrieval", "--model", "shapes-opt", "--annotations", str(files["lavis"]), "--images",
                str(files["root"]), "--out", str(out), "--k-test", "3", "--batch-size", "3", "--quiet"]) == 0
    model, proc = pipe.scorer()
    data = read_captions(files["lavis"], files["root"])
    texts = [clean_caption(c) for i in data.images for c in data.references[i.image_id]]
    txt2img = [k for k, i in enumerate(data.images) for _ in data.references[i.image_id]]
    img2txts = [[t for t, k in enumerate(txt2img) if k == i] for i in range(N)]
    t = proc.qformer_text(texts, max_len=LAVIS_TEXT_LEN)
    with torch.no_grad():
        image = model.encode_image(proc.images(_images(files)))
    library = retrieval_eval(model, image, t["text_ids"], t["text_mask"], txt2img, img2txts, k_test=3)
    metrics = _read(out / "metrics.json")
    for k in ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10"):
        assert metrics[k] == pytest.approx(library[f"itm/{k}"]) and metrics[f"itc/{k}"] == pytest.approx(
            library[f"itc/{k}"])
    ranked = _read(out / "predictions.json")
    assert len(ranked["i2t"]) == N and len(ranked["t2i"]) == len(texts) and len(ranked["i2t"][0]["texts"]) == 10


def test_zeroshot_command_scores_as_direct_itc(files, pipe, tmp_path):
    out = tmp_path / "zeroshot"
    assert cli(["eval", "zeroshot", "--model", "shapes-opt", "--annotations", str(files["classes"]), "--images",
                str(files["root"]), "--out", str(out), "--template", "a {}", "--quiet"]) == 0
    spec = _read(files["classes"])
    image = pipe.embed_images([str(files["root"] / e["image"]) for e in spec["images"]])  # (B, Q, E)
    classes = pipe.embed_texts([f"a {c}" for c in spec["classes"]])  # (C, E)
    guess = torch.einsum("bqe,ce->bcq", image, classes).amax(-1).argmax(-1).tolist()
    truth = [spec["classes"].index(e["label"]) for e in spec["images"]]
    metrics = _read(out / "metrics.json")
    assert metrics["top1"] == pytest.approx(sum(g == y for g, y in zip(guess, truth)) / len(truth))
    assert [p["prediction"] for p in _read(out / "predictions.json")] == [spec["classes"][g] for g in guess]


def test_a_killed_caption_run_resumes(files, pipe, tmp_path, monkeypatch):
    out, calls, killed = tmp_path / "killed", [], []
    real = pipe.caption

    def dies_on_the_second_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2 and not killed:
            killed.append(1)
            raise Killed
        return real(*args, **kwargs)

    monkeypatch.setattr(pipe, "caption", dies_on_the_second_batch)
    kw = dict(batch_size=2, progress=False, meteor=False, **FAST)  # LAVIS's file: no NoCaps domains to score
    with pytest.raises(Killed):
        evaluate_captions(pipe, files["lavis"], files["root"], out, **kw)
    with open(out / "predictions.jsonl", "a") as f:
        f.write('{"key": "3", "image_id": 3, "capt')  # a line torn by the kill
    calls.clear()
    resumed = evaluate_captions(pipe, files["lavis"], files["root"], out, **kw)
    assert len(calls) == 1  # only the second batch: the first two images were not captioned again
    monkeypatch.undo()
    fresh = evaluate_captions(pipe, files["lavis"], files["root"], tmp_path / "fresh", **kw)
    assert resumed == fresh
    with pytest.raises(EvalInputError, match="decoding differ.*--restart"):
        evaluate_captions(pipe, files["lavis"], files["root"], out, **(kw | {"max_new_tokens": 20}))
    assert evaluate_captions(pipe, files["lavis"], files["root"], out, restart=True, **kw) == fresh


def test_a_killed_retrieval_run_resumes(files, pipe, tmp_path, monkeypatch):
    monkeypatch.setattr(retrieval_module, "ITM_FILE_BATCHES", 1)  # a work file per ITM batch
    out, kw = tmp_path / "ret", dict(k_test=3, batch_size=4, progress=False)
    real, calls, killed = retrieval_module.itm_pair_logits, [], []

    def dies_on_the_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3 and not killed:
            killed.append(1)
            raise Killed
        return real(*args, **kwargs)

    monkeypatch.setattr(retrieval_module, "itm_pair_logits", dies_on_the_third)
    with pytest.raises(Killed):
        evaluate_retrieval(pipe, files["lavis"], files["root"], out, **kw)
    done = sorted(p.name for p in (out / "work").glob("itm-0*.pt"))
    assert done == ["itm-00000.pt", "itm-00001.pt"]
    calls.clear()
    resumed = evaluate_retrieval(pipe, files["lavis"], files["root"], out, **kw)
    monkeypatch.setattr(retrieval_module, "itm_pair_logits", real)
    assert resumed == evaluate_retrieval(pipe, files["lavis"], files["root"], tmp_path / "fresh", **kw)
    assert len(calls) == len(list((out / "work").glob("itm-0*.pt"))) - 2


def test_bad_input_is_named_or_counted(files, pipe, tmp_path):
    root = files["root"]
    (tmp_path / "broken.json").write_text('{"images": [')
    with pytest.raises(EvalInputError, match="broken.json is not valid JSON"):
        read_captions(tmp_path / "broken.json", root)
    spec = _read(files["coco"])
    stray = spec | {"annotations": spec["annotations"] + [{"image_id": 99, "caption": "a cat"}]}
    (tmp_path / "stray.json").write_text(json.dumps(stray))
    with pytest.raises(EvalInputError, match="names image_id 99"):
        read_captions(tmp_path / "stray.json", root)
    answers = _read(files["answers"])
    answers["annotations"].append(answers["annotations"][0] | {"question_id": 777})
    (tmp_path / "answers.json").write_text(json.dumps(answers))
    with pytest.raises(EvalInputError, match=r"no matching question .*question_id \[777\]"):
        read_vqa(files["questions"], tmp_path / "answers.json", root / "val2014")

    images = tmp_path / "images"
    (images / "val2014").mkdir(parents=True)
    for i, name in enumerate(sorted((root / "val2014").iterdir())[:3]):
        (images / "val2014" / name.name).write_bytes(b"not a png" if i == 1 else name.read_bytes())
    kw = dict(batch_size=2, progress=False, meteor=False, **FAST)  # image 4 is missing, image 2 undecodable
    with pytest.raises(EvalInputError, match=r"1 of 4 images are missing, e.g. 4 \(.*--skip-bad-images"):
        evaluate_captions(pipe, files["coco"], images, tmp_path / "bad", **kw)
    (images / "val2014" / "COCO_val2014_000000000004.png").write_bytes((root / "val2014" /
                                                                        "COCO_val2014_000000000004.png").read_bytes())
    with pytest.raises(EvalInputError, match="image of item 2 .* cannot be used"):
        evaluate_captions(pipe, files["coco"], images, tmp_path / "bad", restart=True, **kw)
    metrics = evaluate_captions(pipe, files["coco"], images, tmp_path / "bad", restart=True, skip_bad_images=True, **kw)
    assert (metrics["images"], metrics["scored"], metrics["skipped"]) == (4, 3, 1)
    assert metrics["skipped_items"][0]["key"] == "2" and "unreadable" in metrics["skipped_items"][0]["reason"]


def test_cli_errors_exit_2_with_the_reason(files, tmp_path, capsys):
    (tmp_path / "broken.json").write_text("[")
    assert cli(["eval", "caption", "--model", "shapes-opt", "--annotations", str(tmp_path / "broken.json"),
                "--images", str(files["root"]), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "broken.json is not valid JSON" in capsys.readouterr().err
    assert cli(["eval", "retrieval", "--model", "shapes-t5", "--retrieval", "shapes-stage1", "--annotations",
                str(files["lavis"]), "--images", str(files["root"]), "--out", str(tmp_path / "r"), "--quiet",
                "--k-test", "2"]) == 0  # a stage-2 model retrieves through --retrieval
