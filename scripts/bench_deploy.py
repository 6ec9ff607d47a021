"""gemma-run serve alone, through Triton, and on Ray Serve, side by side in one run: start-up time, memory per
replica, and the throughput of concurrent streaming clients.

    python scripts/bench_deploy.py DIR [--clients 8] [--prompt-words 96] [--new-tokens 64] [--rounds 3]
        [--ray-replicas 2] [--json]

The three servers of one static-layout artifact run at once (each with --max-batch-size 8): `gemma-run serve`,
`gemma-run serve --ray` (a local cluster of --ray-replicas replicas) and a tritonserver over the repository
`gemma-run triton-repo` writes (scripts/setup_triton.sh makes its venv). Start-up: from the process's start to
its health answering 200 (the model loaded). Memory: the resident set of each model-holding process (the server,
each Ray replica, Triton's stub) when idle after the runs. Throughput: --clients concurrent greedy streams of
--new-tokens tokens each (the OpenAI API's completions for the first two, Triton's generate_stream for the third),
the servers taking turns round by round, medians of --rounds. Run it on an idle machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scripts.bench_serve import Endpoint, completion, passage, together  # noqa: E402
from tests.servers import Server, free_port, processes  # noqa: E402


def rss_mib(pids) -> list[float]:
    values = []
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    values.append(int(line.split()[1]) / 1024)
        except OSError:
            pass
    return values


async def triton_level(url: str, prompt_texts: list[str], clients: int, new_tokens: int) -> dict:
    """The same figures as bench_serve.together, through /generate_stream (one event per piece)."""
    import httpx
    import numpy as np

    async def one(client, text):
        start, stamps = time.perf_counter(), []
        body = {"text_input": text, "max_tokens": new_tokens, "stream": True}
        async with client.stream("POST", f"{url}/v2/models/gemma/generate_stream", json=body, timeout=600) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    stamps.append(time.perf_counter())
        return {"start": start, "end": time.perf_counter(), "ttft": stamps[0] - start, "gaps": np.diff(stamps).tolist()}

    async with httpx.AsyncClient() as client:
        results = await asyncio.gather(*(one(client, prompt_texts[i % len(prompt_texts)]) for i in range(clients)))
    wall = max(r["end"] for r in results) - min(r["start"] for r in results)
    gaps = [g for r in results for g in r["gaps"]]
    return {"tokens_per_s": clients * new_tokens / wall, "ttft_p50": float(np.percentile([r["ttft"] for r in results], 50)),
            "itl_p95": float(np.percentile(gaps, 95))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--prompt-words", type=int, default=96, help="words of held-out text a prompt (~1.3 tokens each)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ray-replicas", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from runtime.deploy.triton import write_repository
    from runtime.serving.options import ServeOptions

    texts = [passage(args.prompt_words, 500 * i) for i in range(args.clients)]  # every server gets the same text
    work = Path(tempfile.mkdtemp(prefix="bench-deploy-"))
    venv = Path(subprocess.run(["bash", str(ROOT / "scripts" / "setup_triton.sh")], capture_output=True, text=True,
                               check=True).stdout.strip().splitlines()[-1])
    write_repository(args.artifact, work / "repo", options=ServeOptions(max_batch_size=8))
    site = subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    ports = {name: free_port() for name in ("serve", "ray", "triton", "grpc", "metrics")}
    serve_cmd = [sys.executable, "-m", "runtime.cli", "serve", str(args.artifact), "--max-batch-size", "8"]
    commands = {
        "serve": ([*serve_cmd, "--port", str(ports["serve"])], {}, f"http://127.0.0.1:{ports['serve']}/health"),
        "ray": ([*serve_cmd, "--port", str(ports["ray"]), "--ray", "--replicas", str(args.ray_replicas),
                 "--cpus-per-replica", "0.5"], {}, f"http://127.0.0.1:{ports['ray']}/health"),
        "triton": ([f"{site}/pytriton/tritonserver/bin/tritonserver", "--model-repository", str(work / "repo"),
                    "--backend-directory", str(venv / "backends"), "--cache-directory",
                    f"{site}/pytriton/tritonserver/caches", "--http-address", "127.0.0.1", "--http-port",
                    str(ports["triton"]), "--grpc-address", "127.0.0.1", "--grpc-port", str(ports["grpc"]),
                    "--metrics-address", "127.0.0.1", "--metrics-port", str(ports["metrics"]),
                    "--allow-gpu-metrics", "false"],
                   {"LD_LIBRARY_PATH": f"{site}/nvidia_pytriton.libs", "PATH": f"{venv / 'bin'}:{os.environ['PATH']}"},
                   f"http://127.0.0.1:{ports['triton']}/v2/health/ready"),
    }
    servers, report = {}, {}
    try:
        for name, (command, env, ready) in commands.items():  # one after the other: start-up alone on the machine
            start = time.perf_counter()
            servers[name] = Server(command, work / f"{name}.log", env)
            servers[name].wait_ready(ready, 600)
            report[name] = {"startup_s": time.perf_counter() - start}
        name = args.artifact.resolve().name
        bodies = [completion(text, args.new_tokens) for text in texts]
        runs = {
            "serve": lambda: asyncio.run(together(Endpoint("serve", f"http://127.0.0.1:{ports['serve']}", name),
                                                  "/v1/completions", bodies)),
            "ray": lambda: asyncio.run(together(Endpoint("ray", f"http://127.0.0.1:{ports['ray']}", name),
                                                "/v1/completions", bodies)),
            "triton": lambda: asyncio.run(triton_level(f"http://127.0.0.1:{ports['triton']}", texts, args.clients,
                                                       args.new_tokens)),
        }
        for run in runs.values():
            run()  # warm-up
        samples = {k: [] for k in runs}
        for _ in range(args.rounds):
            for key, run in runs.items():
                samples[key].append(run())
        for key, rows in samples.items():
            report[key].update({m: statistics.median(r[m] for r in rows) for m in ("tokens_per_s", "ttft_p50", "itl_p95")})
        report["serve"]["rss_mib"] = rss_mib([servers["serve"].process.pid])
        report["ray"]["rss_mib"] = rss_mib(processes(b"ray::ServeReplica:gemma"))
        report["triton"]["rss_mib"] = rss_mib(processes(b"triton_python_backend_stub"))
    finally:
        for key, server in servers.items():
            server.stop(timeout=60, group=key != "ray")
    base = report["serve"]["tokens_per_s"]
    for row in report.values():
        row["throughput_x"] = row["tokens_per_s"] / base
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{args.artifact.name}: {args.clients} concurrent streams, prompts of {args.prompt_words} words, {args.new_tokens} new "
          f"tokens, median of {args.rounds} rounds taken in turn")
    print(f"{'server':>8} {'start-up':>9} {'RSS per replica MiB':>20} {'tok/s':>8} {'x serve':>8} {'TTFT p50':>9} "
          f"{'ITL p95':>8}")
    for key, r in report.items():
        rss = ", ".join(f"{v:.0f}" for v in r["rss_mib"])
        print(f"{key:>8} {r['startup_s']:8.1f}s {rss:>20} {r['tokens_per_s']:8.1f} {r['throughput_x']:8.2f} "
              f"{1000 * r['ttft_p50']:8.0f}ms {1000 * r['itl_p95']:7.1f}ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
