"""Gemma 4 through the runtime, unchanged: its artifacts (past and present for the 5 storing layers of tiny-gemma4's
8, two KV shapes) generate what models/ generates, in the dynamic layout and on the static ring (fused for ONNX
Runtime), and the serving scheduler's batched requests give what each gives alone."""

from __future__ import annotations

import numpy as np
import pytest

import runtime
from models import presets, random_model
from runtime.serving.options import ServeOptions
from runtime.serving.scheduler import Scheduler
from tests.runtime.test_generate import torch_greedy
from tests.runtime.test_scheduler import Collector

from .conftest import add_text_files


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    from exporter import ExportOptions, export

    root = tmp_path_factory.mktemp("gemma4")
    export("random:tiny-gemma4", root / "dynamic", ExportOptions(verify=False, progress=False))
    export("random:tiny-gemma4", root / "ring", ExportOptions(target="ort", kv_cache="static", max_length=64,
                                                               verify=False, progress=False))
    return {"dynamic": root / "dynamic", "ring": root / "ring"}


def test_manifest_and_graph_hold_the_storing_layers_only(artifacts):
    import onnx

    manifest = runtime.load(artifacts["ring"]).manifest
    config = presets.config("tiny-gemma4")
    kv = manifest.kv
    assert kv.layers == (0, 1, 2, 3, 4) == tuple(config.kv_layers) and kv.num_layers == 5
    assert manifest.model.kv_sources == tuple(config.kv_source) == (0, 1, 2, 3, 4, 2, 4, 2)
    assert kv.shapes == ((2, 16), (2, 16), (1, 32), (2, 16), (2, 16))
    assert kv.sliding_cache == "ring" and kv.slots == (16, 16, 64, 16, 16)  # window 8 + a chunk of 8
    # GroupQueryAttention on the global storing layer only: rings and KV-shared layers keep their own attention
    assert manifest.fusions["group_query_attention"] == 1 and manifest.fusions["rotary_embedding"] == 13
    assert manifest.fusions["rms_normalization"] + manifest.fusions["skip_rms_normalization"] >= 8 * 6  # but v's
    graph = onnx.load(str(artifacts["ring"] / "model.onnx"), load_external_data=False).graph
    inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    assert [n for n in inputs if n.startswith("past")] == kv.past_names
    assert "past_key_values.5.key" not in inputs
    assert inputs["past_key_values.2.key"] == ["batch_size", 1, 64, 32]
    assert inputs["past_key_values.3.value"] == ["batch_size", 2, 16, 16]
    assert [o.name for o in graph.output][1:] == kv.present_names


@pytest.mark.parametrize("layout", ["dynamic", "ring"])
def test_greedy_matches_pytorch(artifacts, layout):
    """A left-padded batch of two, 30 new tokens: past the window of 8 and round the ring of 16 twice."""
    model = runtime.load(artifacts[layout])
    ids = np.array([[0, 0, 0, 2, 17, 99, 5], [2, 40, 41, 42, 43, 44, 45]], np.int64)
    mask = (ids != 0).astype(np.int64)
    expected = torch_greedy(random_model(presets.config("tiny-gemma4")), ids, mask, 30)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=30, eos_token_id=[])
    assert (out[:, 7:] == expected).all()
    assert len(set(expected[0].tolist())) > 5


def test_served_requests_are_each_what_they_give_alone(artifacts, tmp_path):
    model = runtime.load(add_text_files(artifacts["ring"], tmp_path / "text"))
    prompts = ["The capital of France is", "Paris", "a b c d e f g h the of and", "the of"]
    options = runtime.SamplingParams(max_new_tokens=12)
    alone = [model.generate_text(p, options) for p in prompts]
    collectors = [Collector() for _ in prompts]
    scheduler = Scheduler(model, ServeOptions(max_batch_size=3, prefill_chunk=3)).start()
    try:
        for prompt, collector in zip(prompts, collectors):
            scheduler.submit(model.tokenizer.encode(prompt), options, collector)
        assert all(c.done.wait(60) for c in collectors)
    finally:
        scheduler.stop()
    assert [c.text for c in collectors] == alone
