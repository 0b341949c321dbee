"""Every benchmark in one command, and one table of the figures against their peers.

    python benchmarks/run_all.py                 # the CPU benchmarks (about 15 min on 2 quiet cores)
    python benchmarks/run_all.py --only generate,qformer
    python benchmarks/run_all.py --gpu           # also benchmarks/gpu.sh (real sizes; needs CUDA)
    make bench                                   # the same as the first line

Each benchmark runs in its own process (so one's threads, caches and memory do not touch the
next), writes its JSON under `--out` (default runs/benchmarks/all/), and contributes rows
(figure, blip2lab, peer, unit, ratio, outputs checked). The table goes to `<out>/table.md`
and to stdout; a benchmark that fails is reported in the table, and the others still run.
Ratios > 1 mean blip2lab is faster (peer time / blip2lab time).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


@dataclass
class Row:
    figure: str
    ours: str
    peer: str
    ratio: str
    checked: str


def _rate(x: float, unit: str) -> str:
    return f"{x:,.1f} {unit}" if x < 100 else f"{x:,.0f} {unit}"


# -- adapters: a benchmark's JSON -> rows ------------------------------------------------


def rows_generate(result: list) -> list[Row]:
    rows = []
    for r in result:
        rows.append(Row(f"{r['benchmark']} ({r['size']}, batch {r['batch']}, {r['new_tokens']} tokens, {r['device']})",
                        _rate(r["blip2lab_img_per_s"], "img/s"),
                        "transformers " + _rate(r["transformers_img_per_s"], "img/s"),
                        f"{r['ratio']:.2f}x", "identical" if r["identical"] else "DIFFERENT"))
        if "blip2lab_peak_rss_added_bytes" in r:
            rows.append(Row("  peak RSS added by one call", f"{r['blip2lab_peak_rss_added_bytes'] / 2**20:,.1f} MB",
                            f"transformers {r['transformers_peak_rss_added_bytes'] / 2**20:,.1f} MB", "", ""))
    return rows


def rows_qformer(r: dict) -> list[Row]:
    return [Row(f"Q-Former ITM forward ({r['size']}, batch {r['batch']}, {r['device']}, {r['threads']} threads)",
                _rate(r["blip2lab_img_per_s"], "img/s"), "transformers " + _rate(r["transformers_img_per_s"], "img/s"),
                f"{r['ratio']:.2f}x", f"max abs diff {r['max_abs_diff']:.1e}")]


def rows_stage1(r: dict) -> list[Row]:
    runs, batch = r["runs"], r["spec"]["batch"]
    rows = [Row(f"stage-1 training step ({r['spec']['size']}, batch {batch}, {r['device']})",
                f"{batch / runs['ours']['step_s']:.1f} samples/s", f"LAVIS-style {batch / runs['lavis']['step_s']:.1f} "
                "samples/s", f"{r['ratio']:.2f}x", "loss curves: " + ", ".join(
                    f"{k} mean abs diff {v['mean_abs_diff']:.3f}" for k, v in r.get("curves", {}).items()))]
    if "encoder_share" in r:  # results written before it was measured lack it
        rows.append(Row("  the peer's frozen encoder forward, share of its step",
                        f"{r['encoder_share']:.0%}", "", f"{r['ratio_from_the_encoder_alone']:.2f}x",
                        "the ratio skipping only the encoder would give"))
    for name, run in runs.items():
        rows.append(Row(f"  peak RSS, {name}", f"{run['peak_rss_bytes'] / 2**20:,.0f} MB", "", "",
                        f"activations kept {run['saved_activation_bytes'] / 2**20:,.0f} MB"))
    return rows


def rows_retrieval(r: dict) -> list[Row]:
    rows = []
    for data, res in r["results"].items():
        for direction in ("text_to_image", "image_to_text"):
            d = res[direction]
            ms = d["ms"]
            rows.append(Row(f"retrieval {direction.replace('_', ' ')} top-{d['k']}, {d['items']:,} items "
                            f"({res['data']}, Q={res['queries_per_image']}, E={res['dim']}, {r['threads']} thread(s))",
                            f"{ms['index']:.1f} ms", f"full matmul {ms['full_matmul']:.1f} ms, FAISS flat {ms['faiss']:.1f} ms",
                            f"{d['speedup_vs_full_matmul']:.1f}x / {d['speedup_vs_faiss']:.1f}x",
                            f"same top-k as the matmul {d['same_indices_as_full_matmul']}"))
        if "itm_rerank" in res:
            ms = res["itm_rerank"]["ms"]
            rows.append(Row(f"retrieval + ITM re-rank of the top 16 ({res['data']})",
                            f"{ms['text_to_image_itm16']:.0f} ms text->image, {ms['image_to_text_itm16']:.0f} ms image->text",
                            "goal 500 ms", "", "order = the pipeline's scorer"))
    return rows


def rows_app(r: dict) -> list[Row]:
    rows = [Row("app cold start (python app.py -> first chat answer)", f"{r['cold_start_s']:.2f} s", "goal 10 s",
                "", "")]
    for name in ("chat", "caption_maps", "search_text_to_image", "search_image_to_text"):
        if name in r:
            rows.append(Row(f"app {name} (HTTP round trip, median)", f"{r[name]['median_s'] * 1e3:.0f} ms", "", "", ""))
    return rows


def rows_minireal(r: dict) -> list[Row]:
    dtype = r.get("llm_dtype", "float32")  # results written before the option were fp32
    rows = [Row(f"mini-real {name.replace('_', ' ')} ({r['photos']} photos, {r['threads']} thread(s), "
                f"LLM {dtype}, median)",
                f"{r[name]['median_s']:.2f} s", "goal 2 s" if name == "chat_turn" else "", "", "")
            for name in ("caption", "chat_turn")]
    rows += [Row(f"mini-real decoding {d['strategy']}, {d['new_tokens']} tokens (SmolLM2 {dtype}, same prefix)",
                 f"{d['blip2lab_s']:.2f} s", f"transformers {d['transformers_s']:.2f} s", f"{d['ratio']:.2f}x",
                 "identical" if d["identical"] else "DIFFERENT") for d in r["decoding"]]
    return rows


@dataclass
class Bench:
    name: str
    argv: list[str]  # after the interpreter; "{json}" is replaced by the result path
    rows: Callable[[object], list[Row]]
    gpu: bool = False


BENCHES = [
    Bench("generate", ["benchmarks/generate.py", "--json", "{json}"], rows_generate),
    Bench("generate-t5", ["benchmarks/generate.py", "--size", "tiny-t5", "--json", "{json}"], rows_generate),
    Bench("qformer", ["benchmarks/qformer.py", "--json", "{json}"], rows_qformer),
    Bench("stage1", ["benchmarks/stage1_step.py", "--steps", "30", "--json", "{json}"], rows_stage1),
    Bench("retrieval", ["benchmarks/retrieval_index.py", "--json", "{json}"], rows_retrieval),
    Bench("app", ["benchmarks/app_latency.py", "--json", "{json}"], rows_app),
    Bench("minireal", ["benchmarks/minireal_latency.py", "--json", "{json}"], rows_minireal),
    Bench("gpu", ["benchmarks/gpu.py", "{json}"], lambda r: [], gpu=True),
]


def run(bench: Bench, out: Path) -> tuple[list[Row], float]:
    path = out / f"{bench.name}.json"
    argv = [sys.executable, *[a.replace("{json}", str(path)) for a in bench.argv]]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    start = time.perf_counter()
    print(f"== {bench.name}: {' '.join(argv[1:])}", flush=True)
    done = subprocess.run(argv, cwd=ROOT, env=env)
    seconds = time.perf_counter() - start
    if done.returncode != 0 or not path.exists():
        return [Row(bench.name, "FAILED", "", "", f"exit code {done.returncode}")], seconds
    return bench.rows(json.loads(path.read_text())), seconds


def table(rows: list[Row]) -> str:
    lines = ["| figure | blip2lab | peer | ratio | outputs checked |", "|---|---|---|---|---|"]
    lines += [f"| {r.figure} | {r.ours} | {r.peer} | {r.ratio} | {r.checked} |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help=f"comma-separated subset of {[b.name for b in BENCHES]}")
    parser.add_argument("--gpu", action="store_true", help="also run benchmarks/gpu.py (CUDA)")
    parser.add_argument("--out", default=str(ROOT / "runs" / "benchmarks" / "all"))
    args = parser.parse_args()
    wanted = set(filter(None, args.only.split(",")))
    unknown = wanted - {b.name for b in BENCHES}
    if unknown:
        raise SystemExit(f"unknown benchmarks {sorted(unknown)}; known: {[b.name for b in BENCHES]}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, timings = [], {}
    for bench in BENCHES:
        if (wanted and bench.name not in wanted) or (bench.gpu and not args.gpu and bench.name not in wanted):
            continue
        new, timings[bench.name] = run(bench, out)
        rows += new
    import torch

    header = (f"{datetime.date.today()}, {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
              f"run time per benchmark: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))
    text = header + "\n\n" + table(rows) + "\n"
    (out / "table.md").write_text(text)
    print("\n" + text)


if __name__ == "__main__":
    main()
