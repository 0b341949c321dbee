"""`blip2lab` on the command line: captions, answers and match scores for image files.

    blip2lab caption IMAGE [IMAGE ...] [--model NAME_OR_PATH]
    blip2lab vqa IMAGE QUESTION [--model NAME_OR_PATH]
    blip2lab match IMAGE TEXT [--model NAME_OR_PATH] [--retrieval NAME_OR_PATH]

--model defaults to $BLIP2LAB_MODEL, else the shipped shapes model. Decoding options:
--beams, --max-new-tokens, --min-new-tokens, --sample (nucleus sampling, top-p 0.9).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

DEFAULT_MODEL = "shapes-opt"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="blip2lab", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", default=os.environ.get("BLIP2LAB_MODEL", DEFAULT_MODEL),
                       help="shipped model name, blip2lab folder, or official checkpoint folder / hub id")
        p.add_argument("--device", default="cpu")

    def decoding(p: argparse.ArgumentParser) -> None:
        p.add_argument("--beams", type=int, help="beam width (1 = greedy)")
        p.add_argument("--max-new-tokens", type=int)
        p.add_argument("--min-new-tokens", type=int)
        p.add_argument("--sample", action="store_true", help="nucleus sampling (top-p 0.9) instead of beams")

    p = sub.add_parser("caption", help="caption images")
    p.add_argument("images", nargs="+")
    common(p), decoding(p)
    p = sub.add_parser("vqa", help="answer a question about an image")
    p.add_argument("image")
    p.add_argument("question")
    common(p), decoding(p)
    p = sub.add_parser("match", help="ITM probability, ITM logit and ITC cosine of an image and a text")
    p.add_argument("image")
    p.add_argument("text")
    p.add_argument("--retrieval", help="a checkpoint with ITC/ITM heads, when --model has none")
    common(p)
    return parser


def _decoding(args: argparse.Namespace) -> dict:
    out = {}
    if args.beams is not None:
        out["num_beams"] = args.beams
    if args.max_new_tokens is not None:
        out["max_new_tokens"] = args.max_new_tokens
    if args.min_new_tokens is not None:
        out["min_new_tokens"] = args.min_new_tokens
    if args.sample:
        out["use_nucleus_sampling"] = True
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    from .pipeline import load

    try:
        pipe = load(args.model, retrieval=getattr(args, "retrieval", None), device=args.device)
        if args.command == "caption":
            for path, text in zip(args.images, pipe.caption(args.images, **_decoding(args))):
                print(f"{path}\t{text}")
        elif args.command == "vqa":
            print(pipe.answer(args.image, args.question, **_decoding(args))[0])
        else:
            scores = pipe.match(args.image, args.text)
            print(json.dumps({k: round(float(v[0]), 6) for k, v in scores.items()}))
    except (ValueError, FileNotFoundError, TypeError) as err:
        print(f"blip2lab: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
