"""A real-size dry run of the official-checkpoint path on the CPU: a random-weight checkpoint
of Salesforce/blip2-opt-2.7b's exact shape (its published config.json, unshrunk) in bf16,
about 7.7 GB on disk, opened by `blip2lab.load(folder, dtype="bfloat16")` and by
transformers' `Blip2ForConditionalGeneration.from_pretrained(folder, dtype=torch.bfloat16)`,
each in its own process (peak RSS is that process's), captioning the same two images
greedily: tokens must be identical; load time, caption time and peak memory for both.

    python benchmarks/official_dry_run.py                  # build (once), then measure both
    python benchmarks/official_dry_run.py --json out.json --max-new-tokens 20

The folder (default runs/benchmarks/blip2-opt-2.7b-random) is written once and reused. Its
tokenizer is the synthetic one of tests/published.py (the published tokenizer configs over a
vocabulary with every special token at its published id); the weights are random, so the
captions are noise: what is compared is that both read the same files into the same model.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks")]
REPO = "blip2-opt-2.7b"
SHARD_BYTES = 2 * 1024**3


def build(folder: Path, seed: int = 0) -> None:
    """Write the checkpoint shard by shard (never the whole model in memory): every tensor of
    the published architecture, random normal(0, 0.02) weights, unit norms, zero biases, bf16."""
    import shutil

    import published
    import torch
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    config = Blip2Config.from_dict(published.published(REPO))
    with init_empty_weights():
        shape = Blip2ForConditionalGeneration(config)
    shape.tie_weights()  # OPT's LM head is its input embeddings: stored once, as the hub's files
    g = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    shards, current, size, weight_map = [], {}, 0, {}

    def flush():
        nonlocal current, size
        if current:
            name = f"model-{len(shards) + 1:05d}.safetensors"
            save_file(current, str(folder / name), metadata={"format": "pt"})
            shards.append(name)
            weight_map.update({k: name for k in current})
            current, size = {}, 0

    for key, p in shape.named_parameters():  # tied weights once (the LM head is the embeddings)
        if key.endswith("bias"):
            t = torch.zeros(p.shape, dtype=torch.bfloat16)
        elif p.ndim == 1 or "layernorm" in key.lower() or "layer_norm" in key:
            t = torch.ones(p.shape, dtype=torch.bfloat16)
        else:
            t = (torch.randn(p.shape, generator=g) * 0.02).to(torch.bfloat16)
        current[key] = t
        size += t.numel() * 2
        if size >= SHARD_BYTES:
            flush()
    flush()
    total = sum((folder / s).stat().st_size for s in shards)
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    for name in ("config.json", "preprocessor_config.json", "processor_config.json", "generation_config.json"):
        shutil.copy(published.ROOT / REPO / name, folder / name)
    published.synthetic_tokenizer(REPO, folder)


def _images():
    import torch
    from PIL import Image

    g = torch.Generator().manual_seed(7)
    return [Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).byte().numpy()) for w, h in ((640, 480), (500, 375))]


def measure(who: str, folder: Path, max_new_tokens: int, threads: int) -> dict:
    """One contender in this process: load, then caption both images greedily."""
    import torch
    from common import peak_rss_bytes, reset_peak_rss, rss_bytes

    torch.set_num_threads(threads)
    images = _images()
    start_rss = rss_bytes()
    reset_peak_rss()
    t0 = time.perf_counter()
    if who == "blip2lab":
        import blip2lab

        pipe = blip2lab.load(folder, dtype="bfloat16")
        load_s = time.perf_counter() - t0
        proc = pipe.processor
        with torch.no_grad():
            t1 = time.perf_counter()
            image = pipe.model.encode_image(proc.images(images).to(torch.bfloat16))
            batch = proc.generation_batch(["a photo of"] * 2)
            from blip2lab.pipeline import decoding_config

            tokens = pipe.model.generate_text(image, batch["llm_ids"], batch["llm_mask"],
                                              decoding_config({"strategy": "greedy"}, max_new_tokens=max_new_tokens),
                                              eos_token_id=proc.llm_stop_token_ids, pad_token_id=proc.llm_pad_token_id)
            caption_s = time.perf_counter() - t1
        rows = [[t for t in row if t != proc.llm_pad_token_id] for row in tokens.tolist()]
    else:
        from transformers import Blip2ForConditionalGeneration, Blip2Processor, BlipImageProcessorPil

        model = Blip2ForConditionalGeneration.from_pretrained(str(folder), dtype=torch.bfloat16).eval()
        load_s = time.perf_counter() - t0
        proc = Blip2Processor.from_pretrained(str(folder))
        proc.image_processor = BlipImageProcessorPil.from_pretrained(str(folder))  # PIL resize, as blip2lab / LAVIS
        with torch.no_grad():
            t1 = time.perf_counter()
            inputs = proc(images=images, text=["a photo of"] * 2, return_tensors="pt")
            inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
            out = model.generate(**inputs, do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
                                 eos_token_id=[50118, 2], pad_token_id=1)
            caption_s = time.perf_counter() - t1
        rows = [[t for t in row if t != 1] for row in out[:, inputs["input_ids"].shape[1]:].tolist()]
    return {"who": who, "load_s": round(load_s, 2), "caption_2_images_s": round(caption_s, 2),
            "peak_rss_gb": round((peak_rss_bytes() - start_rss) / 1e9, 2), "tokens": rows}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--folder", default=str(ROOT / "runs" / "benchmarks" / "blip2-opt-2.7b-random"))
    p.add_argument("--max-new-tokens", type=int, default=20)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--json", default=None)
    p.add_argument("--one", choices=["blip2lab", "transformers"], help=argparse.SUPPRESS)  # a child process
    args = p.parse_args(argv)
    folder = Path(args.folder)
    if args.one:
        print(json.dumps(measure(args.one, folder, args.max_new_tokens, args.threads)))
        return {}
    if not (folder / "model.safetensors.index.json").is_file():
        t0 = time.perf_counter()
        build(folder)
        print(f"built {folder} in {time.perf_counter() - t0:.0f} s", flush=True)
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    results = {}
    for who in ("blip2lab", "transformers"):
        out = subprocess.run([sys.executable, __file__, "--one", who, "--folder", str(folder), "--threads",
                              str(args.threads), "--max-new-tokens", str(args.max_new_tokens)],
                             check=True, capture_output=True, text=True)
        results[who] = json.loads(out.stdout.strip().splitlines()[-1])
    ours, theirs = results["blip2lab"], results["transformers"]
    report = {"checkpoint_gb": round(size / 1e9, 2), "threads": args.threads,
              "tokens_identical": ours["tokens"] == theirs["tokens"],
              "load_ratio": round(theirs["load_s"] / ours["load_s"], 2),
              "caption_ratio": round(theirs["caption_2_images_s"] / ours["caption_2_images_s"], 2),
              "blip2lab": ours, "transformers": theirs}
    print(f"checkpoint {report['checkpoint_gb']} GB (bf16), {args.threads} threads")
    for r in (ours, theirs):
        print(f"  {r['who']:>12}: load {r['load_s']:6.1f} s, peak RSS +{r['peak_rss_gb']:5.2f} GB, "
              f"2 captions {r['caption_2_images_s']:5.1f} s")
    print(f"  tokens identical: {report['tokens_identical']}; load {report['load_ratio']}x, "
          f"caption {report['caption_ratio']}x (transformers / blip2lab)")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
