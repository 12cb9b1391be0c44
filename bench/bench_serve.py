"""Load test of `janus serve --api-only` on loopback: a burst of concurrent requests mixing both endpoints.

Starts the real command in a subprocess (a tiny random model unless --model is given), sends one
warm-up request of each kind, then fires --requests requests at once, cycling through four kinds:
chat with an image, streamed chat, seedless images (n=1) and seeded images (n=2). Reported per kind:
p50 / p95 / max latency and failures (any status but 200, a stream without [DONE], a wrong image
count), plus the burst's throughput. Each mix (all four kinds; seedless images only) runs twice:
seedless image requests merged into batches (the default) and not (--max-batch-images 1).
A table, and JSON under bench/results/.

    python bench/bench_serve.py                          # 60 requests, concurrency 8
    python bench/bench_serve.py --requests 200 --concurrency 16 --model PATH
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from PIL import Image

RESULTS = Path(__file__).parent / "results"
KINDS = ("chat", "chat stream", "image", "image seeded")
MIXES = {"mixed": KINDS, "images": ("image",)}  # the second shows what merging seedless requests buys


def request_for(kind: str, i: int, picture: str) -> tuple[str, dict]:
    """(path, JSON body) of the i-th request of `kind`."""
    ask = {"role": "user", "content": [{"type": "text", "text": f"What is in picture {i}?"}, {"type": "image_url", "image_url": {"url": picture}}]}
    if kind == "chat":
        return "/v1/chat/completions", {"messages": [ask], "max_tokens": 32}
    if kind == "chat stream":
        return "/v1/chat/completions", {"messages": [ask], "max_tokens": 32, "temperature": 0.7, "seed": i, "stream": True}
    if kind == "image":
        return "/v1/images/generations", {"prompt": f"a red circle number {i}"}
    return "/v1/images/generations", {"prompt": f"two blue squares number {i}", "n": 2, "seed": i}


async def send(client: httpx.AsyncClient, kind: str, i: int, picture: str) -> dict:
    """One request: its latency and, if it failed, why."""
    path, body = request_for(kind, i, picture)
    start = time.perf_counter()
    try:
        if body.get("stream"):
            async with client.stream("POST", path, json=body) as response:
                lines = [line async for line in response.aiter_lines() if line]
            ok = response.status_code == 200 and lines and lines[-1] == "data: [DONE]" and '"error"' not in "".join(lines)
            error = None if ok else f"status {response.status_code}, last event {lines[-1] if lines else None!r}"
        else:
            response = await client.post(path, json=body)
            error = None if response.status_code == 200 else f"status {response.status_code}: {response.text[:200]}"
            if error is None and path.endswith("generations") and len(response.json()["data"]) != body.get("n", 1):
                error = "wrong number of images"
    except httpx.HTTPError as e:
        error = f"{type(e).__name__}: {e}"
    return {"kind": kind, "seconds": time.perf_counter() - start, "error": error}


async def burst(url: str, kinds: tuple[str, ...], requests: int, picture: str) -> tuple[list[dict], float]:
    limits = httpx.Limits(max_connections=requests, max_keepalive_connections=requests)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        for kind in kinds:  # warm-up: first calls pay for lazy initialisation
            await send(client, kind, 0, picture)
        start = time.perf_counter()
        results = await asyncio.gather(*(send(client, kinds[i % len(kinds)], i, picture) for i in range(requests)))
        return list(results), time.perf_counter() - start


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_server(model: Path, concurrency: int, max_batch_images: int, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [
        sys.executable, "-m", "janus.cli", "serve", "--api-only", "--model", str(model), "--port", str(port),
        "--concurrency", str(concurrency), "--max-batch-images", str(max_batch_images),
    ]
    server = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited; see {log}")
        try:
            if httpx.get(url + "/health").status_code == 200:
                return server, url
        except httpx.TransportError:
            time.sleep(0.2)
    server.kill()
    raise RuntimeError(f"the server did not answer /health in 120 s; see {log}")


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def summarize(results: list[dict], kinds: tuple[str, ...], seconds: float) -> dict:
    rows = {}
    for kind in kinds:
        times = [r["seconds"] for r in results if r["kind"] == kind]
        rows[kind] = {
            "requests": len(times), "failed": sum(1 for r in results if r["kind"] == kind and r["error"]),
            "p50_s": percentile(times, 50), "p95_s": percentile(times, 95), "max_s": max(times),
        }
    images = sum(row["requests"] * (2 if kind == "image seeded" else 1) for kind, row in rows.items() if kind.startswith("image"))
    return {
        "per_kind": rows, "failed": sum(1 for r in results if r["error"]), "errors": sorted({r["error"] for r in results if r["error"]}),
        "wall_s": seconds, "requests_per_s": len(results) / seconds, "images_per_s": images / seconds,
    }


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").is_file():
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")]
        cpu = names[0] if names else cpu
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, Python {platform.python_version()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=60, help="concurrent requests in the burst (default 60)")
    parser.add_argument("--concurrency", type=int, default=8, help="the server's --concurrency (default 8)")
    parser.add_argument("--model", default=None, help="checkpoint directory (default: a tiny random model)")
    args = parser.parse_args()

    RESULTS.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (40, 60, 220)).save(buffer, format="PNG")
    picture = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    report = {"machine": machine(), "requests": args.requests, "concurrency": args.concurrency, "model": args.model or "tiny random (32 px, 16 tokens per image)", "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(args.model) if args.model else None
        if model is None:
            from janus.testing import save_tiny_checkpoint

            model = save_tiny_checkpoint(Path(tmp) / "tiny")
        for mix, kinds in MIXES.items():
            for batching, max_batch_images in (("batched", 16), ("unbatched", 1)):
                server, url = run_server(model, args.concurrency, max_batch_images, RESULTS / f"serve-{batching}.log")
                try:
                    results, seconds = asyncio.run(burst(url, kinds, args.requests, picture))
                finally:
                    server.terminate()
                    server.wait(30)
                report["runs"][f"{mix}, {batching}"] = summarize(results, kinds, seconds)

    print(f"{report['machine']}\n{args.requests} concurrent requests, server --concurrency {args.concurrency}, model: {report['model']}\n")
    print(f"{'run':<18} {'kind':<13} {'requests':>8} {'failed':>6} {'p50 s':>7} {'p95 s':>7} {'max s':>7}")
    for name, run in report["runs"].items():
        for kind, row in run["per_kind"].items():
            print(f"{name:<18} {kind:<13} {row['requests']:>8} {row['failed']:>6} {row['p50_s']:>7.2f} {row['p95_s']:>7.2f} {row['max_s']:>7.2f}")
        print(f"{name:<18} {'all':<13} {args.requests:>8} {run['failed']:>6}   burst {run['wall_s']:.2f} s: "
              f"{run['requests_per_s']:.1f} requests/s, {run['images_per_s']:.1f} images/s")
        for error in run["errors"]:
            print(f"  error: {error}")
    out = RESULTS / f"serve-{platform.node() or 'host'}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {out}")
    if any(run["failed"] for run in report["runs"].values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
