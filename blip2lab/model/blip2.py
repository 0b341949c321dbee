"""BLIP-2, top level: frozen image encoder -> ln_vision -> Q-Former -> heads (-> frozen LLM).

Reads like Figure 2 of the paper. Stage 1 (representation learning, Sec. 3.2) trains the
Q-Former, `ln_vision`, the projections, the ITM head and the temperature with three
losses, one pass per attention mask: ITC (queries alone, text alone), ITM (queries and
text together), ITG (text decoding from the queries). Which losses run is the caller's
choice (the loss ablations run ITC, ITC + ITM, ITC + ITM + ITG). Stage 2 (Sec. 3.3) shows
the query outputs to a frozen LLM as a soft visual prompt (`llm_bridge.LanguageModel`).

Every box starts with fresh weights; pretrained towers come in as arguments
(`blip2lab.formats.build_model` reads them from the config's sources). The speed-ups of
`speedups.py` are on by default and switched by `self.speedups`; none changes a result.

Shape legend: B batch, W world size, Q queries, N image tokens, T text length,
D_v image width, D_q Q-Former width, E ITC width (256), V vocab.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import dist
from ..config import Blip2Config
from ..decoding import DecodingConfig, generate, kv_reorder
from . import losses as L
from .image_encoder import ImageEncoder, build_image_encoder
from .llm_bridge import LanguageModel
from .qformer import QFormer, attention_mask
from .speedups import ImageKV, RowPlan, Speedups, text_rows


@dataclass
class ImageFeatures:
    hidden: Tensor  # (B, Q, D_q) query outputs
    proj: Tensor  # (B, Q, E) L2-normalised, the ITC space
    query_kv: Optional[list] = None  # the queries' self-attention keys/values per layer (for ITG)


@dataclass
class TextFeatures:
    cls: Tensor  # (B, D_q): the [CLS] row's output
    proj: Tensor  # (B, E) L2-normalised [CLS] projection


def _take(image: Tensor | ImageKV, rows: Tensor) -> Tensor | ImageKV:
    """The images at `rows` of an image batch (B, N, D_v) or of its ImageKV."""
    return image.select(rows) if isinstance(image, ImageKV) else image[rows]


def _cat(parts: list) -> Tensor | ImageKV:
    return ImageKV.cat(parts) if isinstance(parts[0], ImageKV) else torch.cat(parts)


class Blip2(nn.Module):
    def __init__(self, config: Blip2Config, image_encoder: Optional[ImageEncoder] = None,
                 language_model: Optional[nn.Module] = None):
        """`image_encoder`: the frozen tower (default: the configured one, fresh weights);
        `language_model`: the frozen transformers causal or seq2seq LM, required when the
        config names one (`build_model` loads both from the config's sources)."""
        super().__init__()
        self.config = config
        self.speedups = Speedups()
        q = config.qformer
        self.image_encoder = (image_encoder or build_image_encoder(config.vision)).freeze()
        if config.vision.gradient_checkpointing:  # for an unfrozen tower; see VisionConfig
            self.image_encoder.set_gradient_checkpointing(True)
        self.ln_vision = nn.LayerNorm(config.vision.width, eps=config.vision.ln_vision_eps)
        # (N, D_v), zero at the start: the model begins as the paper's (config.image_pos_embed)
        self.image_pos = (nn.Parameter(torch.zeros(config.vision.num_tokens, config.vision.width))
                          if config.image_pos_embed else None)
        self.qformer = QFormer(q, config.vision.width)
        if q.text_input and q.stage1_heads:  # the stage-1 heads; stage-2 and InstructBLIP checkpoints carry none
            self.vision_proj = nn.Linear(q.hidden_size, config.embed_dim)
            self.text_proj = nn.Linear(q.hidden_size, config.embed_dim)
            self.itm_head = nn.Linear(q.hidden_size, 2)
            self.temp = nn.Parameter(torch.tensor(config.temp_init))
            for head in (self.vision_proj, self.text_proj, self.itm_head):  # BERT-style init, as LAVIS
                nn.init.normal_(head.weight, std=q.init_std)
                nn.init.zeros_(head.bias)
        if q.freeze_word_embeddings:  # copied from qformer.init_from, never trained (QFormerConfig)
            self.qformer.word_embeddings.requires_grad_(False)
        self.llm: Optional[LanguageModel] = None
        if config.llm.kind != "none" and language_model is None:
            raise ValueError(f"the config names a {config.llm.kind} LLM ({config.llm.name_or_path}): pass it as "
                             "language_model=, or build with blip2lab.formats.build_model(config), which loads it")
        if language_model is not None:
            self.llm = LanguageModel(language_model, q.hidden_size, config.llm.visual_prompt_norm)
            if self.llm.kind != config.llm.kind:
                raise ValueError(f"llm.kind is {config.llm.kind!r} but the language model is {self.llm.kind!r}")

    @property
    def has_stage1_heads(self) -> bool:
        return self.config.qformer.text_input and self.config.qformer.stage1_heads

    # -- the boxes of Figure 2 -----------------------------------------------------------

    def encode_image(self, pixels: Optional[Tensor] = None, image_embeds: Optional[Tensor] = None) -> Tensor:
        """Frozen tower (or its cached output `image_embeds`) -> trainable ln_vision: (B, N, D_v)."""
        if (pixels is None) == (image_embeds is None):
            raise ValueError("pass exactly one of `pixels` (B, 3, H, W) or cached `image_embeds` (B, N, D_v)")
        if pixels is not None:
            image_embeds = self.image_encoder(pixels)  # (B, N, D_v), no gradient
        else:
            self._check_image_embeds(image_embeds)
            # Cached features arrive in their storage precision (fp16 from the feature cache):
            # cast on the device, so a batch crosses to it at half the bytes.
            image_embeds = image_embeds.to(self.ln_vision.weight.dtype)
        image = self.ln_vision(image_embeds)
        return image if self.image_pos is None else image + self.image_pos

    def _check_image_embeds(self, x: Tensor) -> None:
        D_v = self.config.vision.width
        if x.ndim != 3 or x.shape[-1] != D_v:
            raise ValueError(f"image_embeds must be (B, N, {D_v}) (vision.width), got {tuple(x.shape)}")
        if x.shape[0] == 0:
            raise ValueError("empty batch: image_embeds has 0 examples")

    def image_features(self, image: Tensor | ImageKV, use_cache: bool = False) -> ImageFeatures:
        """Queries alone over the image (the ITC mask's query block): query outputs and their
        ITC projection. image: (B, N, D_v) after ln_vision, or its ImageKV."""
        out = self.qformer.encode_queries(image, use_cache=use_cache)
        return ImageFeatures(out.hidden, F.normalize(self.vision_proj(out.hidden), dim=-1), out.past_kv)

    def text_features(self, text_ids: Tensor, text_mask: Tensor) -> TextFeatures:
        """Text alone (the ITC mask's text block) -> the [CLS] output and its ITC projection."""
        cls = self.qformer.encode_text(text_ids, text_mask, self._rows(text_mask, keep=1))[:, 0]  # (B, D_q)
        return TextFeatures(cls, F.normalize(self.text_proj(cls), dim=-1))

    def multimodal_features(self, image: Tensor | ImageKV, text_ids: Tensor, text_mask: Tensor) -> Tensor:
        """Queries and text in one pass under the ITM (bidirectional) mask: the query outputs,
        which have seen the text, (B, Q, D_q)."""
        Q = self.config.qformer.num_queries
        rows = self._rows(text_mask, keep=Q)
        return self.qformer.encode_joint(image, text_ids, text_mask, "itm", rows=rows).hidden[:, :Q]

    def itm_logits(self, image: Tensor | ImageKV, text_ids: Tensor, text_mask: Tensor) -> Tensor:
        """ITM head over each query output, mean over queries: (B, 2), index 1 = match."""
        return self.itm_head(self.multimodal_features(image, text_ids, text_mask)).mean(dim=1)

    @staticmethod
    def itc_cosine(image_proj: Tensor, text_proj: Tensor) -> Tensor:
        """Cosine similarity of every image with every text, max over queries: (B_i, B_t).
        A cosine in [-1, 1], not a probability (no temperature, no softmax)."""
        return torch.einsum("iqe,te->itq", image_proj, text_proj).amax(dim=-1)

    def _rows(self, text_mask: Tensor, keep: Optional[int] = None) -> Optional[RowPlan]:
        """The RowPlan of a pass whose caller reads its first `keep` rows, as `speedups` allows."""
        keep = keep if self.speedups.prune_last_layer else None
        rows = text_rows(text_mask) if self.speedups.pack_text_ffn else None
        return None if keep is None and rows is None else RowPlan(keep, rows)

    # -- stage 1 -------------------------------------------------------------------------

    def forward(
        self,
        text_ids: Optional[Tensor] = None,  # (B, T) Q-Former text, [CLS] first (stage 1)
        text_mask: Optional[Tensor] = None,  # (B, T), 1 = real token
        pixels: Optional[Tensor] = None,  # (B, 3, H, W), or ...
        image_embeds: Optional[Tensor] = None,  # (B, N, D_v) cached frozen-encoder output
        losses: Sequence[str] = ("itc", "itm", "itg"),  # stage 1; stage 2 is ("lm",)
        label_smoothing: float = 0.1,
        image_ids: Optional[Tensor] = None,  # (B,) examples of the same image are never ITM negatives
        generator: Optional[torch.Generator] = None,  # for the ITM negative draws
        itm_easy_negatives: float = 0.0,  # share of random ITM negatives (L.sample_hard_negatives)
        text_true_of: Optional[Tensor] = None,  # (B, B) text i also true of image j: never its ITM negative
        lm_per_item: bool = False,  # stage 2: average the LM loss per item, then over items (L.lm_loss)
        **llm_batch: Tensor,  # stage 2: llm_ids, llm_mask, llm_labels (+ llm_target_*, question_*)
    ) -> dict[str, Tensor]:
        """The losses of one step, a dict of named `*_loss` tensors (and the temperature)."""
        image = self.encode_image(pixels, image_embeds)  # (B, N, D_v)
        out: dict[str, Tensor] = {}
        stage1 = [name for name in losses if name != "lm"]
        if stage1:
            out |= self._stage1(image, text_ids, text_mask, stage1, label_smoothing, image_ids, generator,
                                itm_easy_negatives, text_true_of)
        if "lm" in losses:
            out |= self._stage2(image, per_item=lm_per_item, **llm_batch)
        return out

    def _stage1(self, image: Tensor, text_ids: Optional[Tensor], text_mask: Optional[Tensor], losses: Sequence[str],
                label_smoothing: float, image_ids: Optional[Tensor], generator: Optional[torch.Generator],
                itm_easy_negatives: float = 0.0, text_true_of: Optional[Tensor] = None) -> dict:
        """ITC, ITM and ITG (Sec. 3.2), those named in `losses`."""
        if not self.has_stage1_heads:
            raise ValueError("stage-1 losses need the Q-Former's text side and heads (qformer.text_input=True, "
                             "qformer.stage1_heads=True)")
        self._check_text(text_ids, text_mask)
        with torch.no_grad():
            self.temp.clamp_(self.config.temp_min, self.config.temp_max)
        source = self.qformer.image_kv(image) if self.speedups.image_kv_once else image  # what every pass reads
        img = self.image_features(source, use_cache="itg" in losses)  # queries alone: (B, Q, E) + their K/V
        txt = self.text_features(text_ids, text_mask)  # text alone: (B, E)
        sim_i2t, sim_t2i = L.itc_similarity(img.proj, txt.proj, dist.all_gather_no_grad(img.proj),
                                            dist.all_gather_no_grad(txt.proj), self.temp)  # (B, W*B) each
        out: dict[str, Tensor] = {"temp": self.temp.detach()}
        if "itc" in losses:
            out |= L.itc_loss(sim_i2t, sim_t2i, dist.rank(), label_smoothing)
        if "itm" in losses:
            out |= self._itm(image, source, text_ids, text_mask, sim_i2t, sim_t2i, image_ids, generator,
                             itm_easy_negatives, text_true_of)
        if "itg" in losses:
            out |= self._itg(source, text_ids, text_mask, img.query_kv, label_smoothing)
        return out

    def _itm(self, image: Tensor, source: Tensor | ImageKV, text_ids: Tensor, text_mask: Tensor, sim_i2t: Tensor,
             sim_t2i: Tensor, image_ids: Optional[Tensor], generator: Optional[torch.Generator],
             easy_share: float = 0.0, text_true_of: Optional[Tensor] = None) -> dict[str, Tensor]:
        """Positives + one hard negative each way (drawn by ITC similarity) -> the ITM loss over
        (pos, pos) | (pos text, neg image) | (neg text, pos image) pairs (Sec. 3.2)."""
        text_ids = dist.pad_to_common_length(text_ids, self.config.qformer.pad_token_id)  # (B, T_max of all ranks)
        text_mask = dist.pad_to_common_length(text_mask, 0)
        ids_all, mask_all = dist.all_gather_no_grad(text_ids), dist.all_gather_no_grad(text_mask)  # (W*B, T)
        ids_of_image_all = None if image_ids is None else dist.all_gather_no_grad(image_ids)
        positive = L.positive_pairs(text_ids, ids_all, dist.rank(), image_ids, ids_of_image_all)  # (B, W*B)
        positive_i2t = None
        if text_true_of is not None:  # a text true of other images too (a partial description)
            positive, positive_i2t = L.true_pairs(text_true_of, positive, dist.rank())
        neg_img, neg_txt, ok_t, ok_i = L.sample_hard_negatives(sim_i2t, sim_t2i, positive, generator, easy_share,
                                                               positive_i2t)
        if bool((ok_t & ok_i).all()):  # the usual case: every row has a negative; index without cutting rows
            ok_t = ok_i = slice(None)
        if dist.is_distributed():  # a negative image may be another rank's: gather it (with gradient)
            negatives = dist.all_gather_with_grad(image)[neg_img[ok_t]]  # (B', N, D_v)
            if isinstance(source, ImageKV):
                negatives = self.qformer.image_kv(negatives)
        else:
            negatives = _take(source, neg_img[ok_t])
        pair_ids = torch.cat([text_ids, text_ids[ok_t], ids_all[neg_txt][ok_i]])  # (M, T)
        pair_mask = torch.cat([text_mask, text_mask[ok_t], mask_all[neg_txt][ok_i]])  # (M, T)
        pair_images = _cat([source, negatives, _take(source, ok_i)])  # (M, N, D_v) or its ImageKV
        labels = torch.zeros(pair_ids.shape[0], dtype=torch.long, device=text_ids.device)
        labels[: text_ids.shape[0]] = 1
        return L.itm_loss(self.itm_logits(pair_images, pair_ids, pair_mask), labels)

    def _itg(self, source: Tensor | ImageKV, text_ids: Tensor, text_mask: Tensor, query_kv: Optional[list],
             label_smoothing: float) -> dict[str, Tensor]:
        """[DEC] replaces [CLS]; the text is decoded under the multimodal-causal mask (queries
        see queries, text sees the queries and earlier text) -> next-token loss (Sec. 3.2)."""
        Q = self.config.qformer.num_queries
        dec_ids = text_ids.clone()
        dec_ids[:, 0] = self.config.qformer.token_id("dec", "ITG (image-grounded text generation)")
        labels = dec_ids.masked_fill(text_mask == 0, -100)  # (B, T), padding ignored
        if self.speedups.itg_reuses_queries:  # the text over the ITC pass's cached query keys/values
            hidden = self.qformer.decode_text(dec_ids, text_mask, query_kv, rows=self._rows(text_mask))
        else:  # the paper's picture: one pass over [queries ; text]
            hidden = self.qformer.encode_joint(source, dec_ids, text_mask, "itg").hidden[:, Q:]  # (B, T, D_q)
        if self.speedups.itg_predicting_rows:
            rows, targets = L.itg_targets(labels)  # (M,) positions into B*T, (M,) their next tokens
            return L.itg_loss_rows(self.qformer.lm_head(hidden.flatten(0, 1)[rows]), targets, label_smoothing)
        return L.itg_loss(self.qformer.lm_head(hidden), labels, label_smoothing)  # logits (B, T, V)

    def _check_text(self, text_ids: Optional[Tensor], text_mask: Optional[Tensor]) -> None:
        if text_ids is None or text_mask is None:
            raise ValueError("stage-1 losses need text_ids and text_mask (B, T)")
        if text_ids.ndim != 2 or text_ids.shape != text_mask.shape:
            raise ValueError(f"text_ids and text_mask must both be (B, T); got {tuple(text_ids.shape)} "
                             f"and {tuple(text_mask.shape)}")
        if text_ids.shape[0] == 0:
            raise ValueError("empty batch: text_ids has 0 examples")

    # -- stage 2 -------------------------------------------------------------------------

    def query_outputs(self, image: Tensor, question_ids: Optional[Tensor] = None,
                      question_mask: Optional[Tensor] = None) -> Tensor:
        """What the LLM is shown: the Q query outputs (B, Q, D_q). With `qformer_question`,
        the question joins the queries in the ITM-style joint pass (the paper's VQA
        fine-tuning; InstructBLIP's instruction-aware queries) so they pick question-relevant features."""
        if question_ids is None:
            return self.qformer.encode_queries(image).hidden
        if not self.config.qformer_question:
            raise ValueError("question_ids given but qformer_question is off in this model's config")
        return self.multimodal_features(image, question_ids, question_mask)

    def _stage2(self, image: Tensor, llm_ids: Tensor, llm_mask: Tensor, llm_labels: Tensor,
                llm_target_ids: Optional[Tensor] = None, llm_target_mask: Optional[Tensor] = None,
                question_ids: Optional[Tensor] = None, question_mask: Optional[Tensor] = None,
                per_item: bool = False) -> dict[str, Tensor]:
        """Generative learning (Sec. 3.3): the queries as a soft visual prompt of the frozen LLM."""
        if self.llm is None:
            raise ValueError("the lm loss needs a language model (llm.kind is 'none')")
        visual = self.llm.visual_prompt(self.query_outputs(image, question_ids, question_mask))  # (B, Q, D_lm)
        return self.llm.loss(visual, llm_ids, llm_mask, llm_labels, llm_target_ids, llm_target_mask, per_item)

    @torch.no_grad()
    def generate_text(self, image: Tensor, llm_ids: Tensor, llm_mask: Tensor, decoding: DecodingConfig,
                      eos_token_id: int | Sequence[int], pad_token_id: int,
                      question_ids: Optional[Tensor] = None, question_mask: Optional[Tensor] = None) -> Tensor:
        """LLM tokens generated after the visual prompt and the text prompt `llm_ids`
        (left-padded for decoder-only LLMs). image: (B, N, D_v) after ln_vision. Returns
        the new tokens only (B, L)."""
        if self.llm is None:
            raise ValueError("this model has no language model (llm.kind is 'none'); use generate_captions")
        visual = self.llm.visual_prompt(self.query_outputs(image, question_ids, question_mask))
        return self.llm.generate(visual, llm_ids, llm_mask, decoding, eos_token_id, pad_token_id)

    # -- Q-Former-only captioning (the ITG decoder, no LLM) -------------------------------

    @torch.no_grad()
    def generate_captions(self, image: Tensor, decoding: Optional[DecodingConfig] = None) -> Tensor:
        """Captions from the Q-Former's own decoder: start at [DEC], stop at [SEP].
        image: (B, N, D_v) after ln_vision. Returns new token ids (B, L), EOS-then-pad.
        Default decoding is LAVIS's: 3 beams, max length 30 and min length 10, which in
        LAVIS count the [DEC] token, hence 29 and 9 new tokens."""
        q = self.config.qformer
        if not (q.text_input and q.stage1_heads):
            raise ValueError("Q-Former captioning needs the Q-Former's text side and LM head, which this model lacks "
                             f"(qformer.text_input={q.text_input}, qformer.stage1_heads={q.stage1_heads}: a stage-2 "
                             "or InstructBLIP checkpoint): caption with its LLM instead")
        dec = q.token_id("dec", "Q-Former captioning (the ITG decoder)")
        sep = q.token_id("sep", "Q-Former captioning (the ITG decoder)")
        decoding = decoding or DecodingConfig(strategy="beam", num_beams=3, max_new_tokens=29, min_new_tokens=9)
        queries = self.qformer.encode_queries(image, use_cache=True)
        start = torch.full((image.shape[0], 1), dec, dtype=torch.long, device=image.device)
        return generate(self._caption_step, start, (queries.past_kv, 0), decoding,
                        eos_token_id=sep, pad_token_id=q.pad_token_id, reorder=kv_reorder)

    def _caption_step(self, new_ids: Tensor, state: tuple) -> tuple[Tensor, tuple]:
        """One decoding step: new text tokens over the cached queries + earlier text."""
        past_kv, n_text = state
        B, t = new_ids.shape
        mask = None  # one new token may see every cached row
        if t > 1:  # a multi-token prompt: queries + causal text
            Q = self.config.qformer.num_queries
            mask = attention_mask("itg", Q, torch.ones_like(new_ids))[:, Q:, :]
            if n_text:
                raise ValueError("multi-token steps are only supported before any text is cached")
        out = self.qformer(text_ids=new_ids, mask=mask, with_queries=False, past_kv=past_kv,
                           position_offset=n_text, use_cache=True)
        logits = self.qformer.lm_head(out.hidden[:, -1])  # (B, V)
        return logits, (out.past_kv, n_text + t)
