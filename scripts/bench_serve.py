"""gemma-run serve against itself and llama.cpp's llama-server, in one run: throughput, prefix caching, n.

    python scripts/bench_serve.py --artifact INT4 [--artifact FP32] [--llama-cpp BIN_DIR] [--gguf FILE]
        [--scenarios throughput,prefix,multiturn,n] [--clients 1,8,16] [--rounds 3] [--max-batch-size 16] [--json]
        [--speculative ngram|DRAFT]

Every server runs on 127.0.0.1 for the whole run, the measurements taking turns (the machine drifts over minutes);
medians of --rounds. Each artifact (static KV layout) is served by `gemma-run serve --max-batch-size N`, the first
one also with --no-prefix-cache for the prefix scenarios; llama-server (BIN_DIR/llama-server, built by
build_llama_cpp.sh from the llama-cpp-python sdist) serves the GGUF the packaged model comes from with -np N, -t 2
and a context of 1,024 tokens a slot.

    throughput   every client streams one completion of 64 tokens (ignore_eos) of its own ~128-token text prompt,
                 all clients at once: aggregate tokens/s, time to first token and inter-token latency (p50, p95),
                 each server's levels as ratios to llama-server's and to its own one client's
    prefix       one request warms the cache, then 8 clients at once send the same ~1,500-token prefix and each its
                 own question (64 new tokens): time to first token p50 and tokens/s, prefix cache on and off; and
                 the same 8 clients with nothing warm (they arrive together: the later ones follow the first)
    multiturn    a 10-turn chat re-sent whole each turn (24 new tokens a turn): each turn's time to first token
    n            n=4 against n=1 on a 512-token prompt (64 new tokens): wall time

`--speculative` adds a server of the first artifact with `--speculative ...` to the throughput scenario (its
prompts are held-out prose: the drafts' acceptance is a plain continuation's, the cost side of speculation).

Run it on an idle machine.
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

TEXT = (ROOT / "tests/data/heldout.txt").read_text() + "\n" + (ROOT / "exporter/data/calibration.txt").read_text()
WORDS = TEXT.split()
LLAMA_BIN = Path.home() / ".cache" / "gemma-deploy" / "llama.cpp" / "bin"
NEW_TOKENS = 64


def passage(words: int, start: int = 0) -> str:
    """`words` words of held-out text from word `start` on (about 1.3 tokens a word)."""
    return " ".join((WORDS * (1 + (start + words) // len(WORDS)))[start:start + words])


class Endpoint:
    """An OpenAI-compatible server and how to ask it for a streamed completion."""

    def __init__(self, name: str, url: str, model: str):
        self.name, self.url, self.model = name, url, model

    async def stream(self, client, path: str, body: dict) -> dict:
        """One streamed request: its start, first-event and end times, event gaps and tokens."""
        body = {"model": self.model, "stream": True, "stream_options": {"include_usage": True}, **body}
        start = time.perf_counter()
        stamps, tokens, events = [], 0, 0
        async with client.stream("POST", f"{self.url}{path}", json=body, timeout=900) as response:
            if response.status_code != 200:
                raise RuntimeError(f"{self.name}: {response.status_code} {(await response.aread())[:300]!r}")
            async for line in response.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    raise RuntimeError(f"{self.name}: {event['error']}")
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
                for choice in event.get("choices") or ():
                    piece = choice.get("text") or (choice.get("delta") or {}).get("content")
                    if piece:
                        stamps.append(time.perf_counter())
                        events += 1
        return {"start": start, "end": time.perf_counter(), "ttft": stamps[0] - start if stamps else float("nan"),
                "gaps": np.diff(stamps).tolist(), "tokens": tokens or events}


class Target(Endpoint):
    """An Endpoint this run starts (and stops)."""

    def __init__(self, name: str, command: list[str], port: int, model: str, log: Path):
        super().__init__(name, f"http://127.0.0.1:{port}", model)
        self.server = Server(command, log)


def ours(folder: Path, max_batch_size: int, *flags: str) -> Target:
    port = free_port()
    name = folder.name + ("".join(f" {f}" for f in flags))
    command = [sys.executable, "-m", "runtime.cli", "serve", str(folder), "--port", str(port), "--max-batch-size",
               str(max_batch_size), "--max-queue", "256", *flags]
    return Target(name, command, port, folder.name, Path("/tmp") / f"bench-serve-{port}.log")


def llama_server(bin_dir: Path, gguf: Path, slots: int) -> Target:
    binary = bin_dir / "llama-server"
    if not binary.is_file():
        raise SystemExit(f"{binary} does not exist: build llama.cpp with build_llama_cpp.sh, or drop --llama-cpp")
    port = free_port()
    command = [str(binary), "-m", str(gguf), "-t", "2", "-np", str(slots), "-c", str(1024 * slots),
               "--host", "127.0.0.1", "--port", str(port), "--no-webui"]
    return Target("llama-server", command, port, gguf.name, Path("/tmp") / f"bench-serve-{port}.log")


async def together(target: Endpoint, path: str, bodies: list[dict]) -> dict:
    import httpx

    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=64)) as client:
        results = await asyncio.gather(*(target.stream(client, path, body) for body in bodies))
    wall = max(r["end"] for r in results) - min(r["start"] for r in results)
    ttft = [r["ttft"] for r in results]
    gaps = [g for r in results for g in r["gaps"]] or [float("nan")]
    return {"tokens_per_s": sum(r["tokens"] for r in results) / wall, "wall_s": wall,
            "ttft_p50": float(np.percentile(ttft, 50)), "ttft_p95": float(np.percentile(ttft, 95)),
            "itl_p50": float(np.percentile(gaps, 50)), "itl_p95": float(np.percentile(gaps, 95))}


def completion(prompt: str, new_tokens: int = NEW_TOKENS, **extra) -> dict:
    return {"prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "ignore_eos": True, **extra}


def medians(runs: list[dict]) -> dict:
    return {key: statistics.median(r[key] for r in runs) for key in runs[0]}


# -- the scenarios ------------------------------------------------------------------------------------------------


def throughput(targets: list[Target], clients: list[int], rounds: int) -> dict:
    prompts = [passage(96, 500 * i) for i in range(max(clients))]  # about 128 tokens each
    samples = {(t.name, c): [] for t in targets for c in clients}
    for _ in range(rounds):
        for c in clients:
            for t in targets:
                samples[t.name, c].append(asyncio.run(together(t, "/v1/completions",
                                                               [completion(p) for p in prompts[:c]])))
    table = {name: {} for name in dict.fromkeys(t.name for t in targets)}
    for (name, c), runs in samples.items():
        table[name][c] = medians(runs)
    return table


def prefix(cached: Target, uncached: Target, rounds: int) -> dict:
    system = passage(1150, 3000)  # about 1,500 tokens
    questions = [f"\n\nQuestion {i}: what does the passage say about {w}?\nAnswer:"
                 for i, w in enumerate(["rivers", "towns", "trade", "winter", "roads", "bridges", "schools", "food"])]
    samples = {(t.name, warm): [] for t in (cached, uncached) for warm in (True, False)}
    for r in range(rounds):
        for warm in (True, False):
            head = system if warm else passage(1150, 3000 + 1200 * (r + 1))  # a prefix never seen when cold
            for t in (cached, uncached):
                if warm:
                    asyncio.run(together(t, "/v1/completions", [completion(head + "\n\nQuestion: why?", 8)]))
                bodies = [completion(head + q) for q in questions]
                samples[t.name, warm].append(asyncio.run(together(t, "/v1/completions", bodies)))
    return {f"{name} {'warm' if warm else 'cold'}": medians(runs) for (name, warm), runs in samples.items()}


def multiturn(target: Target, turns: int = 10) -> list[float]:
    import httpx

    async def chat() -> list[float]:
        messages, ttft = [], []
        async with httpx.AsyncClient() as client:
            for turn in range(turns):
                messages.append({"role": "user", "content": passage(40, 9000 + 40 * turn) + " Go on."})
                body = {"messages": messages, "max_tokens": 24, "temperature": 0}
                result = await target.stream(client, "/v1/chat/completions", body)
                ttft.append(result["ttft"])
                messages.append({"role": "assistant", "content": passage(18, 20000 + 18 * turn)})
        return ttft

    return asyncio.run(chat())


def n_choices(target: Target, rounds: int) -> dict:
    prompt = passage(390, 15000)  # about 512 tokens
    walls = {1: [], 4: []}
    for _ in range(rounds):
        for n in (1, 4):
            body = completion(prompt, n=n, temperature=1.0, seed=1)
            walls[n].append(asyncio.run(together(target, "/v1/completions", [body]))["wall_s"])
    return {n: statistics.median(w) for n, w in walls.items()}


# -- the run ------------------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifact", type=Path, action="append", required=True)
    parser.add_argument("--llama-cpp", type=Path, nargs="?", const=LLAMA_BIN, default=None, metavar="BIN_DIR")
    parser.add_argument("--gguf", type=Path, default=None, help="default: the packaged model's GGUF")
    parser.add_argument("--scenarios", default="throughput,prefix,multiturn,n")
    parser.add_argument("--clients", type=lambda s: [int(c) for c in s.split(",")], default=[1, 8, 16])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--speculative", default=None, help="also serve the first artifact with --speculative this")
    args = parser.parse_args()
    scenarios = args.scenarios.split(",")
    targets = [ours(folder, args.max_batch_size) for folder in args.artifact]
    if args.speculative:
        targets.append(ours(args.artifact[0], args.max_batch_size, "--speculative", args.speculative))
    uncached = ours(args.artifact[0], args.max_batch_size, "--no-prefix-cache") if "prefix" in scenarios else None
    llama = None
    if args.llama_cpp is not None:
        from models import packaged

        llama = llama_server(args.llama_cpp, args.gguf or packaged.gguf_path(), args.max_batch_size)
    started = [t for t in [*targets, uncached, llama] if t is not None]
    report = {}
    try:
        for t in started:
            t.server.wait_ready(f"{t.url}/health", 600)
            asyncio.run(together(t, "/v1/completions", [completion(passage(96), 8)] * 2))  # warm-up
        if "throughput" in scenarios:
            report["throughput"] = throughput([*targets, *([llama] if llama else [])], args.clients, args.rounds)
        if "prefix" in scenarios:
            report["prefix"] = prefix(targets[0], uncached, args.rounds)
        if "multiturn" in scenarios:
            report["multiturn"] = {t.name: multiturn(t) for t in (targets[0], uncached)}
        if "n" in scenarios:
            report["n"] = n_choices(targets[0], args.rounds)
    finally:
        for t in started:
            t.server.stop()
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report, llama.name if llama else None)
    return 0


def print_report(report: dict, reference: str | None) -> None:
    if "throughput" in report:
        table = report["throughput"]
        print("throughput: ~128-token text prompts, 64 new tokens, all clients at once (medians)")
        print(f"{'server':<28} {'clients':>7} {'tok/s':>7} {'x 1':>5} {'x ref':>6} {'TTFT p50':>9} {'ITL p50':>8} "
              f"{'p95':>7}")
        for name, levels in table.items():
            first = levels[min(levels)]["tokens_per_s"]
            for c, r in levels.items():
                ratio = r["tokens_per_s"] / table[reference][c]["tokens_per_s"] if reference else float("nan")
                print(f"{name:<28} {c:>7} {r['tokens_per_s']:7.1f} {r['tokens_per_s'] / first:5.2f} {ratio:6.2f} "
                      f"{1000 * r['ttft_p50']:7.0f}ms {1000 * r['itl_p50']:6.1f}ms {1000 * r['itl_p95']:5.1f}ms")
    if "prefix" in report:
        print("prefix: 8 clients, a ~1,500-token shared prefix and their own question, 64 new tokens")
        for name, r in report["prefix"].items():
            print(f"  {name:<40} TTFT p50 {1000 * r['ttft_p50']:7.0f} ms   {r['tokens_per_s']:6.1f} tok/s")
    if "multiturn" in report:
        print("multiturn: a 10-turn chat re-sent each turn, time to first token per turn (ms)")
        for name, ttft in report["multiturn"].items():
            print(f"  {name:<40} " + " ".join(f"{1000 * t:.0f}" for t in ttft)
                  + f"   turn 10 / turn 1: {ttft[-1] / ttft[0]:.2f}")
    if "n" in report:
        walls = report["n"]
        print(f"n: a 512-token prompt, 64 new tokens: n=1 {walls[1]:.2f} s, n=4 {walls[4]:.2f} s "
              f"({walls[4] / walls[1]:.2f}x)")


if __name__ == "__main__":
    sys.exit(main())
