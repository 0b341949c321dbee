"""Reading the paper's two findings off the sweeps' rows (`ablations.findings`, `figure5`,
`table6`): curves with their spread over seeds, effect sizes, and how many seeds show the
paper's sign. Notebooks 05 and 06 and docs/ablations.md print these; nothing here trains.

Figure 5 rows: {"seed", "llm", "stage1", "step", "vqa", "vqa/<type>", "caption_f1", "lm_loss", ...}.
Table 6 rows: {"losses", "seed", "itc/txt_r1", "itm/img_r1", "hard/itc/txt_r1", ...}.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

from .ablations import mean_sd

__all__ = ["read_rows", "curve", "figure5_effects", "forgetting", "table6_effects", "LOWER_IS_BETTER"]

LOWER_IS_BETTER = ("lm_loss",)  # every other metric: higher is better, so the paper's sign is "with > without"


def read_rows(path: str | Path) -> tuple[dict, list[dict]]:
    """(meta, rows) of a sweep's `<name>.json`."""
    data = json.loads(Path(path).read_text())
    rows = data.pop("rows")
    return data, rows


def _pick(rows: Sequence[dict], **where) -> list[dict]:
    return [r for r in rows if all(r.get(k) == v for k, v in where.items())]


def curve(rows: Sequence[dict], metric: str, llm: str, stage1: bool) -> tuple[list[int], list[float], list[float]]:
    """(steps, mean over seeds, standard deviation over seeds) of one Figure 5 arm."""
    steps = sorted({r["step"] for r in _pick(rows, llm=llm, stage1=stage1)})
    stats = [mean_sd([r[metric] for r in _pick(rows, llm=llm, stage1=stage1, step=s)]) for s in steps]
    return steps, [m for m, _ in stats], [sd for _, sd in stats]


def _paired(rows: Sequence[dict], metric: str, llm: str, step: int) -> list[tuple[float, float]]:
    """(with stage 1, without) per seed at `step`, the seeds both arms have."""
    with_s1 = {r["seed"]: r[metric] for r in _pick(rows, llm=llm, stage1=True, step=step)}
    without = {r["seed"]: r[metric] for r in _pick(rows, llm=llm, stage1=False, step=step)}
    return [(with_s1[s], without[s]) for s in sorted(with_s1) if s in without]


def figure5_effects(rows: Sequence[dict], metrics: Optional[Sequence[str]] = None,
                    step: Optional[int] = None) -> dict[str, dict]:
    """Per "<llm>/<metric>" at `step` (default: the last evaluated): the two arms' mean and
    sd over seeds, the per-seed difference (with - without) as mean and sd, and
    "paper_sign": how many seeds have the paper's sign (stage 1 better) as "k/n"."""
    metrics = metrics or [k for k in rows[0] if k == "vqa" or k.startswith("vqa/") or k in ("caption_f1", "lm_loss")]
    step = step or max(r["step"] for r in rows)
    out = {}
    for llm in dict.fromkeys(r["llm"] for r in rows):
        for metric in metrics:
            pairs = _paired(rows, metric, llm, step)
            if not pairs:
                continue
            diffs = [a - b for a, b in pairs]
            better = [(d < 0) if metric in LOWER_IS_BETTER else (d > 0) for d in diffs]
            out[f"{llm}/{metric}"] = {"with": mean_sd([a for a, _ in pairs]), "without": mean_sd([b for _, b in pairs]),
                                      "diff": mean_sd(diffs), "paper_sign": f"{sum(better)}/{len(diffs)}"}
    return out


def forgetting(rows: Sequence[dict], llm: str, stage1: bool, metric: str = "vqa") -> dict:
    """The paper's "catastrophic forgetting" test on one arm: the change of `metric` from its
    best evaluation to the last, per seed (mean, sd) and how many seeds end below their
    best by more than 0.01."""
    drops = []
    for seed in sorted({r["seed"] for r in _pick(rows, llm=llm, stage1=stage1)}):
        points = sorted(_pick(rows, llm=llm, stage1=stage1, seed=seed), key=lambda r: r["step"])
        drops.append(points[-1][metric] - max(p[metric] for p in points))
    return {"last_minus_best": mean_sd(drops), "seeds_falling": f"{sum(d < -0.01 for d in drops)}/{len(drops)}"}


def _r1(row: dict, how: str) -> float:
    """R@1 averaged over both directions, ranked by `how` ("itc/", "itm/", "hard/itm/", ...)."""
    return (row[f"{how}txt_r1"] + row[f"{how}img_r1"]) / 2


TABLE6_COMPARISONS = (("ITC+ITM+ITG", "ITC+ITM"), ("ITC+ITM", "ITC"))


def table6_effects(rows: Sequence[dict]) -> dict[str, dict]:
    """The paper's comparison (ITG added to ITC+ITM) and ITM added to ITC, on mean R@1 of
    both directions, per ranking (ITC alone, ITM re-ranked) and gallery (usual, "hard":
    scenes beside their one-fact-changed siblings) where the rows have it: per-seed
    difference as mean and sd, and "paper_sign" ("k/n" seeds where the added loss helps).
    ITM re-ranking of an ITC-only model uses an untrained head and is left out."""
    out = {}
    for better, base in TABLE6_COMPARISONS:
        for gallery in ("", "hard/"):
            for how in ("itm/", "itc/"):
                if base == "ITC" and how == "itm/":
                    continue
                key = f"{gallery}{how}txt_r1"
                a = {r["seed"]: r for r in rows if r["losses"] == better and key in r}
                b = {r["seed"]: r for r in rows if r["losses"] == base and key in r}
                seeds = sorted(set(a) & set(b))
                if not seeds:
                    continue
                diffs = [_r1(a[s], gallery + how) - _r1(b[s], gallery + how) for s in seeds]
                out[f"{better} vs {base}, {'hard' if gallery else 'usual'} gallery, {how[:-1].upper()}"] = {
                    better: mean_sd([_r1(a[s], gallery + how) for s in seeds]),
                    base: mean_sd([_r1(b[s], gallery + how) for s in seeds]),
                    "diff": mean_sd(diffs), "paper_sign": f"{sum(d > 0 for d in diffs)}/{len(diffs)}"}
    return out
