"""Latency of the Gradio app as a user sees it: `python app.py` in a subprocess, timed
over HTTP with gradio_client (the round trip, file transfers included).

    python benchmarks/app_latency.py                       # shapes-opt, 1 torch thread, 1,000 scenes
    python benchmarks/app_latency.py --model PATH --threads 2 --repeats 20

Prints: cold start (process start -> first answered chat request), then the median and
90th percentile of chat (one turn, the Chat tab's defaults: beam 5, <= 10 new tokens),
caption + maps (caption, every query's cross-attention maps, Grad-CAM of the caption)
and search (text -> image over the gallery of 1,000 test scenes + the shipped examples:
ITC, and ITM re-ranking ITC's top 16; and image -> text). Goals from issue 5: cold start
<= 10 s, chat <= 0.5 s, caption with maps <= 1.5 s, search over 1,000 images <= 0.3 s.

Then the load test: `--users` (20) visitors at once, each its own session (its own Client),
each sending a chat turn about its own scene, a search and a caption with maps, all
submitted together; every request must succeed (the benchmark exits 1 otherwise) and it
prints the latency percentiles (p50, p90, p99, max) of the requests and the wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median_p90, sample_seconds  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "assets" / "examples"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timed(fn, repeats: int) -> dict:
    """One untimed warm-up call, then the median and p90 of `repeats` calls."""
    return median_p90(sample_seconds(fn, repeats, warmup=1))


def handler_latency(args) -> dict:
    """The app's handlers in this process: what the server spends per request."""
    import torch

    sys.path.insert(0, str(ROOT))
    from app import caption, chat, search, server  # the app/ package beside app.py

    torch.set_num_threads(args.threads)
    server.setup(server.Settings(model=args.model, models=(args.model,), gallery_size=args.gallery))
    server.SEARCH.ready.wait()
    image, three = str(ASSETS / "red-circle.png"), str(ASSETS / "three-shapes.png")
    session = search.new_session_gallery()
    return {
        "chat": timed(lambda: chat.chat({"text": "what color is the circle?", "files": [image]}), args.repeats),
        "caption_maps": timed(lambda: caption.caption_maps(three), args.repeats),
        "search_text_to_image": timed(lambda: search.search("text → image", "a small green circle on the top right",
                                                            None, 8, session), args.repeats),
        "search_image_to_text": timed(lambda: search.search("image → text", "", three, 8, session), args.repeats),
    }


def percentiles(seconds: list[float]) -> dict:
    s = sorted(seconds)
    at = lambda q: s[min(len(s) - 1, round(q * (len(s) - 1)))]  # noqa: E731 (nearest rank)
    return {"p50_s": at(0.5), "p90_s": at(0.9), "p99_s": at(0.99), "max_s": s[-1], "n": len(s)}


def concurrent_users(url: str, users: int) -> dict:
    """`users` sessions at once, each a chat turn about its own scene, a search and a caption."""
    from concurrent.futures import ThreadPoolExecutor

    from gradio_client import Client, handle_file

    sys.path.insert(0, str(ROOT))
    from blip2lab.worlds.shapes import world

    folder = Path(tempfile.mkdtemp(prefix="app-load-"))
    scenes = world.make_split("test", users, seed=1)
    for i, scene in enumerate(scenes):
        world.render(scene).save(folder / f"{i}.png")
    clients = [Client(url, verbose=False) for _ in range(users)]

    def visit(i: int) -> list[tuple[str, float, str]]:
        """One visitor's three requests, timed each: (endpoint, seconds, error or "")."""
        client, image, out = clients[i], handle_file(str(folder / f"{i}.png")), []
        for name, call in (("/chat", lambda: client.predict(message={"text": "how many shapes are there?",
                                                                       "files": [image]}, api_name="/chat")),
                           ("/search", lambda: client.predict(text=world.caption(scenes[i]), api_name="/search")),
                           ("/caption_maps", lambda: client.predict(image=image, api_name="/caption_maps"))):
            start = time.perf_counter()
            try:
                call()
                out.append((name, time.perf_counter() - start, ""))
            except Exception as e:  # counted, reported, and the benchmark fails
                out.append((name, time.perf_counter() - start, f"{type(e).__name__}: {e}"))
        return out

    start = time.perf_counter()
    with ThreadPoolExecutor(users) as pool:
        results = [r for visitor in pool.map(visit, range(users)) for r in visitor]
    wall = time.perf_counter() - start
    failed = [f"{name}: {error}" for name, _, error in results if error]
    by_endpoint = {name: percentiles([t for n, t, _ in results if n == name]) for name in ("/chat", "/search",
                                                                                           "/caption_maps")}
    return {"users": users, "requests": len(results), "failed": failed, "wall_s": wall,
            "all": percentiles([t for _, t, _ in results]), "by_endpoint": by_endpoint}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=os.environ.get("BLIP2LAB_MODEL", "shapes-opt"))
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads of the app")
    parser.add_argument("--gallery", type=int, default=1000, help="shapes test scenes in the search gallery")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--users", type=int, default=20, help="visitors at once in the load test (0: skip it)")
    parser.add_argument("--json", help="also write the numbers to this file")
    parser.add_argument("--no-inprocess", dest="inprocess", action="store_false",
                        help="skip timing the handlers in this process")
    args = parser.parse_args()

    from gradio_client import Client, handle_file

    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    env = {**os.environ, "BLIP2LAB_MODEL": args.model, "BLIP2LAB_PORT": str(port), "BLIP2LAB_HOST": "127.0.0.1",
           "BLIP2LAB_THREADS": str(args.threads), "BLIP2LAB_GALLERY_SIZE": str(args.gallery),
           "BLIP2LAB_DEVICE": "cpu", "GRADIO_ANALYTICS_ENABLED": "False", "BLIP2LAB_MODELS": args.model}
    log = tempfile.NamedTemporaryFile("w", suffix=".log", delete=False)
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(ROOT / "app.py")], cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    try:
        client = None
        while client is None:
            if proc.poll() is not None:
                raise SystemExit(f"app.py exited with {proc.returncode}; see {log.name}")
            try:
                client = Client(url, verbose=False)
            except Exception:
                time.sleep(0.05)
        listening = time.perf_counter() - start
        image = handle_file(str(ASSETS / "red-circle.png"))
        message = {"text": "what color is the circle?", "files": [image]}
        client.predict(message=message, api_name="/chat")
        cold = time.perf_counter() - start

        three = handle_file(str(ASSETS / "three-shapes.png"))
        results = {
            "model": args.model, "threads": args.threads,
            "cold_start_s": cold, "listening_s": listening,
            "chat": timed(lambda: client.predict(message=message, api_name="/chat"), args.repeats),
            "caption_maps": timed(lambda: client.predict(image=three, api_name="/caption_maps"), args.repeats),
        }
        *_, status = client.predict(text="a large red circle on the top left", api_name="/search")  # waits: the index
        results["search_gallery"] = status
        results["search_text_to_image"] = timed(lambda: client.predict(
            text="a small green circle on the top right", api_name="/search"), args.repeats)
        results["search_image_to_text"] = timed(lambda: client.predict(
            direction="image → text", image=three, api_name="/search"), args.repeats)
        if args.users:
            results["load"] = concurrent_users(url, args.users)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()

    print(f"model {results['model']}, {results['threads']} torch thread(s), CPU")
    print(f"cold start (python app.py -> first chat answer): {results['cold_start_s']:.2f} s "
          f"(listening after {results['listening_s']:.2f} s)")
    for name in ("chat", "caption_maps", "search_text_to_image", "search_image_to_text"):
        r = results[name]
        print(f"{name:22s} median {r['median_s'] * 1000:7.1f} ms   p90 {r['p90_s'] * 1000:7.1f} ms   (n={r['n']})")
    print(f"search gallery: {results['search_gallery']}")
    if args.users:
        load = results["load"]
        print(f"load: {load['users']} visitors at once, {load['requests']} requests, {len(load['failed'])} failed, "
              f"{load['wall_s']:.1f} s wall")
        for name, r in {"all requests": load["all"], **load["by_endpoint"]}.items():
            print(f"  {name:14s} p50 {r['p50_s']:6.2f} s   p90 {r['p90_s']:6.2f} s   p99 {r['p99_s']:6.2f} s   "
                  f"max {r['max_s']:6.2f} s   (n={r['n']})")
        for failure in load["failed"][:10]:
            print(f"  FAILED {failure}")
    if args.inprocess:
        results["handlers"] = handler_latency(args)
        print("the same handlers called in-process (model + rendering, no HTTP or file transfer):")
        for name, r in results["handlers"].items():
            print(f"  {name:20s} median {r['median_s'] * 1000:7.1f} ms   p90 {r['p90_s'] * 1000:7.1f} ms")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    if args.users and results["load"]["failed"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
