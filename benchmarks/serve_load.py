"""Load on the server: concurrent streamed chat requests with the official `openai` client.

    python benchmarks/serve_load.py --random-model           # a random-weight model=tiny, started here
    python benchmarks/serve_load.py --ckpt outputs/.../model  # a model folder, started here
    python benchmarks/serve_load.py --url http://127.0.0.1:8000/v1 [--api-key KEY]   # a running server

For each concurrency level (--levels, default 1 2 4 8 16), `level` client
threads share --requests requests (each a picture and a question; the prompts
differ in length), streamed with stream_options.include_usage, greedy, at most
--max-tokens new tokens. A random-weight model never says its end-of-turn
token, so every answer is that long: throughput is measured at full length.
Per level: requests/s, output tokens/s, time to first token and latency at
p50 and p95, and how many requests got 429 or failed. Every level asks the
same prompts; their greedy answers are compared with level 1's (batching
must not change an answer). Then a burst: --burst requests at once, each
answered or refused exactly once (none hangs past --timeout, none lost).
A server started here gets serve.max_batch=--max-batch,
serve.max_queue=--max-queue and hardware=--hardware (cpu; auto takes a GPU);
it writes under a temporary folder.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

QUESTIONS = ["What colour is the shape?", "Shape?", "Where is the shape in the picture, left or right?",
             "Describe the picture in a few words.", "Is there a circle, a square or a triangle in it?",
             "What is the biggest shape, and what colour is it?", "Count the shapes.", "Is it red?"]  # fmt: skip
COLOURS = ["red", "blue", "green", "orange", "purple", "yellow", "black", "grey"]


def picture(k: int) -> str:
    """A data URL of a small PNG: a coloured square on white, one per prompt."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (96, 96), "white")
    ImageDraw.Draw(image).rectangle([10 + 3 * k, 20, 60 + 3 * k, 70], fill=COLOURS[k % len(COLOURS)])
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def messages(k: int) -> list[dict]:
    content = [{"type": "image_url", "image_url": {"url": picture(k)}},
               {"type": "text", "text": QUESTIONS[k % len(QUESTIONS)]}]  # fmt: skip
    return [{"role": "user", "content": content}]


def one_request(client, k: int, max_tokens: int) -> dict:
    """Stream one request; its outcome, timings, answer and completion id."""
    import openai

    t0 = time.perf_counter()
    first, text, tokens, ids = None, "", 0, set()
    try:
        stream = client.chat.completions.create(model="svlm", messages=messages(k), stream=True, temperature=0,
                                                max_tokens=max_tokens, stream_options={"include_usage": True})  # fmt: skip
        for chunk in stream:
            ids.add(chunk.id)
            if chunk.choices and chunk.choices[0].delta.content:
                first = first or time.perf_counter()
                text += chunk.choices[0].delta.content
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
    except openai.RateLimitError:
        return {"k": k, "outcome": "429"}
    except Exception as e:  # a failure is counted, not raised: the load goes on
        return {"k": k, "outcome": "failed", "error": f"{type(e).__name__}: {e}"}
    end = time.perf_counter()
    return {"k": k, "outcome": "ok", "ttft": (first or end) - t0, "latency": end - t0, "tokens": tokens,
            "text": text, "ids": ids}  # fmt: skip


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def run_level(client, level: int, requests: int, max_tokens: int) -> dict:
    t0 = time.perf_counter()
    with ThreadPoolExecutor(level) as pool:
        results = list(pool.map(lambda k: one_request(client, k, max_tokens), range(requests)))
    wall = time.perf_counter() - t0
    ok = [r for r in results if r["outcome"] == "ok"]
    return {
        "level": level, "requests": requests, "wall_s": wall, "requests_per_s": len(ok) / wall,
        "output_tokens_per_s": sum(r["tokens"] for r in ok) / wall,
        "ttft_p50": percentile([r["ttft"] for r in ok], 0.5), "ttft_p95": percentile([r["ttft"] for r in ok], 0.95),
        "latency_p50": percentile([r["latency"] for r in ok], 0.5),
        "latency_p95": percentile([r["latency"] for r in ok], 0.95),
        "refused_429": sum(r["outcome"] == "429" for r in results),
        "failed": sum(r["outcome"] == "failed" for r in results),
        "errors": sorted({r["error"] for r in results if r["outcome"] == "failed"})[:3],
        "answers": {r["k"]: r["text"] for r in ok},
    }  # fmt: skip


def burst(client, n: int, max_tokens: int, timeout: float) -> dict:
    """n requests at once, no retries: each must end answered or refused, once."""
    results: list[dict] = []
    lock = threading.Lock()

    def go(k: int) -> None:
        r = one_request(client, k, max_tokens)
        with lock:
            results.append(r)

    threads = [threading.Thread(target=go, args=(k,), daemon=True) for k in range(n)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    ended = sorted(r["k"] for r in results)
    ids = [i for r in results if r["outcome"] == "ok" for i in r["ids"]]
    return {"sent": n, "answered": sum(r["outcome"] == "ok" for r in results),
            "refused_429": sum(r["outcome"] == "429" for r in results),
            "failed": sum(r["outcome"] == "failed" for r in results), "hung": n - len(results),
            "each_ended_once": ended == list(range(n)), "answered_twice": len(ids) - len(set(ids))}  # fmt: skip


# ------------------------------------------------------------- the server


def random_model(folder: Path, cache: Path) -> Path:
    """A random-weight model=tiny folder, with the tokenizer trained on the shapes data."""
    from hydra import compose, initialize_config_dir

    from svlm.config import load_train_config
    from svlm.data.source import data_root, train_files
    from svlm.model_folder import save_model
    from svlm.tokenizer import tokenizer_for_data
    from svlm.training.prepare import build_model

    with initialize_config_dir(str(REPO / "conf"), version_base=None):
        cfg = load_train_config(compose("train", [f"paths.outputs={folder}", f"paths.cache={cache}", f"paths.run_dir={folder}",
                                                  "hardware=cpu", "stage=stage2"]))  # fmt: skip
    root = data_root(cfg.data, cfg.paths.cache)  # builds the shapes data set
    tokenizer = tokenizer_for_data(cfg.tokenizer, train_files(cfg.data, root, cfg.stages()[0].task))
    return save_model(folder / "model", build_model(cfg, tokenizer), tokenizer, {"stage": "stage2", "finished": True})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(ckpt: Path, folder: Path, args) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "svlm.serve", f"ckpt={ckpt}", f"port={port}", f"hardware={args.hardware}",
               f"serve.max_batch={args.max_batch}", f"serve.max_queue={args.max_queue}",
               f"serve.max_tokens={max(args.max_tokens, 1024)}", f"paths.outputs={folder}"]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    server = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}/v1"
    import httpx

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server stopped: {server.stderr.read().decode()[-2000:]}")
        try:
            httpx.get(f"{url}/models", timeout=1).raise_for_status()
            return server, url
        except httpx.HTTPError:
            time.sleep(0.3)
    server.kill()
    raise SystemExit("the server did not start within 120 s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="a running server's API base, e.g. http://127.0.0.1:8000/v1")
    where.add_argument("--ckpt", type=Path, help="a model folder to serve here")
    where.add_argument("--random-model", action="store_true", help="serve a random-weight model=tiny here")
    ap.add_argument("--api-key", default=os.environ.get("SVLM_API_KEY", "none"))
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--requests", type=int, default=16, help="requests at each level")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--burst", type=int, default=64, help="requests sent at once after the levels; 0: none")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds the burst may take")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--max-queue", type=int, default=8)
    ap.add_argument("--hardware", default="cpu", help="the hardware config of a server started here (auto: a GPU)")
    ap.add_argument("--out", type=Path, help="write the figures here as JSON")
    args = ap.parse_args()

    import openai

    with tempfile.TemporaryDirectory() as tmp:
        server = None
        url = args.url
        if url is None:
            ckpt = args.ckpt or random_model(Path(tmp), Path(tmp) / "cache")
            server, url = start_server(ckpt, Path(tmp), args)
        try:
            client = openai.OpenAI(base_url=url, api_key=args.api_key, max_retries=0, timeout=args.timeout)
            one_request(client, 0, 4)  # warm-up
            levels = [run_level(client, level, args.requests, args.max_tokens) for level in args.levels]
            burst_result = burst(client, args.burst, args.max_tokens, args.timeout) if args.burst else None
        finally:
            if server is not None:
                server.terminate()
                server.wait(30)
    report(levels, burst_result, args)


def report(levels: list[dict], burst_result: dict | None, args) -> None:
    base = levels[0]
    print(f"{args.requests} streamed requests a level, {args.max_tokens} new tokens at most, greedy, one picture each")
    print(f"  {'clients':>7} {'req/s':>7} {'out tok/s':>10} {'x 1 client':>10} {'TTFT p50':>9} {'p95':>7} "
          f"{'latency p50':>12} {'p95':>7} {'429':>4} {'failed':>6} {'same answers':>12}")  # fmt: skip
    for lv in levels:
        same = all(lv["answers"].get(k) == text for k, text in base["answers"].items())
        print(f"  {lv['level']:>7} {lv['requests_per_s']:>7.2f} {lv['output_tokens_per_s']:>10.1f} "
              f"{lv['output_tokens_per_s'] / base['output_tokens_per_s']:>9.1f}x {lv['ttft_p50']:>8.2f}s "
              f"{lv['ttft_p95']:>6.2f}s {lv['latency_p50']:>11.2f}s {lv['latency_p95']:>6.2f}s "
              f"{lv['refused_429']:>4} {lv['failed']:>6} {'yes' if same else 'NO':>12}")  # fmt: skip
        for e in lv["errors"]:
            print(f"    failed: {e}")
        lv["same_answers_as_level_1"] = same
    if burst_result:
        b = burst_result
        print(f"burst of {b['sent']} at once (max_batch {args.max_batch}, max_queue {args.max_queue}): "
              f"{b['answered']} answered, {b['refused_429']} refused (429), {b['failed']} failed, {b['hung']} hung; "
              f"each ended once: {'yes' if b['each_ended_once'] else 'NO'}, answered twice: {b['answered_twice']}")  # fmt: skip
    if args.out:
        for lv in levels:
            lv.pop("answers")
        args.out.write_text(json.dumps({"levels": levels, "burst": burst_result}, indent=2))


if __name__ == "__main__":
    main()
