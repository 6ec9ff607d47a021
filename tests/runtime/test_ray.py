"""gemma-run serve --ray on a local Ray cluster (127.0.0.1) with two replicas of the real model, through the
openai client: requests are answered by both replicas (x-gemma-replica), each greedy text is gemma-run
generate's, and a replica killed mid-run is replaced while the requests after it are still answered."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import pytest

import runtime
from tests.servers import Server, free_port, processes, wait_until

pytestmark = pytest.mark.real
openai = pytest.importorskip("openai", reason="the openai client is in the test extra")
pytest.importorskip("ray.serve", reason="Ray Serve is in the ray extra")

NAME = "gemma3-270m-static"
PROMPTS = ["The capital of France is", "LLMs generate text through a process known as", "def fibonacci(n):",
           "Water boils at", "The three primary colors are", "In 1492,", "Once upon a time", "The sun is"]


def replicas() -> set[int]:
    """PIDs of this machine's Serve replica processes (Ray titles them ray::ServeReplica:APP:DEPLOYMENT)."""
    return processes(b"ray::ServeReplica:gemma")


@pytest.fixture(scope="module")
def ray_server(real_static_artifact, tmp_path_factory):
    port = free_port()
    command = [sys.executable, "-m", "runtime.cli", "serve", str(real_static_artifact), "--ray", "--replicas", "2",
               "--cpus-per-replica", "0.5", "--max-batch-size", "4", "--port", str(port)]
    server = Server(command, tmp_path_factory.mktemp("ray") / "serve.log")
    try:
        server.wait_ready(f"http://127.0.0.1:{port}/health", 240)
        server.url = f"http://127.0.0.1:{port}"
        yield server
    finally:
        server.stop(timeout=60, group=False)  # the command shuts its cluster down itself


@pytest.fixture(scope="module")
def client(ray_server):
    return openai.OpenAI(base_url=f"{ray_server.url}/v1", api_key="none", timeout=120)


def complete(client, prompt):
    raw = client.completions.with_raw_response.create(model=NAME, prompt=prompt, max_tokens=16, temperature=0)
    return raw.headers["x-gemma-replica"], raw.parse().choices[0].text


def test_both_replicas_answer_each_as_gemma_run_generate(client, real_static_artifact):
    alone = runtime.load(real_static_artifact)
    expected = [alone.generate_text(p, runtime.SamplingParams(max_new_tokens=16)) for p in PROMPTS]
    answers = [None] * len(PROMPTS)

    def send(i):
        answers[i] = complete(client, PROMPTS[i])

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(PROMPTS))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=180)
    assert [text for _, text in answers] == expected
    seen = {replica for replica, _ in answers}
    deadline = time.monotonic() + 60
    while len(seen) < 2 and time.monotonic() < deadline:  # Serve picks the less loaded of two: keep asking
        seen.add(complete(client, PROMPTS[0])[0])
    assert len(seen) == 2


def test_a_killed_replica_is_replaced_and_the_requests_after_it_are_answered(client):
    before = replicas()
    assert len(before) == 2
    victim = min(before)
    os.kill(victim, signal.SIGKILL)
    texts = [complete(client, prompt)[1] for prompt in PROMPTS[:4]]  # the client retries a 5xx, as it does
    assert all(texts)
    wait_until(lambda: len(replicas() - {victim}) == 2, 90, "Serve starting a replica in place of the dead one")
    seen = set()
    deadline = time.monotonic() + 60
    while len(seen) < 2 and time.monotonic() < deadline:
        seen.add(complete(client, PROMPTS[0])[0])
    assert len(seen) == 2  # the new replica answers too


def test_sigterm_stops_the_cluster(ray_server):
    """Last: it stops the server."""
    assert ray_server.stop(timeout=60, group=False) == 0
    wait_until(lambda: not replicas(), 30, "the replicas gone with the cluster")
