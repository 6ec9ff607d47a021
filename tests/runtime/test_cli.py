"""gemma-run's commands and exit codes (0 ok, 1 runtime failure, 2 usage or load error)."""

from __future__ import annotations

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
    assert result.exit_code == 2 and "--runs 0 must be >= 1" in result.output


def test_bench_reports_figures(tiny_artifacts):
    result = invoke("bench", tiny_artifacts["static"], "--prompt-length", "8", "--new-tokens", "8", "--runs", "2", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["kv_layout"] == "static" and report["decode_tokens_per_s"] > 0
    assert 0 <= report["overhead_percent"] < 100 and report["weight_bytes_per_token"] > 0
    assert report["fraction_of_bound"] > 0


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
