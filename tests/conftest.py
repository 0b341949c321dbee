"""Shared tiny configurations: every test runs on the CPU in well under a second a model."""

import pytest
import torch

from blip2lab.config import Blip2Config, QFormerConfig, VisionConfig

# A toy vocabulary layout: [PAD] 0, [CLS] 1, [SEP] 2, ..., [DEC] 99.
PAD, CLS, SEP, DEC, VOCAB = 0, 1, 2, 99, 100


def tiny_config(**qformer_overrides) -> Blip2Config:
    qformer = dict(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, num_queries=4,
                   vocab_size=VOCAB, max_position_embeddings=64, max_text_len=16, pad_token_id=PAD,
                   cls_token_id=CLS, sep_token_id=SEP, dec_token_id=DEC, hidden_dropout=0.0,
                   attention_dropout=0.0, init_std=0.15)  # 0.02 suits width 768; ~1/sqrt(width) here
    qformer.update(qformer_overrides)
    return Blip2Config(
        vision=VisionConfig(image_size=32, patch_size=8, width=24, layers=3, heads=4),
        qformer=QFormerConfig(**qformer),
        embed_dim=16,
    )


def random_text(batch: int, length: int, generator: torch.Generator, pad_from=None):
    """[CLS] w w ... [SEP] [PAD]...: ids (B, T) and mask (B, T). `pad_from[i]` = true length of row i."""
    ids = torch.randint(3, DEC, (batch, length), generator=generator)
    ids[:, 0] = CLS
    mask = torch.ones(batch, length, dtype=torch.long)
    for i in range(batch):
        n = length if pad_from is None else pad_from[i]
        ids[i, n - 1] = SEP
        ids[i, n:] = PAD
        mask[i, n:] = 0
    return ids, mask


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)
