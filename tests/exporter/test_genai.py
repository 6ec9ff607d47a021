"""--target ort artifacts carry genai_config.json: onnxruntime-genai runs them and decodes the same greedy
tokens as our runtime."""

from __future__ import annotations

import json

import numpy as np
import pytest

from exporter import ExportOptions, export

og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is in the test extra")


def _genai_greedy(folder, prompt, max_length):
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=max_length)
    generator = og.Generator(model, params)
    generator.append_tokens(np.array([prompt], dtype=np.int32))
    tokens = []
    while not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    return tokens


@pytest.mark.parametrize("name,options", [
    ("tiny-gemma3", {}),
    ("tiny-gemma2", {"quant": "int4", "accuracy_level": 1}),
])
def test_onnxruntime_genai_runs_the_artifact_with_our_greedy_tokens(tmp_path, name, options):
    import runtime

    manifest = export(f"random:{name}", tmp_path / "a", ExportOptions(target="ort", kv_cache="dynamic", progress=False,
                                                                      **options))
    assert "genai_config.json" in manifest.files
    genai = json.loads((tmp_path / "a" / "genai_config.json").read_text())
    assert genai["model"]["decoder"]["num_key_value_heads"] == manifest.model.num_key_value_heads
    prompt = [2, 17, 30, 41, 99]
    theirs = _genai_greedy(tmp_path / "a", prompt, max_length=len(prompt) + 16)
    ours = runtime.load(tmp_path / "a").generate([prompt], max_new_tokens=len(theirs))[0][len(prompt):].tolist()
    assert len(theirs) >= 4 and ours[: len(theirs)] == theirs


def test_no_genai_config_where_genai_could_not_run_it(tmp_path):
    onnx_target = export("random:tiny-gemma3", tmp_path / "a", ExportOptions(verify=False, progress=False))
    assert "genai_config.json" not in onnx_target.files
