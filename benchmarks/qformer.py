"""Q-Former forward (queries + image + text, the ITM-style joint pass): blip2lab against
transformers' Blip2QFormerModel on the same weights and inputs, in the same run.

    python benchmarks/qformer.py                     # BLIP-2 size (768 x 12, 32 queries, ViT-g tokens), CPU
    python benchmarks/qformer.py --size small --batch 32
    python benchmarks/qformer.py --device cuda --dtype bfloat16 --batch 32

Prints both timings, checks the outputs agree, and prints the speed ratio (> 1: blip2lab faster).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved_medians  # noqa: E402

SIZES = {  # hidden, layers, heads, ffn, queries, D_v, N image tokens, T text tokens
    "base": dict(hidden=768, layers=12, heads=12, ffn=3072, queries=32, vision=1408, tokens=257, text=32),
    "small": dict(hidden=256, layers=4, heads=4, ffn=1024, queries=16, vision=384, tokens=65, text=24),
}


def build(size: dict, seed: int = 0):
    """A random HF Blip2ForImageTextRetrieval (1-layer vision tower: it is not timed) and
    the blip2lab model converted from it."""
    from transformers import Blip2Config, Blip2ForImageTextRetrieval

    from blip2lab.formats.hf import from_hf_retrieval

    torch.manual_seed(seed)
    patch = 14 if size["tokens"] == 257 else 8
    grid = int((size["tokens"] - 1) ** 0.5)
    config = Blip2Config(
        vision_config=dict(hidden_size=size["vision"], intermediate_size=4 * size["vision"], num_hidden_layers=1,
                           num_attention_heads=16 if size["vision"] % 16 == 0 else 4, image_size=grid * patch,
                           patch_size=patch),
        qformer_config=dict(hidden_size=size["hidden"], num_hidden_layers=size["layers"],
                            num_attention_heads=size["heads"], intermediate_size=size["ffn"],
                            encoder_hidden_size=size["vision"], use_qformer_text_input=True,
                            vocab_size=30523),  # bert-base-uncased + [DEC], as the itm-vit-g checkpoints
        num_query_tokens=size["queries"],
    )
    hf = Blip2ForImageTextRetrieval(config).eval()
    ours = from_hf_retrieval(hf).eval()
    return hf, ours


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="base")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--padding", action="store_true", help="pad half of each batch's captions")
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args()

    size = SIZES[args.size]
    hf, ours = build(size)
    dtype = getattr(torch, args.dtype)
    hf.to(args.device, dtype)
    ours.to(args.device, dtype)
    g = torch.Generator().manual_seed(0)
    B, T, Q = args.batch, size["text"], size["queries"]
    image = torch.randn(B, size["tokens"], size["vision"], generator=g).to(args.device, dtype)  # after ln_vision
    ids = torch.randint(1000, 30000, (B, T), generator=g).to(args.device)
    mask = torch.ones(B, T, dtype=torch.long, device=args.device)
    if args.padding:
        mask[: B // 2, T // 2:] = 0

    @torch.inference_mode()
    def run_hf():
        embeds = hf.embeddings(input_ids=ids, query_embeds=hf.query_tokens.expand(B, -1, -1))
        full_mask = torch.cat([torch.ones(B, Q, dtype=mask.dtype, device=mask.device), mask], dim=1)
        return hf.qformer(query_embeds=embeds, query_length=Q, attention_mask=full_mask,
                          encoder_hidden_states=image).last_hidden_state

    @torch.inference_mode()
    def run_ours():
        return ours.qformer.encode_joint(image, ids, mask, "itm").hidden

    a, b = run_hf().float(), run_ours().float()
    real = torch.cat([torch.ones(B, Q, dtype=torch.bool, device=mask.device), mask.bool()], dim=1)
    max_diff = (a - b)[real].abs().max().item()
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    times = interleaved_medians({"blip2lab": run_ours, "transformers": run_hf}, repeats=args.repeats)
    result = {
        "benchmark": "qformer_forward_itm", "size": args.size, "batch": B, "device": args.device,
        "dtype": args.dtype, "threads": torch.get_num_threads(), "padding": args.padding,
        "transformers_s": times["transformers"], "blip2lab_s": times["blip2lab"],
        "transformers_img_per_s": B / times["transformers"], "blip2lab_img_per_s": B / times["blip2lab"],
        "ratio": times["transformers"] / times["blip2lab"], "max_abs_diff": max_diff,
        "attn_implementation": hf.qformer.config._attn_implementation,
    }
    print(f"Q-Former ITM forward, {args.size}, batch {B}, {args.device} {args.dtype}, "
          f"{torch.get_num_threads()} threads, HF attention '{result['attn_implementation']}'")
    print(f"  transformers {times['transformers'] * 1e3:8.1f} ms  ({result['transformers_img_per_s']:.1f} img/s)")
    print(f"  blip2lab     {times['blip2lab'] * 1e3:8.1f} ms  ({result['blip2lab_img_per_s']:.1f} img/s)")
    print(f"  ratio (transformers time / blip2lab time): {result['ratio']:.2f}x   max |diff| {max_diff:.2e}")
    if max_diff > tol:
        raise SystemExit(f"outputs differ by {max_diff:.2e} (> {tol}): the comparison is void")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
