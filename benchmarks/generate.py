"""Caption generation: blip2lab against transformers' Blip2ForConditionalGeneration on the
same weights and inputs, in the same run; outputs checked identical, throughput ratio printed.

    python benchmarks/generate.py                                  # tiny model, CPU, batch 8, 30 new tokens
    python benchmarks/generate.py --size tiny-t5                   # the same with a tiny FlanT5

Real sizes on a GPU (models built on the device, transformers' precision, CUDA graphs,
memory): `bash benchmarks/gpu.sh` (benchmarks/gpu.py).

Both decode exactly `--new-tokens` tokens (EOS forbidden until then), greedy and beam 5.
Weights are random: real-size runs measure speed, not captions.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved_medians, peak_rss_added  # noqa: E402

SIZES = {
    # vision (width, layers, heads, mlp, image, patch), qformer (width, layers, heads), text config
    "tiny": dict(vision=(64, 2, 4, 128, 32, 8), qformer=(64, 2, 4), lm="opt", lm_dims=(64, 2, 4, 128), vocab=1000),
    "tiny-t5": dict(vision=(64, 2, 4, 128, 32, 8), qformer=(64, 2, 4), lm="t5", lm_dims=(64, 2, 4, 128), vocab=1000),
    "opt-2.7b": dict(vision=(1408, 39, 16, 6144, 224, 14), qformer=(768, 12, 12), lm="opt",
                     lm_dims=(2560, 32, 32, 10240), vocab=50272),
    "flan-t5-xl": dict(vision=(1408, 39, 16, 6144, 224, 14), qformer=(768, 12, 12), lm="t5",
                       lm_dims=(2048, 24, 32, 5120), vocab=32128),
}


def build_hf(size: dict, dtype: torch.dtype, device: str):
    from transformers import Blip2Config, Blip2ForConditionalGeneration, OPTConfig, T5Config

    width, layers, heads, mlp, image, patch = size["vision"]
    qw, ql, qh = size["qformer"]
    d, n, h, ff = size["lm_dims"]
    vocab = size["vocab"]
    if size["lm"] == "opt":
        text = OPTConfig(vocab_size=vocab + 1, hidden_size=d, num_hidden_layers=n, ffn_dim=ff, num_attention_heads=h,
                         word_embed_proj_dim=d, max_position_embeddings=2048, bos_token_id=2, eos_token_id=2,
                         pad_token_id=1)
    else:
        text = T5Config(vocab_size=vocab + 1, d_model=d, d_kv=d // h, d_ff=ff, num_layers=n, num_decoder_layers=n,
                        num_heads=h, feed_forward_proj="gated-gelu", decoder_start_token_id=0, pad_token_id=0,
                        eos_token_id=1, tie_word_embeddings=False)
    config = Blip2Config(
        vision_config=dict(hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads,
                           intermediate_size=mlp, image_size=image, patch_size=patch),
        qformer_config=dict(hidden_size=qw, num_hidden_layers=ql, num_attention_heads=qh, intermediate_size=4 * qw,
                            encoder_hidden_size=width, vocab_size=30523),
        text_config=text.to_dict(), num_query_tokens=32, image_token_index=vocab,
    )
    with torch.device(device):
        torch.manual_seed(0)
        model = Blip2ForConditionalGeneration(config)
    if size is SIZES["tiny"] or size is SIZES["tiny-t5"]:
        with torch.no_grad():  # decisive logits, so greedy and beam choices are far from ties
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.1)
    return model.to(dtype).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--strategies", default="greedy,beam")
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args()

    from blip2lab.decoding.generation import DecodingConfig
    from blip2lab.formats.hf import from_hf

    size = SIZES[args.size]
    dtype = getattr(torch, args.dtype)
    hf = build_hf(size, dtype, args.device)
    ours = from_hf(hf).to(args.device)
    ours.qformer.float(), ours.ln_vision.float()  # trainable parts stay fp32, as in HF (_keep_in_fp32_modules)
    B, Q, L = args.batch, 32, args.new_tokens
    image = size["vision"][4]
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(B, 3, image, image, generator=g).to(args.device, dtype)
    text = hf.config.text_config
    start = torch.full((B, 1), text.bos_token_id if size["lm"] == "opt" else 0, device=args.device)
    prompt = start if size["lm"] == "opt" else torch.zeros(B, 0, dtype=torch.long, device=args.device)
    hf_ids = torch.cat([torch.full((B, Q), hf.config.image_token_index, device=args.device), prompt], 1)
    eos, pad = text.eos_token_id, text.pad_token_id

    results = []
    for strategy in args.strategies.split(","):
        beams = 5 if strategy == "beam" else 1

        @torch.inference_mode()
        def run_hf():
            out = hf.generate(pixel_values=pixels, input_ids=hf_ids, attention_mask=torch.ones_like(hf_ids),
                              max_new_tokens=L, min_new_tokens=L, num_beams=beams, do_sample=False,
                              eos_token_id=eos, pad_token_id=pad)
            return out[:, hf_ids.shape[1]:] if size["lm"] == "opt" else out[:, 1:]

        @torch.inference_mode()
        def run_ours():
            image_embeds = ours.encode_image(pixels.to(dtype))
            ids = prompt if prompt.shape[1] else torch.zeros(B, 0, dtype=torch.long, device=args.device)
            return ours.generate_text(image_embeds, ids, torch.ones_like(ids),
                                      DecodingConfig(strategy=strategy, num_beams=beams, max_new_tokens=L,
                                                     min_new_tokens=L), eos_token_id=eos, pad_token_id=pad)

        same = run_hf().tolist() == run_ours().tolist()
        times = interleaved_medians({"transformers": run_hf, "blip2lab": run_ours}, repeats=args.repeats, warmup=1)
        row = {"benchmark": f"caption_{strategy}", "size": args.size, "batch": B, "new_tokens": L,
               "device": args.device, "dtype": args.dtype, "identical": same,
               "transformers_img_per_s": B / times["transformers"], "blip2lab_img_per_s": B / times["blip2lab"],
               "ratio": times["transformers"] / times["blip2lab"]}
        if args.device == "cpu":  # the CUDA peaks are gpu.py's
            row |= {f"{who}_peak_rss_added_bytes": peak_rss_added(fn) for who, fn in
                    (("transformers", run_hf), ("blip2lab", run_ours))}
        results.append(row)
        mem = (f", peak RSS added per call: transformers {row['transformers_peak_rss_added_bytes'] / 2**20:.1f} MB, "
               f"blip2lab {row['blip2lab_peak_rss_added_bytes'] / 2**20:.1f} MB") if args.device == "cpu" else ""
        print(f"{strategy:6s} {args.size} batch {B}, {L} new tokens, {args.device} {args.dtype}: "
              f"transformers {row['transformers_img_per_s']:7.1f} img/s, blip2lab {row['blip2lab_img_per_s']:7.1f} img/s, "
              f"ratio {row['ratio']:.2f}x, outputs identical: {same}{mem}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    if not all(r["identical"] for r in results):
        raise SystemExit("outputs differ: the comparison is void")


if __name__ == "__main__":
    main()
