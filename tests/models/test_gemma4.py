"""models/gemma4.py against transformers' Gemma4ForCausalLM: the tiny configs (every trait), and the real presets'
shapes (configs only, no weights)."""

from __future__ import annotations

import json

import pytest
import torch

from models import config_from_dict, empty_past, position_ids_from_mask, presets, random_model
from models.config import Gemma4TextConfig
from models.loading import load_model
from tests.reference import left_padded_batch, transformers_reference

TINY4 = ["tiny-gemma4", "tiny-gemma4-moe"]  # their parity with transformers: tests/models/test_parity.py


@pytest.mark.parametrize("name", TINY4)
def test_greedy_tokens_equal_transformers_generate(name):
    """24 greedy tokens of a left-padded batch of two, the logits of the last position only (the KV-shared layers
    then run on it alone, as in generate), equal to transformers' generate; and varied (random weights must not
    collapse onto one token, or KV bugs hide)."""
    config = presets.config(name)
    model = random_model(config, seed=3)
    ref = transformers_reference(config, model)
    ids, mask = left_padded_batch(config.vocab_size, [10, 6], seed=4)
    steps = 24
    with torch.no_grad():
        expected = ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, do_sample=False,
                                eos_token_id=None, pad_token_id=config.pad_token_id)[:, ids.shape[1]:]
        past, step, tokens = empty_past(config, 2), ids, []
        for _ in range(steps):
            logits, past = model(step, position_ids_from_mask(mask)[:, -step.shape[1]:], mask, past,
                                 logits_to_keep=1)
            step = logits[:, -1:].argmax(-1)
            tokens.append(step)
            mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], dim=1)
    tokens = torch.cat(tokens, dim=1)
    assert tokens.tolist() == expected.tolist()
    assert all(len(set(row)) >= 8 for row in tokens.tolist())


def test_logits_to_keep_skips_positions_in_shared_layers_only():
    """logits_to_keep=K: the shared layers see the last K positions alone; logits and present are unchanged."""
    config = presets.config("tiny-gemma4")
    model = random_model(config, seed=1)
    ids, mask = left_padded_batch(config.vocab_size, [12, 7])
    with torch.no_grad():
        full, present = model(ids, position_ids_from_mask(mask), mask, empty_past(config, 2))
        for keep in (1, 3, torch.tensor(3)):
            last, present_last = model(ids, position_ids_from_mask(mask), mask, empty_past(config, 2),
                                       logits_to_keep=keep)
            k = int(keep)
            assert last.shape == (2, k, config.vocab_size)
            assert float((full[:, -k:] - last).abs().max()) <= 1e-5
            assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(present, present_last))


def test_past_and_present_exist_for_storing_layers_only():
    config = presets.config("tiny-gemma4")
    model = random_model(config)
    decoder = model.model
    # layers 5-7 (full, sliding, full) read layers 2 and 4, the last storing layers of their type
    assert decoder.kv_source == [0, 1, 2, 3, 4, 2, 4, 2]
    assert config.kv_layers == [0, 1, 2, 3, 4]
    past = empty_past(config, 2)
    assert [k.shape[1:] for k, _ in past] == [(2, 0, 16), (2, 0, 16), (1, 0, 32), (2, 0, 16), (2, 0, 16)]
    ids, mask = left_padded_batch(config.vocab_size, [5, 3])
    with torch.no_grad():
        _, present = model(ids, position_ids_from_mask(mask), mask, past)
    assert len(present) == 5 and present[2][0].shape == (2, 1, 5, 32)
    # shared layers have no K/V weights; global layers with k_eq_v have no v_proj; the double-wide MLP is on
    # shared layers only
    names = set(model.state_dict())
    assert "model.layers.5.self_attn.k_proj.weight" not in names
    assert "model.layers.2.self_attn.v_proj.weight" not in names
    assert "model.layers.3.self_attn.v_proj.weight" in names
    assert model.model.layers[4].mlp.up_proj.out_features == 64
    assert model.model.layers[5].mlp.up_proj.out_features == 128


# Storing layers and KV bytes per token in bf16, windows not counted: with sharing (the model's) and without.
REAL = {
    "gemma-4-e2b": (15, 18_432, 43_008),
    "gemma-4-e4b": (24, 57_344, 100_352),
    "gemma-4-31b": (60, 901_120, 901_120),
    "gemma-4-26b-a4b": (30, 225_280, 225_280),
}


@pytest.mark.parametrize("name", list(REAL))
def test_real_presets_storing_layers_and_kv_bytes(name):
    config = presets.config(name)
    assert isinstance(config, Gemma4TextConfig)
    storing, shared_bytes, unshared_bytes = REAL[name]
    assert len(config.kv_layers) == storing
    assert config.kv_bytes_per_token(2) == shared_bytes
    assert config.kv_bytes_per_token(2, sharing=False) == unshared_bytes
    print(f"{name}: {storing} of {config.num_hidden_layers} layers store KV, {shared_bytes} bytes/token "
          f"({unshared_bytes} without sharing)")
    full = config.layer_types.index("full_attention")
    assert config.layer_dims(full)[0] == 512 and config.layer_dims(0)[0] == 256
    for layer, source in enumerate(config.kv_source):  # a shared layer reads the last storing layer of its type
        assert config.layer_types[source] == config.layer_types[layer] and source in config.kv_layers


def test_multimodal_config_gives_its_text_decoder_and_per_layer_config_is_read():
    text = {k: v for k, v in presets.PRESETS["tiny-gemma4"].items() if k not in ("global_head_dim", "model_type")}
    text["num_global_key_value_heads"] = None
    text["per_layer_config"] = {"02": {"head_dim": 32, "num_key_value_heads": 1},
                                "05": {"head_dim": 32, "num_key_value_heads": 1},
                                "07": {"head_dim": 32, "num_key_value_heads": 1}}
    config = config_from_dict({"model_type": "gemma4", "text_config": {**text, "model_type": "gemma4_text"},
                               "vision_config": {"hidden_size": 8}, "some_future_key": 1})
    assert isinstance(config, Gemma4TextConfig)
    assert [config.layer_dims(i) for i in range(8)] == [presets.config("tiny-gemma4").layer_dims(i) for i in range(8)]
    with pytest.raises(ValueError, match="no earlier layer of that type"):
        config_from_dict({**presets.PRESETS["tiny-gemma4"], "num_kv_shared_layers": 6})


def test_loads_a_multimodal_safetensors_checkpoint(tmp_path):
    """The decoder under model.language_model., beside a vision tower and the shared layers' unused K/V weights
    (which real checkpoints carry): it loads and gives the same logits."""
    from safetensors.torch import save_file

    config = presets.config("tiny-gemma4")
    model = random_model(config, seed=5)
    state = {k.replace("model.", "model.language_model.", 1): v.contiguous()
             for k, v in model.state_dict().items() if k != "lm_head.weight"}
    state["model.vision_tower.encoder.weight"] = torch.zeros(2, 2)
    state["model.language_model.layers.6.self_attn.k_proj.weight"] = torch.zeros(32, 64)
    save_file(state, tmp_path / "model.safetensors")
    text = {k: v for k, v in config.to_dict().items() if k != "model_type"}
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma4", "text_config": text}))
    loaded, _ = load_model(tmp_path, progress=False)
    ids, mask = left_padded_batch(config.vocab_size, [6, 4])
    with torch.no_grad():
        a, _ = model(ids, position_ids_from_mask(mask), mask, empty_past(config, 2))
        b, _ = loaded(ids, position_ids_from_mask(mask), mask, empty_past(config, 2))
    assert torch.equal(a, b)


@pytest.fixture(scope="module")
def converter(tmp_path_factory):
    from pathlib import Path

    from tests.reference import llama_cpp_converter

    script = llama_cpp_converter(Path.home() / ".cache" / "gemma-deploy")
    if script is None:
        pytest.skip("llama-cpp-python's sdist could not be fetched from the package index (its converter is the test)")
    return script


@pytest.mark.parametrize("name", TINY4)
def test_loads_the_gguf_llama_cpps_converter_writes(tmp_path, converter, name):
    """llama.cpp's own convert_hf_to_gguf.py on a tiny folder (float32): the config read back from the `gemma4`
    metadata (per-layer KV heads and FFN widths, the window pattern, the proportional RoPE from rope_freqs...) is the
    folder's, every tensor comes back exactly (norms as w, not 1 + w), and the logits are the same."""
    from tests.reference import convert_to_gguf, save_folder
    from tests.runtime.conftest import write_tokenizer

    config = presets.config(name)
    model = random_model(config, seed=2)
    folder = tmp_path / "hf"
    save_folder(model, folder)
    write_tokenizer(folder)
    values = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**values, "architectures": ["Gemma4ForCausalLM"]}))
    gguf = convert_to_gguf(converter, folder, tmp_path / "model.gguf")

    loaded, ckpt = load_model(gguf, progress=False)
    ours, theirs = ckpt.config.to_dict(), config.to_dict()
    assert {k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k)} <= {"rms_norm_eps", "eos_token_id"}
    assert ours["rms_norm_eps"] == pytest.approx(theirs["rms_norm_eps"])  # stored as float32
    expected = model.state_dict()
    assert all(torch.equal(expected[k], v) for k, v in loaded.state_dict().items())
    ids, mask = left_padded_batch(config.vocab_size, [6, 4])
    with torch.no_grad():
        a, _ = model(ids, position_ids_from_mask(mask), mask, empty_past(config, 2))
        b, _ = loaded(ids, position_ids_from_mask(mask), mask, empty_past(config, 2))
    assert torch.equal(a, b)


# The real presets at their real widths (head dims, heads, KV heads, keys as values, FFN and expert sizes, window)
# on fewer layers and a 1,024-token vocabulary, so that ours and transformers' fit in memory together:
# (layers kept, of them KV-shared).
REAL_WIDTHS = {"gemma-4-e2b": (10, 5), "gemma-4-e4b": (12, 6), "gemma-4-31b": (2, 0), "gemma-4-26b-a4b": (2, 0)}


@pytest.mark.slow  # up to 1.6 G parameters twice (26B-A4B's 128 experts); scripts/test.sh -m slow
@pytest.mark.parametrize("name", list(REAL_WIDTHS))
def test_real_widths_match_transformers(name):
    import dataclasses

    from tests.families import FP32_TOL
    from tests.reference import max_diff, reference_steps, run_steps

    layers, shared = REAL_WIDTHS[name]
    real = presets.config(name)
    types = real.layer_types[:layers - 1] + ["full_attention"]
    config = dataclasses.replace(real, num_hidden_layers=layers, layer_types=types, num_kv_shared_layers=shared,
                                 vocab_size=1024, vocab_size_per_layer_input=1024)
    model = random_model(config, seed=1)
    ref = transformers_reference(config, model)
    ids, mask = left_padded_batch(config.vocab_size, [12, 7])
    decode_ids = torch.randint(3, config.vocab_size, (2, 4), generator=torch.Generator().manual_seed(2))
    worst = max_diff(run_steps(model, config, ids, mask, decode_ids), reference_steps(ref, ids, mask, decode_ids), mask)
    print(f"{name} at its widths, {layers} layers ({shared} KV-shared): max |logit difference| {worst:.2e}")
    assert worst <= FP32_TOL
