"""Evaluation: caption metrics, VQA accuracy, image-text retrieval, object-level F1.

Pure functions that return plain dicts of named floats, so a caller can log, compare and
save them without knowing where they came from. Sources, per section:

- Captions: the COCO caption evaluation (pycocoevalcap's `eval.py`): PTB tokenisation,
  then BLEU-1..4, METEOR 1.5, ROUGE-L and CIDEr-D, keys named as COCO names them.
  SPICE: not computed (needs a CoreNLP download), see `SPICE_NOTE`.
- VQA: the official VQAv2 `vqaEval.py` (answer normalisation tables copied verbatim, the
  "min(#humans / 3, 1) averaged over the 10 leave-one-out subsets" accuracy).
- Retrieval: LAVIS `compute_sim_matrix` / `report_metrics` (BLIP2_REFERENCE.md Sec. 5):
  ITC for every pair, the top k_test candidates of each query re-ranked with
  ITM logit + ITC cosine, recall@K both ways.
- Objects: micro-averaged precision / recall / F1 of the objects a caption names (the
  shapes world; the caption parser lives elsewhere, this module takes its output).

Every score is a fraction in [0, 1] (CIDEr in [0, 10]), not the x100 of papers and LAVIS
logs. Shape legend: N_img images, N_txt texts, N image tokens, D_v image width, Q queries,
E ITC width, T text length, k = k_test.
"""

from __future__ import annotations

import contextlib
import io
import re
import shutil
import threading
from collections import Counter
from typing import Callable, Hashable, Mapping, Optional, Sequence

import torch
from torch import Tensor

__all__ = [
    "SPICE_NOTE",
    "caption_metrics",
    "normalize_answer",
    "vqa_score",
    "vqa_accuracy",
    "prior_accuracy",
    "retrieval_scores",
    "recall_at_k",
    "retrieval_eval",
    "itc_matrix",
    "retrieval_candidates",
    "itm_pair_logits",
    "rerank",
    "object_f1",
    "attribute_f1",
]

SPICE_NOTE = "SPICE: not computed (needs a CoreNLP download)"

# -- captions ----------------------------------------------------------------------------

_JAVA_MISSING = (
    "caption_metrics needs Java on the PATH: pycocoevalcap's PTB tokenizer and METEOR are Java "
    "programs. Install a JRE, e.g. `conda install -c conda-forge openjdk=17` (environment.yml "
    "has it) or `sudo apt-get install default-jre-headless`."
)

# METEOR starts a JVM that loads a 60 MB paraphrase table (seconds); one scorer process is
# kept for the session and restarted if it died. pycocoevalcap's Meteor locks per call.
_meteor_scorer = None
_meteor_lock = threading.Lock()


def _meteor():
    global _meteor_scorer
    from pycocoevalcap.meteor.meteor import Meteor

    with _meteor_lock:
        if _meteor_scorer is None or _meteor_scorer.meteor_p.poll() is not None:
            _meteor_scorer = Meteor()
        return _meteor_scorer


def caption_metrics(predictions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]],
                    meteor: bool = True) -> dict[str, float]:
    """COCO caption metrics of one generated caption per image against its references.

    predictions: {image id: caption}; references: {image id: [reference captions]}; every
    predicted id needs references, extra reference ids are ignored (as in COCO's eval,
    which scores the result file's images; CIDEr's document frequencies come from those).
    Empty captions are allowed and score 0. `meteor=False` skips METEOR (its JVM takes
    seconds to start).

    Returns Bleu_1..Bleu_4, METEOR, ROUGE_L (fractions) and CIDEr (CIDEr-D, up to 10), all
    corpus-level as pycocoevalcap computes them. SPICE is not computed: it needs a
    Stanford CoreNLP download (see `SPICE_NOTE`).
    """
    if not predictions:
        raise ValueError("caption_metrics: no predictions")
    missing = [i for i in predictions if not references.get(i)]
    if missing:
        raise ValueError(f"caption_metrics: no references for image ids {missing[:10]}"
                         f"{' ...' if len(missing) > 10 else ''}")
    for i, caption in predictions.items():
        if not isinstance(caption, str):
            raise TypeError(f"caption_metrics: prediction for {i!r} is {type(caption).__name__}, not str")
    if shutil.which("java") is None:
        raise RuntimeError(_JAVA_MISSING)
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.rouge.rouge import Rouge
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    except ImportError as e:
        raise ImportError("caption_metrics needs pycocoevalcap: pip install 'pycocoevalcap>=1.2'") from e

    def one_line(s: str) -> str:  # the tokenizer is line-based: no newline may split a caption
        return " ".join(s.split())

    ids = list(predictions)
    tokenizer = PTBTokenizer()  # lower-cases, splits, drops punctuation, as COCO's eval does first
    gts = tokenizer.tokenize({i: [{"caption": one_line(r)} for r in references[i]] for i in ids})
    res = tokenizer.tokenize({i: [{"caption": one_line(predictions[i])}] for i in ids})
    if set(gts) != set(ids) or set(res) != set(ids) or any(len(res[i]) != 1 for i in ids):
        raise RuntimeError("caption_metrics: the PTB tokenizer returned a different number of lines than it was given")
    gts = {i: gts[i] for i in ids}  # the scorers pair gts and res by iteration order
    res = {i: res[i] for i in ids}

    out: dict[str, float] = {}
    with contextlib.redirect_stdout(io.StringIO()):  # Bleu prints its n-gram counts
        bleu, _ = Bleu(4).compute_score(gts, res)
    out |= {f"Bleu_{n + 1}": float(b) for n, b in enumerate(bleu)}
    if meteor:
        out["METEOR"] = float(_meteor().compute_score(gts, res)[0])
    out["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
    out["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    return out


# -- VQA ---------------------------------------------------------------------------------
# The tables and rules of the official VQAv2 evaluation (vqaEval.py, VQA API), verbatim,
# including its quirks: capitalised keys such as "Im" can never match after lower-casing,
# and "somebody'd" maps to "somebodyd".

_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've",
    "hasnt": "hasn't", "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've",
    "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've",
    "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock",
    "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've",
    "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've",
    "youll": "you'll", "youre": "you're", "youve": "you've",
}
_MANUAL_MAP = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
               "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PUNCT = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: a period not followed by a digit
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def _process_punctuation(text: str) -> str:
    out = text
    for p in _PUNCT:  # dropped next to a space or in a text with "1,000"-style numbers, else a space
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    # The official code passes re.UNICODE (= 32) as the `count` argument; kept, so at most 32 go.
    return _PERIOD_STRIP.sub("", out, count=32)


def _process_digit_article(text: str) -> str:
    words = [_MANUAL_MAP.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def normalize_answer(s: str) -> str:
    """An answer as the official VQAv2 evaluation compares it: newlines and tabs to
    spaces, punctuation dropped or spaced, lower case, number words "none", "zero" ..
    "ten" to digits, articles removed, contractions restored ("dont" -> "don't")."""
    s = s.replace("\n", " ").replace("\t", " ").strip()
    return _process_digit_article(_process_punctuation(s))


def vqa_score(prediction: str, answers: Sequence[str], official_references: bool = False) -> float:
    """The soft accuracy of one answer: for each human answer, min(1, matches among the
    other humans / 3), averaged (the official mean over the 10 choose 9 subsets; 2 of 10
    humans agreeing gives 0.6, 3 of 10 give 0.9). With one reference: exact match after
    normalisation (the formula would give 0 for every answer).

    References are normalised with `normalize_answer`, since synthetic data carries raw
    strings. `official_references=True` does what vqaEval.py does instead, for VQAv2
    annotations (already normalised): punctuation rules only, and only when the humans
    disagree.
    """
    if not answers:
        raise ValueError("vqa_score: a question without reference answers")
    pred = normalize_answer(prediction)
    if official_references:
        refs = [a.replace("\n", " ").replace("\t", " ").strip() for a in answers]
        if len(set(refs)) > 1:
            refs = [_process_punctuation(a) for a in refs]
    else:
        refs = [normalize_answer(a) for a in answers]
    if len(refs) == 1:
        return float(pred == refs[0])
    matches = sum(r == pred for r in refs)
    # leaving out answer j leaves `matches - (refs[j] == pred)` matching humans
    return sum(min(1.0, (matches - (r == pred)) / 3) for r in refs) / len(refs)


def vqa_accuracy(predictions: Sequence[str], answers: Sequence[Sequence[str]],
                 types: Optional[Sequence[str]] = None, official_references: bool = False) -> dict[str, float]:
    """Mean `vqa_score` over questions: {"accuracy": ..., "accuracy/<type>": ...} with
    `types` the answer type per question (VQAv2: "yes/no", "number", "other")."""
    if len(predictions) != len(answers) or (types is not None and len(types) != len(predictions)):
        raise ValueError(f"vqa_accuracy: {len(predictions)} predictions, {len(answers)} answer lists"
                         + ("" if types is None else f", {len(types)} types") + "; they must match")
    if not predictions:
        raise ValueError("vqa_accuracy: no predictions")
    scores = [vqa_score(p, a, official_references) for p, a in zip(predictions, answers)]
    out = {"accuracy": sum(scores) / len(scores)}
    if types is not None:
        by_type: dict[str, list[float]] = {}
        for t, s in zip(types, scores):
            by_type.setdefault(t, []).append(s)
        out |= {f"accuracy/{t}": sum(v) / len(v) for t, v in sorted(by_type.items())}
    return out


def prior_accuracy(answers: Sequence[Sequence[str]], types: Sequence[str]) -> dict[str, float]:
    """The question-type prior, the chance level of a VQA score: `vqa_accuracy` of answering
    every question of a type with that type's most common (normalised) first reference
    answer among these questions. {"accuracy": ..., "accuracy/<type>": ...}."""
    if len(answers) != len(types):
        raise ValueError(f"prior_accuracy: {len(answers)} answer lists, {len(types)} types; they must match")
    counts: dict[str, dict[str, int]] = {}
    for refs, t in zip(answers, types):
        best = counts.setdefault(t, {})
        best[normalize_answer(refs[0])] = best.get(normalize_answer(refs[0]), 0) + 1
    majority = {t: max(c, key=c.get) for t, c in counts.items()}
    return vqa_accuracy([majority[t] for t in types], answers, types)


# -- retrieval ---------------------------------------------------------------------------

ImageSource = Tensor | Callable[[Tensor], Tensor]


def _image_getter(images: ImageSource, num_images: Optional[int], device: torch.device):
    """-> (fetch(idx) -> (len(idx), N, D_v) on `device`, N_img)."""
    if isinstance(images, Tensor):
        if images.ndim != 3:
            raise ValueError(f"images must be (N_img, N, D_v) after ln_vision, got {tuple(images.shape)}")
        return (lambda idx: images[idx.to(images.device)].to(device)), images.shape[0]
    if not callable(images):
        raise TypeError("images must be a (N_img, N, D_v) tensor or a callable idx -> (len(idx), N, D_v)")
    if num_images is None:
        raise ValueError("with a callable `images`, pass num_images")

    def fetch(idx: Tensor) -> Tensor:
        x = images(idx.cpu())
        if not isinstance(x, Tensor) or x.ndim != 3 or x.shape[0] != len(idx):
            raise ValueError(f"images({len(idx)} indices) must return a ({len(idx)}, N, D_v) tensor")
        return x.to(device)

    return fetch, int(num_images)


def _chunks(n: int, size: int, device: torch.device) -> list[Tensor]:
    return [torch.arange(s, min(s + size, n), device=device) for s in range(0, n, size)]


def retrieval_scores(model, images: ImageSource, text_ids: Tensor, text_mask: Tensor, k_test: int = 128,
                     batch_size: int = 128, num_images: Optional[int] = None) -> dict[str, Tensor]:
    """Score matrices of the BLIP-2 retrieval protocol (LAVIS `compute_sim_matrix`).

    model: a `Blip2` with stage-1 heads. images: (N_img, N, D_v) after ln_vision (what
    `model.encode_image` returns), or a callable `idx (b,) -> (b, N, D_v)` that fetches
    them (e.g. `lambda i: model.encode_image(image_embeds=cache[i])` over cached frozen
    features; it gets CPU indices), then `num_images` is required.
    text_ids, text_mask: (N_txt, T) from `Blip2Processor.qformer_text`.
    batch_size: images / texts per feature pass and (image, text) pairs per ITM pass.

    Returns CPU float tensors:
      itc_i2t (N_img, N_txt), itc_t2i (N_txt, N_img): ITC cosine, max over queries;
      itm_i2t (N_img, N_txt): for each image its top-k_test texts by ITC scored
        ITM logit (raw positive logit, mean over queries) + ITC cosine, -inf elsewhere;
      itm_t2i (N_txt, N_img): likewise for each text over its top-k_test images.
    Deviation from LAVIS: -inf instead of -100 outside the top k, and an (image, text)
    pair in both directions' top k goes through the ITM head once.
    """
    if not getattr(model, "has_stage1_heads", False):
        raise ValueError("retrieval needs a model with stage-1 heads (qformer.text_input=True)")
    if text_ids.ndim != 2 or text_ids.shape != text_mask.shape or text_ids.shape[0] == 0:
        raise ValueError(f"text_ids and text_mask must both be (N_txt, T), N_txt > 0; got "
                         f"{tuple(text_ids.shape)} and {tuple(text_mask.shape)}")
    if k_test < 1 or batch_size < 1:
        raise ValueError(f"k_test and batch_size must be >= 1, got {k_test} and {batch_size}")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return _retrieval_scores(model, images, text_ids, text_mask, k_test, batch_size, num_images)
    finally:
        model.train(was_training)


def _retrieval_scores(model, images, text_ids, text_mask, k_test, batch_size, num_images) -> dict[str, Tensor]:
    device = next(model.parameters()).device
    fetch, n_img = _image_getter(images, num_images, device)
    if n_img == 0:
        raise ValueError("retrieval needs at least one image")
    text_ids, text_mask = text_ids.to(device), text_mask.to(device)
    n_txt = text_ids.shape[0]

    # Stage 1 of the protocol: ITC for every pair.
    image_proj = torch.cat([model.image_features(fetch(i)).proj
                            for i in _chunks(n_img, batch_size, device)])  # (N_img, Q, E)
    text_proj = torch.cat([model.text_features(text_ids[i], text_mask[i]).proj
                           for i in _chunks(n_txt, batch_size, device)])  # (N_txt, E)
    itc = itc_matrix(model, image_proj, text_proj)  # (N_img, N_txt)

    # Stage 2: the top k of each query, both ways, re-ranked by the ITM head.
    in_i2t, in_t2i = retrieval_candidates(itc, k_test)
    pairs = (in_i2t | in_t2i.t()).nonzero()  # (M, 2) (image, text), image-major
    logit = torch.full_like(itc, float("-inf"))  # (N_img, N_txt)
    logit[pairs[:, 0], pairs[:, 1]] = itm_pair_logits(model, fetch, text_ids, text_mask, pairs, batch_size)
    return rerank(itc, logit, in_i2t, in_t2i)


def itc_matrix(model, image_proj: Tensor, text_proj: Tensor) -> Tensor:
    """ITC cosine of every image with every text, max over queries: image_proj (N_img, Q, E),
    text_proj (N_txt, E) -> (N_img, N_txt) fp32, computed in row blocks of ~256 MB."""
    n_txt, Q = text_proj.shape[0], image_proj.shape[1]
    rows = max(1, 2**26 // (n_txt * Q))  # itc_cosine holds (rows, N_txt, Q)
    return torch.cat([model.itc_cosine(image_proj[i], text_proj)
                      for i in _chunks(image_proj.shape[0], rows, image_proj.device)]).float()


def retrieval_candidates(itc: Tensor, k_test: int) -> tuple[Tensor, Tensor]:
    """Each query's top k_test by ITC: in_i2t (N_img, N_txt) and in_t2i (N_txt, N_img), bool."""
    n_img, n_txt = itc.shape
    top_txt = itc.topk(min(k_test, n_txt), dim=1).indices  # (N_img, k)
    top_img = itc.t().topk(min(k_test, n_img), dim=1).indices  # (N_txt, k)
    in_i2t = torch.zeros_like(itc, dtype=torch.bool).scatter_(1, top_txt, True)  # (N_img, N_txt)
    in_t2i = torch.zeros_like(itc.t(), dtype=torch.bool).scatter_(1, top_img, True)  # (N_txt, N_img)
    return in_i2t, in_t2i


def itm_pair_logits(model, fetch, text_ids: Tensor, text_mask: Tensor, pairs: Tensor, batch_size: int) -> Tensor:
    """ITM positive logits (M,) of (image, text) `pairs` (M, 2), batch_size pairs a pass;
    `fetch(idx)` returns the images' ln_vision outputs (len(idx), N, D_v)."""
    out = []
    for s in range(0, pairs.shape[0], batch_size):
        img, txt = pairs[s: s + batch_size].unbind(1)  # (b,), (b,)
        uniq, inverse = img.unique(return_inverse=True)  # fetch each image once
        image = fetch(uniq)[inverse]  # (b, N, D_v)
        out.append(model.itm_logits(image, text_ids[txt], text_mask[txt])[:, 1].float())  # (b,)
    return torch.cat(out) if out else torch.zeros(0, device=pairs.device)


def rerank(itc: Tensor, itm_logit: Tensor, in_i2t: Tensor, in_t2i: Tensor) -> dict[str, Tensor]:
    """The score matrices of the protocol (CPU): ITC alone, and inside each query's top k the
    ITM logit + ITC cosine (LAVIS's final score), -inf outside. itm_logit: (N_img, N_txt)."""
    neg_inf = torch.tensor(float("-inf"), device=itc.device)
    return {
        "itc_i2t": itc.cpu(),
        "itc_t2i": itc.t().contiguous().cpu(),
        "itm_i2t": torch.where(in_i2t, itm_logit + itc, neg_inf).cpu(),
        "itm_t2i": torch.where(in_t2i, (itm_logit + itc).t(), neg_inf).cpu(),
    }


def _best_rank(scores: Tensor, positive: Tensor) -> Tensor:
    """Rank (0 = first) of each row's best-scored positive among the negatives; ties count
    against it, so a positive tied with negatives (e.g. all -inf outside the top k) is
    not a hit by luck. scores, positive: (R, C) -> (R,)."""
    best = scores.masked_fill(~positive, float("-inf")).amax(dim=1, keepdim=True)  # (R, 1)
    return ((scores >= best) & ~positive).sum(dim=1)  # (R,)


def recall_at_k(scores_i2t, scores_t2i, txt2img: Sequence[int], img2txts: Sequence[Sequence[int]],
                ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@K both ways (LAVIS `report_metrics`, as fractions).

    scores_i2t (N_img, N_txt), scores_t2i (N_txt, N_img): higher is better.
    txt2img[t]: the image of text t; img2txts[i]: the texts of image i.
    Image -> text is a hit if ANY of the image's texts is in the top K ("txt_r<K>"); text
    -> image if its image is ("img_r<K>"). Also txt_r_mean, img_r_mean (over `ks`) and
    r_mean, their mean.
    """
    s_i2t = torch.as_tensor(scores_i2t).float().cpu()
    s_t2i = torch.as_tensor(scores_t2i).float().cpu()
    n_img, n_txt = len(img2txts), len(txt2img)
    if s_i2t.shape != (n_img, n_txt) or s_t2i.shape != (n_txt, n_img):
        raise ValueError(f"scores_i2t must be ({n_img}, {n_txt}) and scores_t2i ({n_txt}, {n_img}) "
                         f"for {n_img} images and {n_txt} texts; got {tuple(s_i2t.shape)} and {tuple(s_t2i.shape)}")
    pos_i2t = torch.zeros(n_img, n_txt, dtype=torch.bool)
    for i, texts in enumerate(img2txts):
        if not texts:
            raise ValueError(f"image {i} has no texts in img2txts")
        pos_i2t[i, list(texts)] = True
    pos_t2i = torch.zeros(n_txt, n_img, dtype=torch.bool)
    pos_t2i[torch.arange(n_txt), torch.as_tensor(list(txt2img), dtype=torch.long)] = True
    if not torch.equal(pos_i2t, pos_t2i.t()):
        raise ValueError("txt2img and img2txts disagree: text t must be in img2txts[i] exactly when txt2img[t] == i")

    rank_txt, rank_img = _best_rank(s_i2t, pos_i2t), _best_rank(s_t2i, pos_t2i)  # (N_img,), (N_txt,)
    out = {f"txt_r{k}": (rank_txt < k).float().mean().item() for k in ks}
    out |= {f"img_r{k}": (rank_img < k).float().mean().item() for k in ks}
    out["txt_r_mean"] = sum(out[f"txt_r{k}"] for k in ks) / len(ks)
    out["img_r_mean"] = sum(out[f"img_r{k}"] for k in ks) / len(ks)
    out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
    return out


def recall_any_at_k(scores_t2i: Tensor, positive: Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Text -> image retrieval when a text has many right images (a partial description, "a
    red circle", is true of every image holding one). scores_t2i, positive: (N_txt, N_img).
    "r<K>": share of texts with a right image in their top K (ties count against it, as in
    `recall_at_k`); "p<K>": right images among the top K over as many as there could be
    (min(K, the text's right images)), averaged over texts: 1 when the top K are all right."""
    scores, positive = torch.as_tensor(scores_t2i).float().cpu(), torch.as_tensor(positive).bool().cpu()
    if scores.shape != positive.shape or not positive.any(dim=1).all():
        raise ValueError(f"scores {tuple(scores.shape)} and positive {tuple(positive.shape)} must match, "
                         "and every text needs at least one right image")
    rank = _best_rank(scores, positive)  # (N_txt,)
    out = {f"r{k}": (rank < k).float().mean().item() for k in ks}
    for k in ks:
        top = scores.topk(min(k, scores.shape[1]), dim=1).indices  # (N_txt, k)
        best = positive.sum(dim=1).clamp(max=top.shape[1]).float()  # (N_txt,)
        out[f"p{k}"] = (positive.gather(1, top).sum(dim=1) / best).mean().item()
    return out


def retrieval_eval(model, images: ImageSource, text_ids: Tensor, text_mask: Tensor, txt2img: Sequence[int],
                   img2txts: Sequence[Sequence[int]], k_test: int = 128, batch_size: int = 128,
                   num_images: Optional[int] = None, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Recalls of `retrieval_scores`: "itc/..." ranking by ITC alone, "itm/..." after the
    ITM re-ranking of the top k_test (the numbers BLIP-2 reports)."""
    s = retrieval_scores(model, images, text_ids, text_mask, k_test, batch_size, num_images)
    out = {f"itc/{k}": v for k, v in recall_at_k(s["itc_i2t"], s["itc_t2i"], txt2img, img2txts, ks).items()}
    out |= {f"itm/{k}": v for k, v in recall_at_k(s["itm_i2t"], s["itm_t2i"], txt2img, img2txts, ks).items()}
    return out


# -- objects (shapes world) ---------------------------------------------------------------


def _hashable(obj) -> Hashable:
    return tuple(obj) if isinstance(obj, list) else obj


def object_f1(pred_objects: Sequence[Sequence[Hashable]],
              true_objects: Sequence[Sequence[Hashable]]) -> dict[str, float]:
    """Micro-averaged precision, recall and F1 of predicted objects over all scenes.

    Each scene is a list of objects, each a tuple of attributes, e.g. ("red", "circle");
    matching is per scene and as multisets (two red circles predicted for one true red
    circle: one true positive, one false positive). Undefined ratios (nothing predicted,
    nothing true) are 0. Also "exact_match": the fraction of scenes whose multisets agree.
    """
    if len(pred_objects) != len(true_objects):
        raise ValueError(f"object_f1: {len(pred_objects)} predicted scenes but {len(true_objects)} true ones")
    if not pred_objects:
        raise ValueError("object_f1: no scenes")
    tp = n_pred = n_true = exact = 0
    for pred, true in zip(pred_objects, true_objects):
        p, t = Counter(map(_hashable, pred)), Counter(map(_hashable, true))
        tp += sum((p & t).values())
        n_pred += sum(p.values())
        n_true += sum(t.values())
        exact += p == t
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / n_true if n_true else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "exact_match": exact / len(pred_objects)}


def attribute_f1(pred_objects: Sequence[Sequence[Sequence]], true_objects: Sequence[Sequence[Sequence]],
                 names: Sequence[str]) -> dict[str, float]:
    """`object_f1` of each attribute on its own: objects projected to their i-th field,
    keys "<names[i]>/precision", "<names[i]>/recall", "<names[i]>/f1", "<names[i]>/exact_match"."""
    out: dict[str, float] = {}
    for i, name in enumerate(names):
        scores = object_f1([[o[i] for o in scene] for scene in pred_objects],
                           [[o[i] for o in scene] for scene in true_objects])
        out |= {f"{name}/{k}": v for k, v in scores.items()}
    return out
