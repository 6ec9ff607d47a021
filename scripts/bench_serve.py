"""gemma-run serve under 1, 4, 8 and 16 concurrent streaming clients, against one client, in one run.

    python scripts/bench_serve.py DIR [DIR ...] [--clients 1,4,8,16] [--prompt-length 128] [--new-tokens 64]
        [--rounds 3] [--max-batch-size 8] [--json]

Each artifact (static KV layout) is served by `gemma-run serve` on 127.0.0.1; every client streams one
completion of `--new-tokens` tokens (ignore_eos) from its own prompt of `--prompt-length` random token ids, all
clients starting together. Per level: aggregate tokens/s (every client's tokens over the wall time), time to
first token p50/p95 and inter-token latency p50/p95 (the gaps between a stream's events), and their ratios to
one client's. The levels go round-robin for --rounds rounds (the machine drifts over minutes), medians taken.
The ceiling beside them: the same prompts decoded as one batch of --max-batch-size rows through the runtime's
batch API (runtime.bench.time_generation), after the server has stopped. Run it on an idle machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.servers import Server, free_port  # noqa: E402  (the same start/stop the tests use)


def prompts(count: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(1000, min(vocab, 200_000), size=(count, length))
    ids[:, 0] = 2  # <bos>
    return ids.tolist()


async def one_client(client, url: str, model: str, prompt: list[int], new_tokens: int) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    stamps, tokens = [], 0
    async with client.stream("POST", f"{url}/v1/completions", json=body, timeout=600) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(f"{url}: {event['error']['message']}")
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            elif event["choices"] and event["choices"][0]["finish_reason"] is None:
                stamps.append(time.perf_counter())
    return {"start": start, "end": time.perf_counter(), "ttft": stamps[0] - start, "gaps": np.diff(stamps).tolist(),
            "tokens": tokens}


async def level(url: str, model: str, prompt_ids: list[list[int]], clients: int, new_tokens: int) -> dict:
    import httpx

    async with httpx.AsyncClient() as client:
        results = await asyncio.gather(*(one_client(client, url, model, prompt_ids[i % len(prompt_ids)], new_tokens)
                                         for i in range(clients)))
    wall = max(r["end"] for r in results) - min(r["start"] for r in results)
    ttft = [r["ttft"] for r in results]
    gaps = [g for r in results for g in r["gaps"]]
    return {"tokens_per_s": sum(r["tokens"] for r in results) / wall,
            "ttft_p50": float(np.percentile(ttft, 50)), "ttft_p95": float(np.percentile(ttft, 95)),
            "itl_p50": float(np.percentile(gaps, 50)), "itl_p95": float(np.percentile(gaps, 95))}


def batch_ceiling(folder: Path, prompt_ids: list[list[int]], batch: int, new_tokens: int) -> float:
    import runtime
    from runtime.bench import time_generation

    model = runtime.load(folder, verify=False)
    ids = np.array((prompt_ids * batch)[:batch], np.int64)
    time_generation(model, ids, new_tokens)  # warm-up
    return statistics.median(time_generation(model, ids, new_tokens)["decode_tokens_per_s"] for _ in range(3))


def bench(folder: Path, args) -> dict:
    import runtime

    manifest = runtime.read_manifest(folder, verify=False)
    prompt_ids = prompts(max(args.clients), args.prompt_length, manifest.model.vocab_size)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = Path("/tmp") / f"bench-serve-{folder.name}.log"
    server = Server([sys.executable, "-m", "runtime.cli", "serve", str(folder), "--port", str(port),
                     "--max-batch-size", str(args.max_batch_size), "--max-queue", "256"], log)
    try:
        server.wait_ready(f"{url}/health", 300)
        asyncio.run(level(url, folder.name, prompt_ids, 2, args.new_tokens))  # warm-up
        samples = {c: [] for c in args.clients}
        for _ in range(args.rounds):
            for clients in args.clients:
                samples[clients].append(asyncio.run(level(url, folder.name, prompt_ids, clients, args.new_tokens)))
    finally:
        server.stop()
    rows = {c: {k: statistics.median(s[k] for s in runs) for k in runs[0]} for c, runs in samples.items()}
    base = rows[min(rows)]
    for row in rows.values():
        row["throughput_x"] = row["tokens_per_s"] / base["tokens_per_s"]
        row["itl_p95_x"] = row["itl_p95"] / base["itl_p95"]
    ceiling = batch_ceiling(folder, prompt_ids, args.max_batch_size, args.new_tokens)
    return {"artifact": folder.name, "levels": rows, "batch_api_tokens_per_s": ceiling}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifacts", type=Path, nargs="+")
    parser.add_argument("--clients", type=lambda s: [int(c) for c in s.split(",")], default=[1, 4, 8, 16])
    parser.add_argument("--prompt-length", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    reports = [bench(folder, args) for folder in args.artifacts]
    if args.json:
        print(json.dumps(reports, indent=2))
        return 0
    for report in reports:
        print(f"{report['artifact']}: prompt {args.prompt_length}, {args.new_tokens} new tokens, --max-batch-size "
              f"{args.max_batch_size}, median of {args.rounds} rounds; batch API ceiling "
              f"{report['batch_api_tokens_per_s']:.1f} tok/s")
        print(f"{'clients':>8} {'tok/s':>8} {'x':>6} {'TTFT p50':>9} {'p95':>7} {'ITL p50':>8} {'p95':>7} {'x':>6}")
        for clients, r in report["levels"].items():
            print(f"{clients:>8} {r['tokens_per_s']:8.1f} {r['throughput_x']:6.2f} {1000 * r['ttft_p50']:8.0f}ms "
                  f"{1000 * r['ttft_p95']:6.0f}ms {1000 * r['itl_p50']:7.1f}ms {1000 * r['itl_p95']:6.1f}ms "
                  f"{r['itl_p95_x']:6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
