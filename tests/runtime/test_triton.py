"""A stock tritonserver (the nvidia-pytriton wheel's Triton 2.51, Python backend) serving the repository
`gemma-run triton-repo` writes, on the real model, through tritonclient and Triton's generate extension: the
greedy text is gemma-run generate's, streamed pieces (SSE and gRPC) concatenate to it, concurrent requests are
each right, a bad request is an error while the server stays ready, and SIGTERM leaves no stub process or
shared-memory file behind. The server's venv is made by scripts/setup_triton.sh (once per machine)."""

from __future__ import annotations

import json
import os
import subprocess
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest

import runtime
from runtime.serving.options import ServeOptions
from tests.servers import Server, free_port, get, processes

pytestmark = pytest.mark.real
ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["The capital of France is", "LLMs generate text through a process known as", "def fibonacci(n):",
           "Water boils at"]


@pytest.fixture(scope="module")
def triton_venv():
    result = subprocess.run(["bash", str(ROOT / "scripts" / "setup_triton.sh")], capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    return Path(result.stdout.strip().splitlines()[-1])


def shared_memory() -> set[str]:
    return {p for p in os.listdir("/dev/shm") if p.startswith("triton_python_backend_shm_region")}


def stubs() -> set[int]:
    return processes(b"triton_python_backend_stub")


@pytest.fixture(scope="module")
def triton(triton_venv, real_static_artifact, tmp_path_factory):
    from runtime.deploy.triton import write_repository

    root = tmp_path_factory.mktemp("triton")
    write_repository(real_static_artifact, root / "repo", options=ServeOptions(max_batch_size=4))
    site = subprocess.run([str(triton_venv / "bin" / "python"), "-c",
                           "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    http, grpc, metrics = free_port(), free_port(), free_port()
    command = [f"{site}/pytriton/tritonserver/bin/tritonserver", "--model-repository", str(root / "repo"),
               "--backend-directory", str(triton_venv / "backends"),
               "--cache-directory", f"{site}/pytriton/tritonserver/caches",
               "--http-address", "127.0.0.1", "--http-port", str(http),
               "--grpc-address", "127.0.0.1", "--grpc-port", str(grpc),
               "--metrics-address", "127.0.0.1", "--metrics-port", str(metrics),
               "--allow-gpu-metrics", "false", "--exit-timeout-secs", "15"]
    # the stub takes its Python from the first python3 on PATH: the server venv's, with the runtime installed
    env = {"LD_LIBRARY_PATH": f"{site}/nvidia_pytriton.libs", "PATH": f"{triton_venv / 'bin'}:{os.environ['PATH']}"}
    shm_before, stubs_before = shared_memory(), stubs()
    server = Server(command, root / "tritonserver.log", env)
    try:
        server.wait_ready(f"http://127.0.0.1:{http}/v2/health/ready", 180)
        server.http, server.grpc = f"http://127.0.0.1:{http}", f"127.0.0.1:{grpc}"
        server.before = shm_before, stubs_before
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def alone(real_static_artifact):
    return runtime.load(real_static_artifact)


def generate(server, body: dict) -> dict:
    return httpx.post(f"{server.http}/v2/models/gemma/generate", json=body, timeout=120).json()


def test_generate_is_gemma_run_generates_text(triton, alone):
    from click.testing import CliRunner

    from runtime.cli import main

    printed = CliRunner().invoke(main, ["generate", str(alone.manifest.folder), PROMPTS[0], "-n", "20"]).output
    reply = generate(triton, {"text_input": PROMPTS[0], "max_tokens": 20})
    assert reply["text_output"] + "\n" == printed and printed.startswith(" the capital of the country of France")
    with httpx.stream("POST", f"{triton.http}/v2/models/gemma/generate_stream", timeout=120,
                      json={"text_input": PROMPTS[0], "max_tokens": 20, "stream": True}) as response:
        pieces = [json.loads(line[6:])["text_output"] for line in response.iter_lines() if line.startswith("data: ")]
    assert len(pieces) > 5 and "".join(pieces) == reply["text_output"]


def test_grpc_streaming_through_tritonclient(triton, alone):
    import tritonclient.grpc as grpcclient

    expected = alone.generate_text(PROMPTS[1], runtime.SamplingParams(max_new_tokens=16))
    received, done = [], threading.Event()

    def callback(result, error):
        if error is not None:
            received.append(error)
            done.set()
            return
        if result.get_response().parameters["triton_final_response"].bool_param:
            done.set()
        output = result.as_numpy("text_output")
        if output is not None:
            received.append(output[0].decode())

    inputs = []
    for name, value, kind in (("text_input", np.array([PROMPTS[1].encode()], dtype=np.object_), "BYTES"),
                              ("max_tokens", np.array([16], np.int32), "INT32"),
                              ("stream", np.array([True]), "BOOL")):
        tensor = grpcclient.InferInput(name, [1], kind)
        tensor.set_data_from_numpy(value)
        inputs.append(tensor)
    client = grpcclient.InferenceServerClient(triton.grpc)
    try:
        client.start_stream(callback)
        client.async_stream_infer("gemma", inputs, request_id="1", enable_empty_final_response=True)
        assert done.wait(120)
        client.stop_stream()
    finally:
        client.close()
    assert all(isinstance(p, str) for p in received) and "".join(received) == expected


def test_concurrent_requests_are_each_answered_right(triton, alone):
    expected = [alone.generate_text(p, runtime.SamplingParams(max_new_tokens=16)) for p in PROMPTS]
    replies = [None] * len(PROMPTS)

    def send(i):
        replies[i] = generate(triton, {"text_input": PROMPTS[i], "max_tokens": 16})["text_output"]

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(PROMPTS))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=180)
    assert replies == expected


@pytest.mark.parametrize("body, words", [
    ({"text_input": "x", "temperature": -1.0}, "temperature -1.0 is out of range"),
    ({"text_input": "x", "max_tokens": 9000}, "do not fit"),
    ({"max_tokens": 3}, "text_input must be a non-empty string"),
])
def test_a_bad_request_is_an_error_and_the_server_stays_ready(triton, body, words):
    reply = generate(triton, body)
    assert words in reply.get("error", ""), reply
    assert get(f"{triton.http}/v2/health/ready")[0] == 200
    assert generate(triton, {"text_input": "Hi", "max_tokens": 2})["text_output"]


def test_sigterm_leaves_no_stub_or_shared_memory(triton):
    """Last: it stops the server."""
    shm_before, stubs_before = triton.before
    assert stubs() - stubs_before  # the model's stub runs
    assert triton.stop() == 0
    assert not stubs() - stubs_before and shared_memory() <= shm_before
