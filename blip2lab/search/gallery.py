"""A searchable gallery: images and texts indexed once, searched both ways with BLIP-2's
retrieval protocol (paper Sec. 4.4; LAVIS `compute_sim_matrix`, blip2lab.evaluate):

1. ITC: the query's embedding against every indexed embedding, cosine max over queries;
2. optionally ITM re-ranking of the ITC top k: each (image, text) pair through the ITM
   head, ranked by ITM logit + ITC cosine as LAVIS does.

Every hit carries its ITC cosine and its ITM probability (the ITM head runs on the top k
either way, so the probability is shown even when ITC alone ranks).

What an index keeps per image is what both steps need: the query embeddings (Q, E) for
ITC and the ln_vision output (N, D_v) for ITM, so a search never runs the image tower.

Shape legend: M indexed images, K indexed texts, Q queries, E ITC width, N image tokens,
D_v image width, T text length, k hits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Sequence

import torch
from torch import Tensor

from blip2lab.pipeline import Blip2Pipeline

Mode = Literal["itc", "itc+itm"]


@dataclass
class Hit:
    rank: int  # 1-based
    index: int  # position in the gallery's images (text -> image) or texts (image -> text)
    key: str  # the image's key, or the text itself
    itc_cosine: float  # in [-1, 1], max over queries; not a probability
    itm_prob: float  # ITM softmax probability of "match"
    score: float  # what the ranking used: the cosine (itc) or ITM logit + cosine (itc+itm)


@dataclass
class Gallery:
    """Images (with a key each, e.g. a file name) and texts, embedded for retrieval."""

    image_keys: list[str] = field(default_factory=list)
    image_tokens: Optional[Tensor] = None  # (M, N, D_v) ln_vision output, for ITM
    image_proj: Optional[Tensor] = None  # (M, Q, E) L2-normalised query embeddings, for ITC
    texts: list[str] = field(default_factory=list)
    text_proj: Optional[Tensor] = None  # (K, E) L2-normalised [CLS] embeddings, for ITC

    @property
    def num_images(self) -> int:
        return len(self.image_keys)

    @property
    def num_texts(self) -> int:
        return len(self.texts)

    def __len__(self) -> int:
        return self.num_images + self.num_texts

    # -- building ------------------------------------------------------------------------

    @torch.no_grad()
    def add_images(self, pipe: Blip2Pipeline, images: Sequence[Any], keys: Sequence[str], batch: int = 64) -> None:
        """Embed and append images (anything the processor loads). A bad image raises
        ValueError before anything is appended."""
        if len(images) != len(keys):
            raise ValueError(f"{len(images)} images but {len(keys)} keys")
        if not images:
            return
        model, _ = pipe.scorer()
        tokens, proj = [], []
        for start in range(0, len(images), batch):
            x = pipe._image(list(images[start:start + batch]), model)  # (b, N, D_v)
            tokens.append(x)
            proj.append(model.image_features(x).proj)  # (b, Q, E)
        self.image_tokens = _cat(self.image_tokens, torch.cat(tokens))
        self.image_proj = _cat(self.image_proj, torch.cat(proj))
        self.image_keys += list(keys)

    @torch.no_grad()
    def add_texts(self, pipe: Blip2Pipeline, texts: Sequence[str], batch: int = 256) -> None:
        texts = [t for t in texts if t.strip()]
        if not texts:
            return
        proj = [pipe.embed_texts(list(texts[start:start + batch])) for start in range(0, len(texts), batch)]
        self.text_proj = _cat(self.text_proj, torch.cat(proj))  # (K, E)
        self.texts += list(texts)

    def __add__(self, other: "Gallery") -> "Gallery":
        """Both galleries' items, this one's first (e.g. a shared index + one user's uploads)."""
        return Gallery(self.image_keys + other.image_keys, _cat(self.image_tokens, other.image_tokens),
                       _cat(self.image_proj, other.image_proj), self.texts + other.texts,
                       _cat(self.text_proj, other.text_proj))

    # -- searching -----------------------------------------------------------------------

    @torch.no_grad()
    def text_to_image(self, pipe: Blip2Pipeline, text: str, k: int = 10, mode: Mode = "itc+itm") -> list[Hit]:
        """The k images that best match `text`."""
        if not self.num_images:
            raise ValueError("the gallery holds no images to search")
        model, proc = pipe.scorer()
        t = {n: v.to(pipe.device) for n, v in proc.qformer_text([text]).items()}  # (1, T) each
        text_proj = model.text_features(t["text_ids"], t["text_mask"]).proj  # (1, E)
        itc = model.itc_cosine(self.image_proj, text_proj)[:, 0]  # (M,)
        top = itc.topk(min(k, self.num_images)).indices  # (k,)
        ids, mask = t["text_ids"].expand(len(top), -1), t["text_mask"].expand(len(top), -1)  # (k, T)
        itm = model.itm_logits(self.image_tokens[top], ids, mask)  # (k, 2)
        return _ranked(top, itc[top], itm, mode, [self.image_keys[i] for i in top.tolist()])

    @torch.no_grad()
    def image_to_text(self, pipe: Blip2Pipeline, image: Any, k: int = 10, mode: Mode = "itc+itm") -> list[Hit]:
        """The k texts that best match `image` (anything the processor loads)."""
        if not self.num_texts:
            raise ValueError("the gallery holds no texts to search")
        model, proc = pipe.scorer()
        x = pipe._image([image], model)  # (1, N, D_v)
        itc = model.itc_cosine(model.image_features(x).proj, self.text_proj)[0]  # (K,)
        top = itc.topk(min(k, self.num_texts)).indices  # (k,)
        t = {n: v.to(pipe.device) for n, v in proc.qformer_text([self.texts[i] for i in top.tolist()]).items()}
        itm = model.itm_logits(x.expand(len(top), -1, -1), t["text_ids"], t["text_mask"])  # (k, 2)
        return _ranked(top, itc[top], itm, mode, [self.texts[i] for i in top.tolist()])


def _cat(a: Optional[Tensor], b: Optional[Tensor]) -> Optional[Tensor]:
    if a is None or b is None:
        return b if a is None else a
    return torch.cat([a, b])


def _ranked(top: Tensor, itc: Tensor, itm_logits: Tensor, mode: Mode, keys: list[str]) -> list[Hit]:
    """top, itc: (k,) in ITC order; itm_logits: (k, 2) -> hits in the order `mode` ranks."""
    if mode not in ("itc", "itc+itm"):
        raise ValueError(f"mode must be 'itc' or 'itc+itm', got {mode!r}")
    prob = itm_logits.softmax(dim=-1)[:, 1]  # (k,)
    score = itc if mode == "itc" else itm_logits[:, 1] + itc  # LAVIS: ITM logit + ITC similarity
    order = score.argsort(descending=True, stable=True).tolist()
    return [Hit(rank=r + 1, index=int(top[i]), key=keys[i], itc_cosine=float(itc[i]), itm_prob=float(prob[i]),
                score=float(score[i])) for r, i in enumerate(order)]
