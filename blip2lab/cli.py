"""`blip2lab` on the command line: captions, answers and match scores for image files.

    blip2lab caption IMAGE [IMAGE ...] [--model NAME_OR_PATH]
    blip2lab vqa IMAGE QUESTION [--model NAME_OR_PATH]
    blip2lab match IMAGE TEXT [--model NAME_OR_PATH] [--retrieval NAME_OR_PATH]
    blip2lab shapes build [--preset default|shipped|quick|tiny] [--out runs/shapes] [--seed 0] [--jobs 2]
    blip2lab shapes pretrain-vision | pretrain-lm [--which opt,t5,bert]
    blip2lab shapes train stage1|stage2 [--llm opt|t5] [--stage1 DIR] [--preset ...]
    blip2lab shapes eval caption|vqa|retrieval --model DIR [--preset ...]
    blip2lab minireal build [--preset default|tiny] [--out runs/minireal] [--seed 0]
    blip2lab minireal train stage1|stage2 [--stage1 DIR] [--resume] [--preset ...]
    blip2lab minireal eval [--model DIR] [--preset ...]
    blip2lab train stage1|stage2|finetune --data PATH [--images DIR] --out DIR [--from MODEL] [--steps N]
                   [--lr X] [--batch-size B] [--lora] [--config FILE] [--set key=value ...] [--plan] [--resume]
    blip2lab capfilt --model M --data PATH [--images DIR] --out FILE [--samples 3] [--threshold 0.5]
    blip2lab export-hf --model DIR --out HF_DIR [--adapter]
    accelerate launch -m blip2lab train ...    (the same command on several GPUs or machines)
    blip2lab eval caption --annotations FILE --images DIR --out DIR [--model ...]   (docs/evaluation.md)
    blip2lab eval vqa --questions FILE [--annotations FILE] --images DIR --out DIR
    blip2lab eval retrieval --annotations FILE --images DIR --out DIR [--k-test 128]
    blip2lab eval zeroshot [--annotations FILE] --images DIR --out DIR [--template "a photo of a {}."]

--model defaults to $BLIP2LAB_MODEL, else the shipped shapes model. Decoding options take
transformers' generate names: --num-beams (--beams), --max-new-tokens, --min-new-tokens,
--do-sample, --top-p, --top-k, --temperature, --repetition-penalty, --length-penalty,
--no-repeat-ngram-size; --sample is LAVIS's nucleus sampling (top-p 0.9).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
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

    p = sub.add_parser("caption", help="caption images")
    p.add_argument("images", nargs="+")
    common(p), decoding_flags(p)
    p = sub.add_parser("vqa", help="answer a question about an image")
    p.add_argument("image")
    p.add_argument("question")
    common(p), decoding_flags(p)
    p = sub.add_parser("match", help="ITM probability, ITM logit and ITC cosine of an image and a text")
    p.add_argument("image")
    p.add_argument("text")
    p.add_argument("--retrieval", help="a checkpoint with ITC/ITM heads, when --model has none")
    common(p)
    _shapes_parser(sub)
    _minireal_parser(sub)
    _eval_parser(sub)
    _train_parser(sub)
    return parser


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="train or fine-tune on your data (docs/training.md)")
    p.add_argument("stage", choices=["stage1", "stage2", "finetune"])
    p.add_argument("--data", help="caption file (COCO / LAVIS JSON, CSV, JSONL), image folder with captions.csv, "
                                  "VQA JSON, saved `datasets` folder or webdataset shards")
    p.add_argument("--images", help="image root of the caption file's relative paths (default: its folder)")
    p.add_argument("--out", help="where the trained model, its logs and checkpoints go")
    p.add_argument("--from", dest="source", help="start from: a shipped name, blip2lab folder, HF folder / hub id, "
                                                 "LAVIS .pth (default: build model.build)")
    p.add_argument("--steps", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lora", action="store_true", help="LoRA adapters only (finetune.mode=lora)")
    p.add_argument("--config", help="a JSON file of (part of) the run's TrainRunConfig")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override any config field")
    p.add_argument("--plan", action="store_true", help="print trainable parameters and memory per GPU; train nothing")
    p.add_argument("--resume", action="store_true", help="continue from OUT/train/checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p = sub.add_parser("capfilt", help="BLIP's CapFilt: synthetic captions + ITM filter -> a new caption file")
    p.add_argument("--model", required=True, help="the captioner (and filter, unless --filter)")
    p.add_argument("--filter", help="a model with ITM heads to filter with (default: --model)")
    p.add_argument("--data", required=True)
    p.add_argument("--images")
    p.add_argument("--out", required=True, help="the new caption file (.json LAVIS list, .csv or .jsonl)")
    p.add_argument("--samples", type=int, default=3, help="synthetic captions per image (nucleus sampling)")
    p.add_argument("--threshold", type=float, default=0.5, help="ITM match probability a caption must reach")
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p = sub.add_parser("export-hf", help="a trained blip2lab folder as a Hugging Face BLIP-2 folder")
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--adapter", action="store_true",
                   help="keep the LoRA adapter as a peft adapter (OUT/adapter) beside unmerged base weights")


def _train_overrides(args: argparse.Namespace) -> list[str]:
    """The command's flags as config overrides (before --set, which wins)."""
    flags = {"data.path": args.data, "data.images": args.images, "out": args.out, "model.source": args.source,
             "train.max_steps": args.steps, "train.lr": args.lr, "train.batch_size": args.batch_size}
    out = [f"{k}={v}" for k, v in flags.items() if v is not None]
    if args.lora:
        out.append("finetune.mode=lora")
    if args.quiet:
        out.append("progress=false")
    return out + list(args.set)


def _train(args: argparse.Namespace) -> None:
    from blip2lab.training import run as training

    cfg = training.resolve(args.stage, args.config, tuple(_train_overrides(args)))
    if args.plan:
        from blip2lab.training.plan import estimate, format_plan

        print(format_plan(estimate(cfg)))
        return
    summary = training.run(cfg, resume=args.resume)
    print(json.dumps({k: v for k, v in summary.items() if k != "history"}, indent=2, default=str))


def _capfilt(args: argparse.Namespace) -> None:
    from blip2lab.training.capfilt import CapFiltConfig, capfilt

    cfg = CapFiltConfig(samples=args.samples, threshold=args.threshold, top_p=args.top_p,
                        batch_size=args.batch_size, seed=args.seed)
    report = capfilt(args.model, args.data, args.out, images=args.images, filter_model=args.filter, cfg=cfg,
                     device=args.device)
    print(json.dumps(report, indent=2))


def _export_hf(args: argparse.Namespace) -> None:
    from blip2lab.training.export import export_trained

    print(export_trained(args.model, args.out, adapter=args.adapter))


def _shapes_parser(sub) -> None:
    shapes = sub.add_parser("shapes", help="the shapes world: pretrain backbones, train, evaluate")
    steps = shapes.add_subparsers(dest="shapes_command", required=True)

    def preset(p: argparse.ArgumentParser) -> None:
        p.add_argument("--preset", default="default",
                       help="tiny (about a minute), quick (about 9 minutes on 2 cores, in bf16 where the CPU has it), "
                            "default, or shipped (the shipped models' recipe, about 90 min)")
        p.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="override preset fields")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--quiet", action="store_true", help="no progress bars")

    def backbones(p: argparse.ArgumentParser) -> None:
        p.add_argument("--backbones", default=None, metavar="DIR",
                       help="frozen backbones to build on: a folder with vit/ opt/ t5/ bert/ (default: models/backbones)")

    p = steps.add_parser("build", help="stage 1, stage 2 on OPT and T5, evaluation")
    p.add_argument("--out", default="runs/shapes")
    p.add_argument("--jobs", type=int, default=2,
                   help="processes for the two stage-2 runs, splitting torch's threads (1: one after the other)")
    preset(p)
    backbones(p)
    p = steps.add_parser("pretrain-vision", help="pretrain the frozen ViT (models/backbones/vit)")
    p.add_argument("--out", default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p = steps.add_parser("pretrain-lm", help="pretrain the frozen text backbones (models/backbones/{opt,t5,bert})")
    p.add_argument("--which", default="opt,t5,bert")
    p.add_argument("--out", default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p = steps.add_parser("train", help="one stage")
    p.add_argument("stage", choices=["stage1", "stage2"])
    p.add_argument("--llm", choices=["opt", "t5"], default="opt")
    p.add_argument("--stage1", help="stage 2: the stage-1 folder to start from (omit: no representation "
                                    "learning); stage 1: a stage-1 folder to continue (omit: from BERT)")
    p.add_argument("--out", default=None)
    preset(p)
    backbones(p)
    p = steps.add_parser("eval", help="evaluate a shapes model")
    p.add_argument("task", choices=["caption", "vqa", "retrieval", "all"])
    p.add_argument("--model", required=True)
    preset(p)


def _shapes(args: argparse.Namespace) -> None:
    from blip2lab.worlds.shapes import recipe

    cmd = args.shapes_command
    if cmd == "pretrain-vision":
        from blip2lab.worlds.shapes import vision_backbone as vision

        out = args.out or str(recipe.BACKBONES / "vit")
        kwargs = {"seed": args.seed} | ({"steps": args.steps} if args.steps else {})
        print(json.dumps(vision.pretrain_vision(out, **kwargs), indent=2))
        return
    if cmd == "pretrain-lm":
        from blip2lab.worlds.shapes import text_backbones as text

        for which in args.which.split(","):
            out = args.out or str(recipe.BACKBONES / which)
            kwargs = {"seed": args.seed} | ({"steps": args.steps} if args.steps else {})
            print(which, json.dumps(getattr(text, f"pretrain_{which}")(out, **kwargs), indent=2))
        return
    preset = recipe.preset_with(args.preset, args.set)
    progress = not args.quiet
    backbones = Path(args.backbones) if getattr(args, "backbones", None) else recipe.BACKBONES
    if cmd == "build":
        report = recipe.build(args.out, preset, args.seed, backbones=backbones, progress=progress, jobs=args.jobs)
        print(json.dumps({k: v for k, v in report.items() if k != "preset"}, indent=2, default=str))
    elif cmd == "train" and args.stage == "stage1":
        _, timing = recipe.train_stage1(args.out or "runs/shapes/stage1", preset, args.seed, backbones=backbones,
                                        progress=progress, init=args.stage1)
        print(json.dumps(timing, indent=2))
    elif cmd == "train":
        out = args.out or f"runs/shapes/{args.llm}"
        _, timing = recipe.train_stage2(out, args.stage1, args.llm, preset, args.seed, backbones=backbones,
                                        progress=progress)
        print(json.dumps(timing, indent=2))
    else:
        from blip2lab.pipeline import load

        tasks = ("caption", "vqa", "retrieval") if args.task == "all" else (args.task,)
        print(json.dumps(recipe.evaluate(load(args.model), preset, args.seed, tasks), indent=2, default=str))


def _minireal_parser(sub) -> None:
    minireal = sub.add_parser("minireal", help="mini-real: real frozen parts from packages, trained on cliparts")
    steps = minireal.add_subparsers(dest="minireal_command", required=True)

    def preset(p: argparse.ArgumentParser) -> None:
        p.add_argument("--preset", default="default",
                       help="tiny (seconds) or default (both stages in <= 2 h on 2 cores)")
        p.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="override preset fields")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--out", default="runs/minireal", help="where features, stages, logs and the result go")
        p.add_argument("--quiet", action="store_true", help="no progress bars")
        p.add_argument("--no-meteor", action="store_true", help="skip METEOR (its JVM takes seconds to start)")

    preset(steps.add_parser("build", help="feature cache, stage 1, stage 2 on SmolLM2, evaluation"))
    p = steps.add_parser("train", help="one stage")
    p.add_argument("stage", choices=["stage1", "stage2"])
    p.add_argument("--stage1", help="stage-1 folder to start stage 2 from (default: OUT/stage1; 'none': from MiniLM)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/logs/stageN/checkpoint")
    preset(p)
    p = steps.add_parser("eval", help="evaluate a saved mini-real folder; writes its eval.json")
    p.add_argument("--model", default=None, help="the folder (default: OUT/mini-real)")
    preset(p)


def _minireal(args: argparse.Namespace, command: str) -> None:
    from blip2lab.worlds.minireal import recipe

    preset = recipe.preset_with(args.preset, args.set)
    out, progress, meteor = Path(args.out), not args.quiet, not args.no_meteor
    cmd = args.minireal_command
    if cmd == "build":
        report = recipe.build(out, preset, args.seed, progress=progress, command=command, meteor=meteor)
        print(json.dumps({k: report[k] for k in ("seed", "total_s")} | {
            n: {"timings_s": report[n]["recipe"]["timings_s"], "peak_rss_mb": report[n]["recipe"]["peak_rss_mb"]}
            for n in ("stage1", "mini-real")}, indent=2))
    elif cmd == "train" and args.stage == "stage1":
        _, record = recipe.train_stage1(out, preset, args.seed, progress=progress, resume=args.resume, command=command)
        print(json.dumps({k: record[k] for k in ("timings_s", "peak_rss_mb", "history_ends")}, indent=2))
    elif cmd == "train":
        stage1 = None if args.stage1 == "none" else Path(args.stage1 or out / "stage1")
        _, record = recipe.train_stage2(out, stage1, preset, args.seed, progress=progress, resume=args.resume,
                                        command=command)
        print(json.dumps({k: record[k] for k in ("timings_s", "peak_rss_mb", "weights_bytes", "history_ends")},
                         indent=2))
    else:
        results = recipe.evaluate_folder(args.model or out / recipe.SHIPPED_NAME, preset, out, meteor=meteor)
        print(json.dumps({k: v for k, v in results.items() if k != "slice"}, indent=2, default=str))


# transformers' generate keywords as flags (pipeline.HF_GENERATE_KEYWORDS): name -> type.
_DECODING_FLAGS = {"num_beams": int, "max_new_tokens": int, "min_new_tokens": int, "top_p": float, "top_k": int,
                   "temperature": float, "repetition_penalty": float, "length_penalty": float,
                   "no_repeat_ngram_size": int}


def decoding_flags(p: argparse.ArgumentParser) -> None:
    """--num-beams (or --beams), --max-new-tokens, ... as transformers names them; --do-sample /
    --no-do-sample; --sample is LAVIS's nucleus sampling (top-p 0.9)."""
    for name, kind in _DECODING_FLAGS.items():
        flags = [f"--{name.replace('_', '-')}"] + (["--beams"] if name == "num_beams" else [])
        p.add_argument(*flags, dest=name, type=kind, help=f"transformers' {name}")
    p.add_argument("--do-sample", action=argparse.BooleanOptionalAction, default=None,
                   help="sample as transformers does (top_k 50 unless --top-k), or not")
    p.add_argument("--sample", action="store_true", help="nucleus sampling (top-p 0.9), LAVIS's use_nucleus_sampling")
    p.add_argument("--seed", type=int, help="seed of the sampling RNG")


def _decoding(args: argparse.Namespace) -> dict:
    """The decoding flags given on the command line -> caption / answer keywords."""
    out = {name: getattr(args, name) for name in (*_DECODING_FLAGS, "do_sample", "seed")
           if getattr(args, name, None) is not None}
    if getattr(args, "sample", False):
        out["use_nucleus_sampling"] = True
    return out


def _eval_parser(sub) -> None:
    """`blip2lab eval TASK`: blip2lab.evaluation on standard files (docs/evaluation.md)."""
    ev = sub.add_parser("eval", help="evaluate any model on standard files with the paper's prompts and decoding")
    tasks = ev.add_subparsers(dest="eval_task", required=True)

    def common(p: argparse.ArgumentParser, batch_size: int) -> None:
        p.add_argument("--model", default=os.environ.get("BLIP2LAB_MODEL", DEFAULT_MODEL),
                       help="shipped model name, blip2lab folder, or official checkpoint folder / hub id")
        p.add_argument("--retrieval", help="a checkpoint with ITC/ITM heads, when --model has none")
        p.add_argument("--device", default="cpu")
        p.add_argument("--llm-dtype", default=None, help="the frozen LLM's dtype (e.g. bfloat16; 'auto')")
        p.add_argument("--images", required=True, help="the folder the annotation file's image paths start from")
        p.add_argument("--out", required=True, help="run folder: predictions, metrics, resumable state")
        p.add_argument("--batch-size", type=int, default=batch_size)
        p.add_argument("--limit", type=int, help="only the first N items (a quick check)")
        p.add_argument("--skip-bad-images", action="store_true",
                       help="leave out missing or undecodable images (counted in metrics.json) instead of stopping")
        p.add_argument("--restart", action="store_true", help="discard the results already in --out")
        p.add_argument("--quiet", action="store_true", help="no progress bars")

    p = tasks.add_parser("caption", help="COCO Karpathy test, NoCaps: BLEU-4, METEOR, ROUGE-L, CIDEr")
    p.add_argument("--annotations", required=True, help="COCO caption format, LAVIS list or Karpathy json")
    p.add_argument("--split", default="test", help="the split of a Karpathy file")
    p.add_argument("--prompt", help="captioning prompt (default: the model's, 'a photo of')")
    p.add_argument("--no-meteor", action="store_true", help="skip METEOR (its JVM takes seconds to start)")
    common(p, 16), decoding_flags(p)
    p = tasks.add_parser("vqa", help="VQAv2, OK-VQA, GQA: the official accuracy")
    p.add_argument("--questions", required=True)
    p.add_argument("--annotations", help="VQAv2 / OK-VQA annotations (GQA's questions carry their answers)")
    p.add_argument("--image-pattern", help="image file under --images (default COCO_{subset}_{image_id:012d}.jpg; "
                                           "GQA {image_id}.jpg)")
    p.add_argument("--subset", help="{subset} of the pattern (default: the questions file's data_subtype)")
    common(p, 16), decoding_flags(p)
    p = tasks.add_parser("retrieval", help="Flickr30k / COCO: ITC top-k then ITM re-rank, R@1/5/10 both ways")
    p.add_argument("--annotations", required=True, help="COCO caption format, LAVIS list or Karpathy json")
    p.add_argument("--split", default="test")
    p.add_argument("--k-test", type=int, default=128, help="candidates per query re-ranked by ITM (LAVIS: 128)")
    common(p, 64)
    p = tasks.add_parser("zeroshot", help="zero-shot classification by ITC over class prompts")
    p.add_argument("--annotations", help='{"classes": [...], "images": [{"image", "label"}]}; default: class folders')
    p.add_argument("--template", action="append", help="class prompt with {} (repeatable; default 'a photo of a {}.')")
    common(p, 32)


def _eval(args: argparse.Namespace) -> int:
    from blip2lab import evaluation
    from blip2lab.pipeline import load

    run = dict(batch_size=args.batch_size, limit=args.limit, skip_bad_images=args.skip_bad_images,
               restart=args.restart, progress=not args.quiet)
    try:
        pipe = load(args.model, retrieval=args.retrieval, device=args.device, llm_dtype=args.llm_dtype)
        if args.eval_task == "caption":
            metrics = evaluation.evaluate_captions(pipe, args.annotations, args.images, args.out, split=args.split,
                                                   prompt=args.prompt, meteor=not args.no_meteor, **run,
                                                   **_decoding(args))
        elif args.eval_task == "vqa":
            metrics = evaluation.evaluate_vqa(pipe, args.questions, args.annotations, args.images, args.out,
                                              image_pattern=args.image_pattern, subset=args.subset, **run,
                                              **_decoding(args))
        elif args.eval_task == "retrieval":
            metrics = evaluation.evaluate_retrieval(pipe, args.annotations, args.images, args.out, split=args.split,
                                                    k_test=args.k_test, **run)
        else:
            templates = tuple(args.template) if args.template else evaluation.zeroshot.DEFAULT_TEMPLATES
            metrics = evaluation.evaluate_zeroshot(pipe, args.annotations, args.images, args.out,
                                                   templates=templates, **run)
    except (ValueError, FileNotFoundError, TypeError, RuntimeError) as err:
        print(f"blip2lab eval: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in metrics.items() if k != "skipped_items"}, indent=2))
    print(f"written: {Path(args.out) / 'metrics.json'}, {Path(args.out) / 'predictions.json'}", file=sys.stderr)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "eval":
        return _eval(args)
    if args.command == "shapes":
        _shapes(args)
        return 0
    if args.command == "minireal":
        _minireal(args, " ".join(["blip2lab", *(sys.argv[1:] if argv is None else argv)]))
        return 0
    from blip2lab.config import ConfigError

    commands = {"train": _train, "capfilt": _capfilt, "export-hf": _export_hf}
    if args.command in commands:
        try:
            commands[args.command](args)
        except (ConfigError, ValueError, FileNotFoundError) as err:
            print(f"blip2lab: error: {err}", file=sys.stderr)
            return 2
        return 0
    from blip2lab.pipeline import load

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
