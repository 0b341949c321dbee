"""mini-real on the CPU: what one caption and one chat turn cost a user, end to end, and the
decoding inside them against transformers' own `generate` on the same SmolLM2, the same
visual prompt and the same text prompt, in the same run (tokens checked identical).

    python benchmarks/minireal_latency.py                   # 2 torch threads (a free CPU Space), the 9 bundled photos
    python benchmarks/minireal_latency.py --threads 1 --repeats 5 --json OUT.json
    python benchmarks/minireal_latency.py --llm-dtype float32   # the LLM as evaluated (default: as the app runs it)

Prints, over the bundled photos (scikit-image, scikit-learn, matplotlib):
* caption: `pipe.caption(photo)` with the paper's defaults (beam 5, <= 30 new tokens);
* chat turn: `pipe.answer(photo, question)`, the chat tab's defaults (SmolLM2's chat
  template, beam 5, <= 10 new tokens, length penalty -1);
  each as median and 90th percentile of the wall clock, and how it splits into the image
  side (resize, EfficientNet-lite0, Q-Former) and decoding;
* decoding alone, exactly N new tokens (EOS forbidden until then, so both do the same work),
  beam 5 and greedy: blip2lab's decoder against `LlamaForCausalLM.generate(inputs_embeds=)`.
Issue 8's goal: a photo answered in under 2 s on the CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved_medians, median_p90, sample_seconds  # noqa: E402

QUESTION = "What is in the picture?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mini-real")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per photo")
    parser.add_argument("--new-tokens", type=int, default=30, help="decoding-alone comparison length")
    parser.add_argument("--llm-dtype", default="auto",
                        help='the frozen LLM\'s precision, as `blip2lab.load(llm_dtype=)`: "auto" (the app\'s '
                             'default: bf16 where the CPU runs it natively), "float32", "bfloat16"')
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import blip2lab
    from blip2lab.decoding.generation import DecodingConfig
    from blip2lab.worlds.minireal.photos import load_photos

    start = time.perf_counter()
    pipe = blip2lab.load(args.model, llm_dtype=args.llm_dtype)
    load_s = time.perf_counter() - start
    model, proc = pipe.model, pipe.processor
    photos = load_photos()
    prompt = proc.vqa_prompt(QUESTION)

    llm_dtype = str(pipe.model.llm.model.dtype).removeprefix("torch.")
    result: dict = {"model": args.model, "threads": args.threads, "llm_dtype": llm_dtype, "load_s": load_s,
                    "photos": len(photos),
                    "question": QUESTION, "chat_prompt": prompt}
    with torch.inference_mode():
        image_side, caption, chat = [], [], []
        for photo in photos.values():
            # one untimed call each first: the decoder's buffers, the allocator
            image_side += sample_seconds(lambda: model.query_outputs(pipe._image(photo)), args.repeats, warmup=1)
            caption += sample_seconds(lambda: pipe.caption(photo), args.repeats, warmup=1)
            chat += sample_seconds(lambda: pipe.answer(photo, QUESTION), args.repeats, warmup=1)
        result["image_side"] = median_p90(image_side)
        result["caption"] = median_p90(caption)
        result["chat_turn"] = median_p90(chat)
        one = next(iter(photos.values()))
        result["example"] = {"caption": pipe.caption(one)[0], "answer": pipe.answer(one, QUESTION)[0]}

        # Decoding alone: the same prefix (visual prompt + chat prompt) through both decoders.
        image = pipe._image(one)
        visual = model.llm.visual_prompt(model.query_outputs(image))  # (1, Q, D_lm)
        batch = proc.generation_batch([prompt])
        ids, mask = batch["llm_ids"], batch["llm_mask"]
        prefix = torch.cat([visual, model.llm.embed(ids)], 1)  # (1, Q + T, D_lm)
        full_mask = torch.cat([torch.ones_like(visual[..., 0], dtype=mask.dtype), mask], 1)
        L, eos, pad = args.new_tokens, proc.llm_stop_token_ids, proc.llm_pad_token_id
        result["decoding"] = []
        for strategy, beams in (("beam", 5), ("greedy", 1)):
            def ours():
                return model.llm.generate(visual, ids, mask, DecodingConfig(strategy=strategy, num_beams=beams,
                                                                            max_new_tokens=L, min_new_tokens=L),
                                          eos, pad)

            def peer():
                return model.llm.model.generate(inputs_embeds=prefix, attention_mask=full_mask, max_new_tokens=L,
                                                min_new_tokens=L, num_beams=beams, do_sample=False,
                                                eos_token_id=eos, pad_token_id=pad)

            same = ours().tolist() == peer().tolist()
            times = interleaved_medians({"transformers": peer, "blip2lab": ours}, repeats=args.repeats, warmup=1)
            row = {"strategy": strategy, "beams": beams, "new_tokens": L, "identical": same,
                   "blip2lab_s": times["blip2lab"], "transformers_s": times["transformers"],
                   "ratio": times["transformers"] / times["blip2lab"]}
            result["decoding"].append(row)

    print(f"{args.model}, LLM in {llm_dtype}, {args.threads} torch thread(s), {len(photos)} photos x {args.repeats} "
          f"calls; load {load_s:.1f} s")
    for name in ("image_side", "caption", "chat_turn"):
        r = result[name]
        print(f"  {name:10s} median {r['median_s']:.2f} s, p90 {r['p90_s']:.2f} s")
    print(f"  example: caption {result['example']['caption']!r}, answer {result['example']['answer']!r}")
    for r in result["decoding"]:
        print(f"  decoding {r['strategy']:6s} {r['new_tokens']} tokens: blip2lab {r['blip2lab_s']:.3f} s, "
              f"transformers {r['transformers_s']:.3f} s, ratio {r['ratio']:.2f}x, identical: {r['identical']}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    if not all(r["identical"] for r in result["decoding"]):
        raise SystemExit("decoded tokens differ: the comparison is void")


if __name__ == "__main__":
    main()
