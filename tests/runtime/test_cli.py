"""gemma-run's commands and exit codes (0 ok, 1 runtime failure, 2 usage or load error)."""

from __future__ import annotations

import importlib.util
import json

import pytest
from click.testing import CliRunner

from runtime.cli import main


def invoke(*args, input=None):
    return CliRunner().invoke(main, [str(a) for a in args], input=input)


def test_bad_artifact_and_options_exit_2(tmp_path, tiny_artifacts):
    result = invoke("generate", tmp_path / "nothing", "hello")
    assert result.exit_code == 2 and "does not exist" in result.output
    result = invoke("generate", tiny_artifacts["dynamic"], "hello", "--temperature", "-1")
    assert result.exit_code == 2 and "temperature -1.0 is out of range" in result.output
    result = invoke("generate", tiny_artifacts["dynamic"], "hello", "--provider", "cuda")
    assert result.exit_code == 2 and "--allow-cpu-fallback" in result.output
    result = invoke("generate", tiny_artifacts["dynamic"], "hello")  # no tokenizer in a random-weights artifact
    assert result.exit_code == 2 and "no tokenizer.json" in result.output
    result = invoke("bench", tiny_artifacts["dynamic"], "--runs", "0")
    assert result.exit_code == 2 and "Invalid value for '--runs': 0 is not in the range x>=1" in result.output
    result = invoke("generate", tiny_artifacts["dynamic"], "hello", "--bogus")
    assert result.exit_code == 2 and "No such option" in result.output


def test_errors_are_one_line_without_traceback(tmp_path, tiny_text_artifacts):
    result = invoke("generate", tiny_text_artifacts["static"], "word " * 80, "-n", "4")  # past the static cache of 64
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.output
    assert "tokens but the context holds 64" in result.stderr
    incomplete = tmp_path / "half"
    incomplete.mkdir()
    result = invoke("chat", incomplete)
    assert result.exit_code == 2 and "the artifact is incomplete" in result.stderr


def test_runtime_failure_exits_1(tiny_text_artifacts, monkeypatch, caplog):
    from runtime.backends.onnxruntime_backend import OnnxRuntimeBackend

    def broken(self, *args, **kwargs):
        raise RuntimeError("the execution provider failed\nsecond line")

    monkeypatch.setattr(OnnxRuntimeBackend, "forward", broken)
    result = invoke("generate", tiny_text_artifacts["dynamic"], "hello")
    assert result.exit_code == 1
    assert result.stderr.endswith("gemma-run: RuntimeError: the execution provider failed\n")
    logged = [r for r in caplog.records if r.name == "gemma-run" and r.exc_info]  # the traceback, in the log
    assert logged and "the execution provider failed" in str(logged[0].exc_info[1])


def test_generate_from_argument_stdin_stream_and_json(tiny_text_artifacts):
    artifact = tiny_text_artifacts["dynamic"]
    plain = invoke("generate", artifact, "The capital of France is", "-n", "12")
    assert plain.exit_code == 0, plain.output
    assert invoke("generate", artifact, "-n", "12", input="The capital of France is\n").output == plain.output
    streamed = invoke("generate", artifact, "The capital of France is", "-n", "12", "--stream")
    assert streamed.output == plain.output
    as_json = json.loads(invoke("generate", artifact, "The capital of France is", "-n", "12", "--json").output)
    assert as_json["generated_text"] == plain.output[:-1] and as_json["prompt"] == "The capital of France is"
    assert 1 <= as_json["tokens"] <= 12 and as_json["timings"]["run_seconds"] <= as_json["timings"]["seconds"]
    chat = json.loads(invoke("generate", artifact, "Hi", "-n", "4", "--chat", "--json").output)
    import runtime

    model = runtime.load(artifact)
    rendered = model.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert chat["generated_text"] == model.generate_text(rendered, runtime.SamplingParams(max_new_tokens=4), chat=True)
    sampled = [invoke("generate", artifact, "Hi", "-n", "8", "-t", "0.8", "--top-p", "0.9", "--seed", "3").output
               for _ in range(2)]
    assert sampled[0] == sampled[1]


def test_interactive_chat_on_stdin(tiny_text_artifacts):
    result = invoke("chat", tiny_text_artifacts["dynamic"], "-n", "4", input="Hi\n/reset\nHi\n\n/exit\nnever read\n")
    assert result.exit_code == 0, result.output
    before, after = result.output.split("(conversation reset)\n")
    assert before == after and len(before) > 1  # after /reset, the same first turn and reply
    assert "never read" not in result.output


def test_bench_plot_without_matplotlib_is_a_usage_error(tiny_artifacts):
    if importlib.util.find_spec("matplotlib") is not None:
        pytest.skip("matplotlib is installed")
    result = invoke("bench", tiny_artifacts["dynamic"], "--plot", "x.png", "--runs", "1")
    assert result.exit_code == 2 and "--plot needs matplotlib" in result.stderr


def test_bench_plot_draws_decode_speed_against_context(tiny_artifacts, tmp_path):
    pytest.importorskip("matplotlib")  # in the test extra; the test above covers its absence
    plot = tmp_path / "decode.png"
    result = invoke("bench", tiny_artifacts["dynamic"], "--prompt-length", "8", "--new-tokens", "4", "--runs", "1",
                    "--plot", plot, "--json")
    assert result.exit_code == 0, result.output
    sweep = json.loads(result.output)["context_sweep"]
    assert [p["context"] for p in sweep] == [128, 512, 1024, 2048]
    assert all(p["decode_tokens_per_s"] > 0 for p in sweep)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_reports_figures(tiny_artifacts):
    """The report against figures measured here apart from it: the weight files' sizes, this process's peak
    RSS, and decode steps timed by hand (a loose factor: the machine is shared; it catches units, not speed)."""
    import resource
    import statistics
    import time

    import numpy as np

    import runtime

    folder = tiny_artifacts["static"]
    result = invoke("bench", folder, "--prompt-length", "8", "--new-tokens", "8", "--runs", "2", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["kv_layout"] == "static"
    assert report["weight_bytes_per_token"] == sum((folder / f).stat().st_size for f in ("model.onnx", "model.onnx.data"))
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the bench ran in this process
    assert 10 < report["peak_rss_mb"] <= peak_mb + 1

    cache = runtime.load(folder).new_cache(1, 24)
    cache.feed(slice(0, 1), np.arange(3, 11)[None])
    steps = []
    for _ in range(8):
        start = time.perf_counter()
        cache.feed(slice(0, 1), np.array([[5]]))
        steps.append(1000 * (time.perf_counter() - start))
    by_hand = statistics.median(steps)
    assert by_hand / 4 < report["decode_step_ms"] < 4 * by_hand
    assert 0 <= report["overhead_ms_per_step"] < report["decode_step_ms"]
    assert report["numpy_read_gb_per_s"] > 0 and report["matvec_read_gb_per_s"] > 0


@pytest.mark.real
def test_generate_from_stdin_stream_and_json(real_artifact):
    prompt = "The capital of France is"
    plain = invoke("generate", real_artifact, "-n", "12", input=prompt + "\n")
    assert plain.exit_code == 0, plain.output
    assert plain.output.startswith(" the capital of the country of France")
    streamed = invoke("generate", real_artifact, prompt, "-n", "12", "--stream")
    assert streamed.output == plain.output
    as_json = json.loads(invoke("generate", real_artifact, prompt, "-n", "12", "--json").output)
    assert as_json["generated_text"] == plain.output.rstrip("\n") and as_json["tokens"] == 12
    chat = invoke("generate", real_artifact, "Say hi", "-n", "8", "--chat", "--json")
    assert chat.exit_code == 0 and json.loads(chat.output)["tokens"] >= 1


@pytest.mark.real
def test_interactive_chat(real_artifact):
    result = invoke("chat", real_artifact, "-n", "8", input="Name a color.\n/reset\nName a fruit.\n/exit\n")
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert "(conversation reset)" in lines and len(lines) >= 3
