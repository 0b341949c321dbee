"""Sweeps over the shapes recipe: the paper's ablations and a few it does not run.

    figure5    stage 2 with and without stage 1 (paper Figure 5): caption quality and VQA
               accuracy against stage-2 steps, per LLM family and seed
    table6     stage-1 losses (paper Table 6 and more): ITC, ITC+ITM, ITC+ITM+ITG, retrieval
               recall@1/5 both ways, ITC alone and ITM re-ranked, per seed
    queries    number of learned queries (1, 4, 8, 32): retrieval, captions, VQA
    encoders   a weaker vs the shipped frozen image encoder (an untrained tower, a briefly
               pretrained one): its linear probe, then retrieval, captions, VQA
    llm_size   a smaller vs a shipped-size frozen OPT pretrained for the same steps (and the
               shipped OPT): in-context QA before BLIP-2, then captions and VQA after stage 2

Each writes `<name>.json` (the settings, timings and every row) and `<name>.csv` (the rows)
into `out_dir` and returns the rows; the notebooks plot them and the README quotes them.

    python -m blip2lab.worlds.shapes.ablations figure5 --out notebooks/results --seeds 0,1,2 \\
        --set stage1_steps=200 stage2_steps=200

Everything is built from the same pieces as `recipes.shapes` (config, frozen backbones,
datasets, the one training loop), with two differences that only save time: the frozen
features of the training scenes are computed once per image encoder and shared by every run
of a sweep, and curves are measured during one stage-2 run (the loop's `on_step`) instead
of by separate runs of each length; and a model one sweep already trained (same preset,
seed, backbones) is reused by the next (the queries sweep's 8-query model is the encoder
sweep's shipped-tower model). Every new parameter is drawn after
`torch.manual_seed(seed)`; the evaluation scenes are the same for every seed (`eval_seed`),
so the spread across seeds is the spread of training alone.

`workers=N` runs a sweep's independent trainings (seeds, arms, settings) in N spawned
processes of one torch thread each: these models are too small for one process to use a
second core (a 128-wide matmul gains little from intra-op threads), so on a 2-core laptop two
workers take about half the time. Every job seeds itself, so the rows are the same as with
`workers=1` (checked by the tests); only the timings differ. A stage-2 job that starts from a
stage-1 model receives that model's weights (`Trained`), not the process-local run, and a job
already done in this process (same function, same arguments) is not submitted again, which
keeps the reuse above across sweeps when the trainings ran in workers.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import multiprocessing
import random
import shlex
import sys
import time
from concurrent.futures import Executor, Future, ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from blip2lab.model.blip2 import Blip2
from blip2lab.pipeline import Blip2Pipeline, load
from blip2lab.training.loop import BatchStream, train
from blip2lab.worlds.shapes import recipe as R
from blip2lab.worlds.shapes import world

__all__ = ["Run", "Trained", "train_features", "run_stage1", "stage2_model", "run_stage2", "quick_eval", "retrieval",
           "figure5", "table6", "queries", "encoders", "llm_size", "mean_sd", "write_rows", "SWEEPS"]


@dataclass
class Run:
    """One trained model of a sweep."""

    pipe: Blip2Pipeline
    history: list[dict]  # every step's logged losses
    curve: list[dict] = field(default_factory=list)  # evaluations during training
    seconds: float = 0.0  # training wall time (evaluations during training excluded)
    key: str = ""  # what was trained (preset, seed, backbones, start): runs with equal keys are reused


@dataclass(repr=False)
class Trained:
    """What a worker process sends back of a trained stage-1 run: its weights without the
    frozen image encoder (safetensors bytes: a few MB, pickled as one buffer), so that a
    stage-2 job in another process starts from exactly that Q-Former."""

    key: str
    seconds: float
    weights: bytes

    @classmethod
    def of(cls, run: Run) -> "Trained":
        from safetensors.torch import save

        state = {k: v.contiguous() for k, v in run.pipe.model.state_dict().items() if not k.startswith("image_encoder.")}
        return cls(run.key, run.seconds, save(state))

    @classmethod
    def from_folder(cls, folder: str | Path) -> "Trained":
        """A stage-1 model saved to a folder (e.g. models/shapes-stage1), as a sweep's start."""
        run = Run(load(folder), [], key=f"folder:{Path(folder).resolve()}")
        return cls.of(run)

    def state_dict(self) -> dict[str, torch.Tensor]:
        from safetensors.torch import load

        return load(self.weights)

    def __repr__(self) -> str:  # what was trained, not megabytes of weights (it keys `_submit`)
        return f"Trained({self.key})"


# ---------------------------------------------------------------------------------------
# Worker processes
# ---------------------------------------------------------------------------------------


class _Here(Executor):
    """`workers=1`: each job runs at once, in this process, through the same job functions."""

    def submit(self, fn, /, *args, **kwargs) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as e:  # the caller's .result() raises it, as a pool's would
            future.set_exception(e)
        return future


def _one_thread() -> None:
    torch.set_num_threads(1)


_RESULTS: dict[str, object] = {}  # finished jobs' results in this process, by job and arguments


def _submit(jobs: Executor, fn: Callable, *args) -> Future:
    """`jobs.submit(fn, *args)`, or the result of the same job already done in this process:
    a later sweep that needs an earlier one's training takes its result (the encoder sweep's
    shipped tower is the query sweep's 8-query model), as `run_stage1` reuses runs in one
    process. Jobs are deterministic given their arguments, whose reprs name everything
    they depend on (presets, seeds, folders, `Trained.key`)."""
    key = repr((fn.__qualname__, args))
    if key in _RESULTS:
        return _done(_RESULTS[key])
    future = jobs.submit(fn, *args)
    future.add_done_callback(lambda f: f.exception() is None and _RESULTS.setdefault(key, f.result()))
    return future


def _done(result) -> Future:
    future: Future = Future()
    future.set_result(result)
    return future


@contextmanager
def _jobs(workers: int):
    """An executor for a sweep's jobs: this process (workers <= 1), or `workers` spawned
    processes of one torch thread each (spawn, not fork: a forked copy of a process that
    already ran torch's thread pools can hang). Worker processes keep their own feature and
    run caches for as long as the sweep lasts."""
    if workers <= 1:
        yield _Here()
        return
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_one_thread) as ex:
        yield ex


# ---------------------------------------------------------------------------------------
# Training pieces
# ---------------------------------------------------------------------------------------

_FEATURES: dict[tuple, tuple[list, torch.Tensor]] = {}
_RUNS: dict[str, Run] = {}  # trained runs of this process by key: sweeps that need the same model share it


def _run_key(stage: str, preset: R.ShapesPreset, seed: int, backbones: Path, parts: Sequence[str],
             start: Optional[Run | Trained] = None) -> str:
    towers = {p: str((Path(backbones) / p).resolve()) for p in parts}
    return json.dumps([stage, asdict(preset), seed, towers, start.key if start is not None else None], sort_keys=True)


def train_features(preset: R.ShapesPreset, seed: int, backbones: Path = R.BACKBONES,
                   stage: int = 2) -> tuple[list, torch.Tensor]:
    """(training scenes of `stage`, their frozen features (n, N, D_v) fp16), computed once per
    (image encoder, n_train, seed, stage-1 siblings or not) in this process."""
    siblings = stage == 1 and preset.stage1_siblings
    key = (str(Path(backbones).resolve() / "vit"), preset.n_train, seed, siblings)
    if key not in _FEATURES:
        config = R.shapes_config(None, preset, backbones)
        model = R.build_model(config, backbones)
        scenes = R._train_scenes(preset, seed, stage)
        _FEATURES[key] = scenes, R.cache_features(model, scenes, R.processor_for(config, backbones))
    return _FEATURES[key]


def _build(kind: Optional[R.LLMKind], preset: R.ShapesPreset, seed: int, backbones: Path) -> tuple[Blip2, object]:
    config = R.shapes_config(kind, preset, backbones)
    return R.build_model(config, backbones, seed=seed), R.processor_for(config, backbones)


def _fit(model: Blip2, processor, data, stage: int, preset: R.ShapesPreset, seed: int,
         eval_at: Sequence[int], eval_fn: Optional[Callable[[Blip2Pipeline], dict]], progress: bool) -> Run:
    pipe = Blip2Pipeline(model, processor)
    model.train()
    curve: list[dict] = []
    spent = [0.0]

    def on_step(step: int, logs: dict) -> None:
        if eval_fn is not None and step + 1 in eval_at:
            t = time.perf_counter()
            model.eval()
            curve.append({"step": step + 1, **eval_fn(pipe)})
            model.train()
            spent[0] += time.perf_counter() - t

    start = time.perf_counter()
    history = train(model, data, R._train_cfg(preset, stage, seed), on_step=on_step, progress=progress)
    model.eval()
    return Run(pipe, history, curve, time.perf_counter() - start - spent[0])


def run_stage1(preset: R.ShapesPreset, seed: int = 0, backbones: Path = R.BACKBONES, progress: bool = False,
               reuse: bool = True) -> Run:
    """Stage 1 with `preset.stage1_losses` (ITC / ITM / ITG) from the BERT-initialised Q-Former.
    `reuse`: return the run already trained in this process with the same preset, seed and
    backbones (training is deterministic given them) instead of training it again."""
    key = _run_key("stage1", preset, seed, backbones, ("vit", "bert"))
    if reuse and key in _RUNS:
        return _RUNS[key]
    model, processor = _build(None, preset, seed, backbones)
    scenes, feats = train_features(preset, seed, backbones, stage=1)
    data = R.stage1_stream(feats, scenes, preset, processor, seed)
    run = _fit(model, processor, data, 1, preset, seed, (), None, progress)
    run.key = key
    _RUNS[key] = run
    return run


def stage2_model(preset: R.ShapesPreset, kind: R.LLMKind, stage1: Optional[Run | Trained], seed: int = 0,
                 backbones: Path = R.BACKBONES) -> tuple[Blip2, object]:
    """(model, processor) as stage 2 starts: the frozen LLM, a fresh LLM projection, and the
    Q-Former, ln_vision and heads of `stage1` (a run of this process or the weights another
    process sent; None: BERT's)."""
    model, processor = _build(kind, preset, seed, backbones)
    if stage1 is not None:
        state = stage1.state_dict() if isinstance(stage1, Trained) else stage1.pipe.model.state_dict()
        state = {k: v for k, v in state.items() if not k.startswith("image_encoder.")}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or any(not (k.startswith("llm.") or k.startswith("image_encoder.")) for k in missing):
            raise RuntimeError(f"stage-1 model does not fit: unexpected {unexpected}, missing {missing}")
    return model.eval(), processor


def run_stage2(preset: R.ShapesPreset, kind: R.LLMKind, stage1: Optional[Run | Trained], seed: int = 0,
               backbones: Path = R.BACKBONES, eval_at: Sequence[int] = (),
               eval_fn: Optional[Callable[[Blip2Pipeline], dict]] = None, progress: bool = False) -> Run:
    """Stage 2 on one LLM family, starting from `stage1`'s Q-Former, ln_vision and heads, or
    (None) from the BERT-initialised Q-Former: the paper's "w/o representation learning".
    A run without evaluations (`eval_fn` None) is reused as `run_stage1`'s are."""
    key = _run_key(f"stage2/{kind}", preset, seed, backbones, ("vit", "bert", kind), stage1)
    if eval_fn is None and key in _RUNS:
        return _RUNS[key]
    model, processor = stage2_model(preset, kind, stage1, seed, backbones)
    scenes, feats = train_features(preset, seed, backbones)
    prefix_lm = preset.stage2_prefix_lm if kind == "t5" else 0.0
    data = BatchStream(R.Stage2Data(feats, scenes, preset.stage2_vqa_fraction, seed, prefix_lm,
                                    preset.stage2_paraphrases), preset.stage2_batch,
                       R.stage2_collate(processor, model.config.qformer_question), seed=seed)
    run = _fit(model, processor, data, 2, preset, seed, eval_at, eval_fn, progress)
    run.key = key
    if eval_fn is None:
        _RUNS[key] = run
    return run


# ---------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------


def quick_eval(n_eval: int, eval_seed: int = 0, novel: bool = False, batch: int = 64) -> Callable[[Blip2Pipeline], dict]:
    """Greedy captions and VQA on `n_eval` test scenes (seen combinations, or novel ones), the
    protocol of `recipes.shapes.eval_captions` / `eval_vqa`:
    - caption_f1, caption_exact: object-level F1 (all five attributes right) and exact scenes;
    - caption_attr_f1: the mean over size / colour / shape / row / column of the F1 of the
      values the captions mention (a caption can name the right colours in the wrong places);
    - vqa: accuracy of the answers as generated (official normalisation);
    - vqa_cut: the same with each answer cut at its first "." (greedy decoding is causal, so
      this is the answer a decoder stopped at "." would give: the in-context QA protocol of
      `backbones.text`; an OPT early in stage 2 goes on "red. Question: ...")."""
    from blip2lab.evaluate import object_f1, vqa_accuracy

    scenes = world.make_split("test", n_eval, eval_seed, novel=novel)
    images = [world.render(s) for s in scenes]
    items = [(i, q, a, t) for i, s in enumerate(scenes) for q, a, t in world.questions(s, random.Random(i))]

    def measure(pipe: Blip2Pipeline) -> dict:
        caps = [c for k in range(0, len(images), batch) for c in pipe.caption(images[k:k + batch], num_beams=1)]
        full = object_f1([world.parse_caption(c) for c in caps], [s.tuples() for s in scenes])
        partial = [world.parse_objects_partial(c) for c in caps]
        attr = []
        for j, name in enumerate(("size", "color", "shape", "row", "column")):
            attr.append(object_f1([[o[name] for o in objs if o[name] is not None] for objs in partial],
                                  [[t[j] for t in s.tuples()] for s in scenes])["f1"])
        answers = []
        for k in range(0, len(items), batch):
            chunk = items[k:k + batch]
            answers += pipe.answer([images[i] for i, *_ in chunk], [q for _, q, _, _ in chunk], num_beams=1)
        refs, types = [[a] for *_, a, _ in items], [t for *_, t in items]
        vqa = vqa_accuracy(answers, refs, types)
        return {"caption_f1": full["f1"], "caption_exact": full["exact_match"],
                "caption_attr_f1": sum(attr) / len(attr), "vqa": vqa["accuracy"],
                **{k.replace("accuracy/", "vqa/"): v for k, v in vqa.items() if k.startswith("accuracy/")},
                "vqa_cut": vqa_accuracy([a.split(".")[0] for a in answers], refs, types)["accuracy"]}

    return measure


def retrieval(pipe: Blip2Pipeline, gallery: int, k_test: int, eval_seed: int = 0) -> dict:
    """Recall@1/5/10 both ways on a gallery of test scenes with distinct captions, ITC alone
    ("itc/...") and ITM re-ranked ("itm/..."); "txt_r1" = image -> text, "img_r1" = text -> image."""
    return R.eval_retrieval(pipe, world.make_gallery("test", gallery, eval_seed), k_test)


def hard_retrieval(pipe: Blip2Pipeline, gallery: int, k_test: int, eval_seed: int = 0) -> dict:
    """Recall on a gallery where R@1 is not near 1: `gallery // 2` test scenes and, beside each,
    its sibling with one fact changed (analysis.altered_scene: a shape, colour, size or cell),
    captions all distinct; keys as `retrieval`'s."""
    from .analysis import altered_scene

    scenes = world.make_gallery("test", gallery // 2, eval_seed)
    rng = random.Random(eval_seed)
    pairs, seen = [], {world.caption(s) for s in scenes}
    for s in scenes:
        sibling = altered_scene(s, rng)
        if world.caption(sibling) not in seen:
            seen.add(world.caption(sibling))
            pairs += [s, sibling]
    return R.eval_retrieval(pipe, pairs, k_test)


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    v = [float(x) for x in values]
    m = sum(v) / len(v)
    return m, (math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0)


def write_rows(out_dir: str | Path, name: str, rows: list[dict], meta: dict) -> Path:
    """`<name>.csv` (rows; columns = union of keys, in first-seen order) and `<name>.json`
    (meta + rows) in out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with open(out / f"{name}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, columns)
        w.writeheader()
        w.writerows(rows)
    (out / f"{name}.json").write_text(json.dumps({**meta, "rows": rows}, indent=1, default=str) + "\n")
    return out / f"{name}.json"


_COMMAND: list[Optional[str]] = [None]  # the command line of a sweep run by `main`, recorded in its results


def _meta(name: str, preset: R.ShapesPreset, start: float, workers: int, **extra) -> dict:
    return {"sweep": name, "command": _COMMAND[0] or "called from Python", "preset": asdict(preset),
            "seconds": round(time.perf_counter() - start, 1),
            "threads": 1 if workers > 1 else torch.get_num_threads(), "workers": max(1, workers),
            "torch": torch.__version__, **extra}


def _log(verbose: bool, *parts) -> None:
    if verbose:
        print(*parts, flush=True)


# ---------------------------------------------------------------------------------------
# The sweeps
# ---------------------------------------------------------------------------------------
# Each sweep submits one job per independent training to `_jobs(workers)`; a job is a plain
# module-level function (a spawned worker imports it) that returns rows, or a stage 1's
# weights (`Trained`), never a model.


def _stage1_job(preset: R.ShapesPreset, seed: int, backbones: Path) -> Trained:
    return Trained.of(run_stage1(preset, seed, backbones))


def _figure5_job(preset: R.ShapesPreset, kind: R.LLMKind, stage1: Optional[Trained], seed: int,
                 eval_at: Sequence[int], n_eval: int, eval_seed: int) -> tuple[list[dict], float]:
    """One stage-2 curve of Figure 5: (rows at the `eval_at` steps, training seconds)."""
    run = run_stage2(preset, kind, stage1, seed, eval_at=eval_at, eval_fn=quick_eval(n_eval, eval_seed))
    lm = [h["lm_loss"] for h in run.history]
    rows = []
    for point in run.curve:
        window = lm[max(0, point["step"] - 10):point["step"]]
        rows.append({"seed": seed, "llm": kind, "stage1": stage1 is not None, **point,
                     "lm_loss": sum(window) / len(window)})
    return rows, run.seconds


def figure5(out_dir: str | Path, preset: R.ShapesPreset, seeds: Sequence[int] = (0, 1, 2),
            kinds: Sequence[R.LLMKind] = ("opt", "t5"), eval_at: Optional[Sequence[int]] = None,
            n_eval: Optional[int] = None, eval_seed: int = 0, workers: int = 1, verbose: bool = True,
            stage1_from: Optional[str | Path] = None) -> list[dict]:
    """The paper's Figure 5: for each seed, stage 1 once, then stage 2 on each LLM family
    from the stage-1 Q-Former and from the BERT-initialised one, the same stage-2 steps;
    caption object-F1 and VQA accuracy on seen test scenes at the `eval_at` stage-2 steps
    (default: quarters of preset.stage2_steps). Rows: seed, llm, stage1, step, metrics.
    With workers > 1 a seed's four stage-2 runs start as soon as its stage 1 is done.
    `stage1_from`: a stage-1 folder (models/shapes-stage1) every seed starts from instead
    of a stage 1 of its own (the seed then varies stage 2 only)."""
    start = time.perf_counter()
    eval_at = list(eval_at or [max(1, round(preset.stage2_steps * f)) for f in (0.25, 0.5, 0.75, 1.0)])
    n_eval = n_eval or preset.n_eval
    arms = [(kind, with_stage1) for kind in kinds for with_stage1 in (True, False)]
    curves: dict[tuple, Future] = {}
    stage1_s: dict[int, float] = {}
    with _jobs(workers) as jobs:
        if stage1_from is None:
            firsts = {_submit(jobs, _stage1_job, preset, seed, R.BACKBONES): seed for seed in seeds}
        else:
            start_from = Trained.from_folder(stage1_from)
            firsts = {_done(start_from): seed for seed in seeds}
        for done in as_completed(firsts):
            seed, s1 = firsts[done], done.result()
            stage1_s[seed] = round(s1.seconds, 1)
            _log(verbose, f"seed {seed}: stage 1 in {s1.seconds:.0f} s")
            for kind, with_stage1 in arms:
                curves[seed, kind, with_stage1] = _submit(jobs, _figure5_job, preset, kind, s1 if with_stage1 else None,
                                                           seed, eval_at, n_eval, eval_seed)
        rows, timings = [], []
        for seed in seeds:  # rows in the order of a run on one process, whatever finished first
            timings.append({"seed": seed, "stage1_s": stage1_s[seed]})
            for kind, with_stage1 in arms:
                curve, seconds = curves[seed, kind, with_stage1].result()
                rows += curve
                timings.append({"seed": seed, "llm": kind, "stage1": with_stage1, "stage2_s": round(seconds, 1)})
                _log(verbose, f"seed {seed} {kind} stage1={with_stage1}: {curve[-1]} ({seconds:.0f} s)")
    write_rows(out_dir, "figure5", rows, _meta("figure5", preset, start, workers, seeds=list(seeds), kinds=list(kinds),
                                               eval_at=eval_at, n_eval=n_eval, eval_seed=eval_seed, timings=timings))
    return rows


LOSS_SETS = {"ITC": ("itc",), "ITC+ITM": ("itc", "itm"), "ITC+ITM+ITG": ("itc", "itm", "itg")}


def _table6_row(name: str, run: Run, preset: R.ShapesPreset, seed: int, eval_seed: int, hard: bool) -> dict:
    rec = retrieval(run.pipe, preset.gallery, preset.k_test, eval_seed)
    if hard:
        rec |= {f"hard/{k}": v for k, v in hard_retrieval(run.pipe, preset.gallery, preset.k_test, eval_seed).items()}
    last = run.history[-20:]
    final = {f"final_{k}": sum(h[k] for h in last) / len(last) for k in last[0] if k.endswith("_loss")}
    return {"losses": name, "seed": seed, **rec, **final, "train_s": round(run.seconds, 1)}


def _table6_job(name: str, preset: R.ShapesPreset, seed: int, eval_seed: int, hard: bool = False) -> dict:
    return _table6_row(name, run_stage1(preset, seed), preset, seed, eval_seed, hard)


def _stage1_and_row_job(name: str, preset: R.ShapesPreset, seed: int, eval_seed: int) -> tuple[dict, Trained]:
    """A Table 6 row (hard gallery included) and the trained weights, for stage 2 to start from."""
    run = run_stage1(preset, seed)
    return _table6_row(name, run, preset, seed, eval_seed, hard=True), Trained.of(run)


def table6(out_dir: str | Path, preset: R.ShapesPreset, seeds: Sequence[int] = (0, 1, 2),
           loss_sets: Optional[dict[str, tuple[str, ...]]] = None, eval_seed: int = 0, workers: int = 1,
           verbose: bool = True) -> list[dict]:
    """The paper's Table 6 (and ITC alone): stage 1 with each loss set and seed, then
    retrieval recall on a gallery of `preset.gallery` test scenes, by ITC alone and ITM
    re-ranked (the ITM re-ranking of an ITC-only model uses its untrained ITM head: shown,
    but not meaningful). Rows: losses, seed, every recall."""
    start = time.perf_counter()
    loss_sets = loss_sets or LOSS_SETS
    with _jobs(workers) as jobs:
        futures = [_submit(jobs, _table6_job, name, replace(preset, stage1_losses=tuple(losses)), seed, eval_seed)
                   for name, losses in loss_sets.items() for seed in seeds]
        rows = [f.result() for f in futures]
    for r in rows:
        _log(verbose, f"{r['losses']} seed {r['seed']}: itc R@1 i2t {r['itc/txt_r1']:.3f} t2i {r['itc/img_r1']:.3f}, "
                      f"itm R@1 i2t {r['itm/txt_r1']:.3f} t2i {r['itm/img_r1']:.3f} ({r['train_s']:.0f} s)")
    write_rows(out_dir, "table6", rows, _meta("table6", preset, start, workers, seeds=list(seeds), eval_seed=eval_seed,
                                              loss_sets={k: list(v) for k, v in loss_sets.items()}))
    return rows


def _full_eval(pipe: Blip2Pipeline, preset: R.ShapesPreset, n_eval: int, eval_seed: int) -> dict:
    seen, novel = quick_eval(n_eval, eval_seed)(pipe), quick_eval(n_eval, eval_seed, novel=True)(pipe)
    rec = retrieval(pipe, preset.gallery, preset.k_test, eval_seed)
    return {**{f"{k}/seen": v for k, v in seen.items()}, **{f"{k}/novel": v for k, v in novel.items()},
            **{k: rec[k] for k in ("itc/txt_r1", "itc/img_r1", "itm/txt_r1", "itm/img_r1")}}


def _both_stages_job(preset: R.ShapesPreset, kind: R.LLMKind, seed: int, n_eval: int, eval_seed: int,
                     backbones: Path) -> dict:
    """Stage 1 then stage 2 (`kind`) on `backbones`, evaluated by `_full_eval`."""
    s1 = run_stage1(preset, seed, backbones)
    s2 = run_stage2(preset, kind, s1, seed, backbones)
    return {**_full_eval(s2.pipe, preset, n_eval, eval_seed),
            "trainable_params": sum(x.numel() for x in s2.pipe.model.parameters() if x.requires_grad),
            "stage1_s": round(s1.seconds, 1), "stage2_s": round(s2.seconds, 1)}


def queries(out_dir: str | Path, preset: R.ShapesPreset, counts: Sequence[int] = (1, 4, 8, 32), seed: int = 0,
            kind: R.LLMKind = "opt", n_eval: Optional[int] = None, eval_seed: int = 0, workers: int = 1,
            verbose: bool = True) -> list[dict]:
    """Number of learned queries: stage 1 and stage 2 (`kind`) per count; retrieval recall,
    captions and VQA on seen and novel scenes. The paper fixes 32 (Sec. 3.1)."""
    start = time.perf_counter()
    with _jobs(workers) as jobs:
        futures = {q: _submit(jobs, _both_stages_job, replace(preset, num_queries=q), kind, seed,
                              n_eval or preset.n_eval, eval_seed, R.BACKBONES)
                   for q in sorted(counts, reverse=True)}  # the longest first
        rows = [{"num_queries": q, **futures[q].result()} for q in counts]
    for row in rows:
        _log(verbose, row)
    write_rows(out_dir, "queries", rows, _meta("queries", preset, start, workers, seed=seed, llm=kind,
                                               eval_seed=eval_seed))
    return rows


def _backbones_with(work: Path, name: str, **replacements: Path) -> Path:
    """A backbones folder like the shipped one with some towers replaced (symlinks)."""
    folder = work / name
    folder.mkdir(parents=True, exist_ok=True)
    for part in ("vit", "bert", "opt", "t5"):
        link, target = folder / part, Path(replacements.get(part, R.BACKBONES / part)).resolve()
        if link.is_symlink() or link.exists():
            if link.resolve() == target:
                continue
            link.unlink()
        link.symlink_to(target, target_is_directory=True)
    return folder


def _probe_job(vit: Path, seed: int, probe_scenes: tuple[int, int]) -> dict:
    from blip2lab.worlds.shapes import vision_backbone as V

    probe = V.linear_probe(V.load_shapes_vision(vit), n_train=probe_scenes[0], n_test=probe_scenes[1], seed=seed)
    return {f"probe_{k}": probe["seen"][k] for k in ("shape", "color", "size", "object")}


def encoders(out_dir: str | Path, preset: R.ShapesPreset, work_dir: str | Path, pretrain_steps: Sequence[int] = (0, 60),
             seed: int = 0, kind: R.LLMKind = "opt", n_eval: Optional[int] = None, eval_seed: int = 0,
             probe_scenes: tuple[int, int] = (1000, 300), workers: int = 1, verbose: bool = True) -> list[dict]:
    """A weaker frozen image encoder: the shipped tower (600 steps of scene parsing) against
    the same tower pretrained for each of `pretrain_steps` (0 = untrained, random weights),
    each gated by the linear probe, then stage 1 + stage 2 on top. Towers go to work_dir."""
    from blip2lab.worlds.shapes import vision_backbone as V

    start = time.perf_counter()
    work = Path(work_dir)
    towers: list[tuple[str, Path]] = []
    for steps in pretrain_steps:  # short pretrainings, here: the jobs below need them all
        folder = work / f"vit-{steps}-seed{seed}"
        if not (folder / "model.safetensors").is_file():
            if steps == 0:
                torch.manual_seed(seed)
                V.save_tower(V.build_tower(), folder)
            else:
                V.pretrain_vision(folder, steps=steps, seed=seed, probe=False, log_every=10**9)
        towers.append((f"{steps} steps", folder))
    towers.append(("600 steps (shipped)", R.BACKBONES / "vit"))
    with _jobs(workers) as jobs:
        futures = []
        for label, vit in towers:
            backbones = R.BACKBONES if vit == R.BACKBONES / "vit" else _backbones_with(work, f"backbones-{vit.name}",
                                                                                       vit=vit)
            futures.append((label, _submit(jobs, _probe_job, vit, seed, probe_scenes),
                            _submit(jobs, _both_stages_job, preset, kind, seed, n_eval or preset.n_eval, eval_seed,
                                    backbones)))
        rows = [{"encoder": label, **probe.result(), **trained.result()} for label, probe, trained in futures]
    for row in rows:
        _log(verbose, row)
    write_rows(out_dir, "encoders", rows, _meta("encoders", preset, start, workers, seed=seed, llm=kind,
                                                eval_seed=eval_seed, pretrain_steps=list(pretrain_steps)))
    return rows


SMALL_OPT = {"hidden_size": 64, "word_embed_proj_dim": 64, "ffn_dim": 256, "num_hidden_layers": 2,
             "num_attention_heads": 4}


def _pretrain_opt_job(folder: Path, steps: int, seed: int, overrides: Optional[dict], extra: dict) -> None:
    from blip2lab.worlds.shapes import text_backbones as T

    T.pretrain_opt(folder, steps=steps, seed=seed, model_overrides=overrides or None, final_eval=False, **extra)


def _llm_job(label: str, folder: Path, steps: int, backbones: Path, preset: R.ShapesPreset, stage1: Trained,
             seed: int, n_eval: int, eval_seed: int, qa_scenes: int) -> dict:
    """In-context QA of one frozen OPT from text alone, then stage 2 on it from `stage1`."""
    from blip2lab.worlds.shapes import text_backbones as T

    lm, tok, _ = T.load_text_backbone(folder)
    qa = T.in_context_qa_accuracy(lm, tok, world.make_split("test", qa_scenes, eval_seed), layout="visual")
    s2 = run_stage2(preset, "opt", stage1, seed, backbones)
    return {"llm": label, "llm_params": sum(p.numel() for p in lm.parameters()), "pretrain_steps": steps,
            "in_context_qa": qa["overall"], **quick_eval(n_eval, eval_seed)(s2.pipe), "stage2_s": round(s2.seconds, 1)}


def llm_size(out_dir: str | Path, preset: R.ShapesPreset, work_dir: str | Path, pretrain_steps: int = 1000,
             sizes: Optional[dict[str, Optional[dict]]] = None, seed: int = 0, n_eval: Optional[int] = None,
             qa_scenes: int = 100, eval_seed: int = 0, pretrain_kwargs: Optional[dict] = None, workers: int = 1,
             verbose: bool = True) -> list[dict]:
    """LLM size: OPTs of each size in `sizes` (name -> `model_overrides` of `pretrain_opt`;
    default a half-width 2-layer one and the shipped shape) pretrained by the shipped recipe
    for `pretrain_steps`, plus the shipped OPT (5000 steps); each measured by in-context QA
    (the scene's caption in the text) before BLIP-2, then stage 2 from one stage-1 Q-Former.
    `pretrain_kwargs`: more arguments of `pretrain_opt` (e.g. a smaller `n_scenes` corpus).
    The pretrainings and the stage 1 run side by side, then the stage-2 runs."""
    start = time.perf_counter()
    work = Path(work_dir)
    sizes = sizes if sizes is not None else {"small (2x64)": SMALL_OPT, "shipped shape (4x128)": {}}
    extra = dict(pretrain_kwargs or {})
    llms: list[tuple[str, Path, int]] = []
    with _jobs(workers) as jobs:
        stage1 = _submit(jobs, _stage1_job, preset, seed, R.BACKBONES)
        pretrained = []
        for name, overrides in sizes.items():
            key = world.stable_seed(json.dumps([overrides or {}, pretrain_steps, seed, extra], sort_keys=True)) % 10**8
            folder = work / f"opt-{pretrain_steps}-{key:08d}"  # one folder per (size, steps, seed, arguments)
            if not (folder / "model.safetensors").is_file():
                pretrained.append(_submit(jobs, _pretrain_opt_job, folder, pretrain_steps, seed, overrides, extra))
            llms.append((f"{name}, {pretrain_steps} steps", folder, pretrain_steps))
        llms.append(("shipped (4x128), 5000 steps", R.BACKBONES / "opt", 5000))
        s1 = stage1.result()
        for f in pretrained:
            f.result()
        futures = []
        for label, folder, steps in llms:
            backbones = R.BACKBONES if folder == R.BACKBONES / "opt" else _backbones_with(work, f"backbones-{folder.name}",
                                                                                           opt=folder)
            futures.append(_submit(jobs, _llm_job, label, folder, steps, backbones, preset, s1, seed,
                                   n_eval or preset.n_eval, eval_seed, qa_scenes))
        rows = [f.result() for f in futures]
    for row in rows:
        _log(verbose, row)
    write_rows(out_dir, "llm_size", rows, _meta("llm_size", preset, start, workers, seed=seed, eval_seed=eval_seed,
                                                pretrain_steps=pretrain_steps, qa_scenes=qa_scenes))
    return rows


def findings(out_dir: str | Path, preset: R.ShapesPreset, seeds: Sequence[int] = (0, 1, 2),
             kinds: Sequence[R.LLMKind] = ("opt", "t5"), eval_at: Optional[Sequence[int]] = None,
             n_eval: Optional[int] = None, vqa_fraction: float = 0.5, eval_seed: int = 0, workers: int = 1,
             verbose: bool = True) -> dict[str, list[dict]]:
    """The paper's two findings in one run (docs/ablations.md): Table 6 (stage 1 with ITC,
    ITC+ITM, ITC+ITM+ITG per seed; retrieval on the usual gallery and on `hard_retrieval`'s)
    and Figure 5 (from each seed's full stage 1, and from BERT, stage 2 on captions only on
    each LLM family, zero-shot VQA by type and caption F1 at the `eval_at` steps), plus the
    variant whose stage 2 mixes VQA items (`vqa_fraction`) in. One stage 1 per (losses, seed):
    the full one is Table 6's row and Figure 5's start. Writes table6, figure5 and
    figure5_vqa (.json + .csv)."""
    start = time.perf_counter()
    eval_at = list(eval_at or [max(1, round(preset.stage2_steps * f)) for f in (0.25, 0.5, 0.75, 1.0)])
    n_eval = n_eval or preset.n_eval
    variant = replace(preset, stage2_vqa_fraction=vqa_fraction)
    rows6, curves, full, timings = [], {}, "ITC+ITM+ITG", []
    with _jobs(workers) as jobs:
        stage1 = {_submit(jobs, _stage1_and_row_job, name, replace(preset, stage1_losses=tuple(losses)), seed,
                          eval_seed): (name, seed) for name, losses in LOSS_SETS.items() for seed in seeds}
        for done in as_completed(stage1):
            (name, seed), (row, trained) = stage1[done], done.result()
            rows6.append(row)
            timings.append({"losses": name, "seed": seed, "stage1_s": row["train_s"]})
            _log(verbose, f"table6 {name} seed {seed}: itc R@1 {row['itc/txt_r1']:.3f}/{row['itc/img_r1']:.3f}, "
                          f"hard itm R@1 {row['hard/itm/txt_r1']:.3f}/{row['hard/itm/img_r1']:.3f}")
            if name != full:
                continue
            for kind in kinds:
                for sweep, p in (("figure5", preset), ("figure5_vqa", variant)):
                    for s1 in (trained, None):
                        curves[sweep, seed, kind, s1 is not None] = _submit(
                            jobs, _figure5_job, p, kind, s1, seed, eval_at, n_eval, eval_seed)
        out = {"table6": sorted(rows6, key=lambda r: (list(LOSS_SETS).index(r["losses"]), r["seed"]))}
        for sweep in ("figure5", "figure5_vqa"):
            keys = sorted(k for k in curves if k[0] == sweep)
            out[sweep] = [r for key in keys for r in curves[key].result()[0]]
            timings += [{"sweep": sweep, "seed": seed, "llm": kind, "stage1": with_stage1,
                         "stage2_s": round(curves[sweep, seed, kind, with_stage1].result()[1], 1)}
                        for _, seed, kind, with_stage1 in keys]
    meta = dict(seeds=list(seeds), kinds=list(kinds), eval_at=eval_at, n_eval=n_eval, eval_seed=eval_seed,
                timings=timings)
    for name, rows in out.items():
        write_rows(out_dir, name, rows, _meta(name, variant if name == "figure5_vqa" else preset, start, workers,
                                              **meta))
    return out


SWEEPS = {"findings": findings, "figure5": figure5, "table6": table6, "queries": queries, "encoders": encoders, "llm_size": llm_size}


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description="Ablation sweeps of the shapes recipe (blip2lab.worlds.shapes.ablations).")
    p.add_argument("sweep", choices=sorted(SWEEPS))
    p.add_argument("--out", required=True, help="folder for <sweep>.json and <sweep>.csv")
    p.add_argument("--preset", default="default", choices=sorted(R.PRESETS))
    p.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="preset overrides")
    p.add_argument("--seeds", default="0,1,2", help="figure5 / table6")
    p.add_argument("--work", default="runs/ablations", help="encoders / llm_size: where new backbones go")
    p.add_argument("--threads", type=int, default=1, help="torch threads of this process (with --workers 1)")
    p.add_argument("--workers", type=int, default=1, help="processes of one thread each for the sweep's jobs")
    args = p.parse_args(argv)
    _COMMAND[0] = shlex.join(["python", "-m", "blip2lab.worlds.shapes.ablations",
                              *(sys.argv[1:] if argv is None else argv)])
    torch.set_num_threads(args.threads)
    preset = R.preset_with(args.preset, args.set)
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.sweep in ("figure5", "table6", "findings"):
        SWEEPS[args.sweep](args.out, preset, seeds=seeds, workers=args.workers)
    elif args.sweep == "queries":
        queries(args.out, preset, seed=seeds[0], workers=args.workers)
    else:
        SWEEPS[args.sweep](args.out, preset, args.work, seed=seeds[0], workers=args.workers)


if __name__ == "__main__":
    main()
