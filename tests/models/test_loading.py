"""Weight loading: HF folders (sharded or not), GGUF, random, and the errors bad input gets."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from models import config_from_dict, load_config, presets, random_model
from models.loading import load_model, resolve
from tests.reference import save_folder


@pytest.mark.parametrize("shards", [1, 3])
def test_hf_folder_round_trip(tmp_path, shards):
    model = random_model(presets.config("tiny-gemma2"))
    save_folder(model, tmp_path / "ckpt", shards)
    loaded, ckpt = load_model(tmp_path / "ckpt", progress=False)
    assert ckpt.config.model_type == "gemma2"
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


@pytest.mark.real
def test_gguf_weights_equal_transformers_dequantization(real_model_dir):
    """Our GGUF reader (name map, 1+w norms) gives exactly the tensors transformers derived from it."""
    from models import packaged
    from models.gguf_file import gguf_tensors

    config, count, tensors = gguf_tensors(packaged.gguf_path())
    assert config.model_type == "gemma3_text" and config.sliding_window == 512
    assert config.layer_types == load_config(real_model_dir).layer_types
    with safe_open(real_model_dir / "model.safetensors", framework="pt") as reference:
        seen = 0
        for name, tensor in tensors:
            assert torch.equal(tensor, reference.get_tensor(name)), name
            seen += 1
    assert seen == count == 236


def test_unknown_model_type_lists_supported():
    with pytest.raises(ValueError, match=r"model_type 'llama' is not supported; supported: gemma, gemma2"):
        config_from_dict({"model_type": "llama"})


def test_every_family_is_known_to_the_runtime_and_the_tests():
    """A family is one entry of models/families.py; the runtime, which imports nothing of models/, lists the same
    families and tasks, and tests/families.py has a tiny config of each."""
    from models import FAMILIES, TASKS
    from runtime import spec
    from tests.families import FAMILY_OF

    assert tuple(FAMILIES) == spec.FAMILIES and TASKS == spec.TASKS
    assert set(FAMILY_OF.values()) == set(FAMILIES)
    assert all(f.model_type == t and f.config_class().model_type == t for t, f in FAMILIES.items())


def test_a_config_class_is_one_familys():
    from models import GemmaConfig

    with pytest.raises(ValueError, match="model_type 'gemma2' given to GemmaConfig, the config of 'gemma'"):
        GemmaConfig(model_type="gemma2")


def test_missing_path():
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve("/nonexistent/gemma.gguf")
    with pytest.raises(FileNotFoundError, match="neither an existing folder"):
        resolve("./no/such/folder")


def test_truncated_weight_file_is_named(tmp_path):
    save_folder(random_model(presets.config("tiny-gemma-2b")), tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match="model.safetensors.*(corrupted or truncated|cannot be read)"):
        load_model(tmp_path, progress=False)


def test_missing_weight_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(presets.config("tiny-gemma-2b").to_dict()))
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(FileNotFoundError, match="pytorch_model.bin: pickle files are not loaded"):
        load_model(tmp_path, progress=False)


def test_wrong_shape_names_the_tensor(tmp_path):
    model = random_model(presets.config("tiny-gemma-2b"))
    save_folder(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["intermediate_size"] = 100
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"tensor 'model.layers.0.mlp.\w+_proj.weight' has shape .* expects .*100"):
        load_model(tmp_path, progress=False)


def test_gguf_of_another_architecture(tmp_path):
    import gguf
    import numpy as np

    path = tmp_path / "llama.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=r"holds a 'llama' model; supported GGUF architectures: gemma, gemma2, gemma3"):
        resolve(path)


def test_corrupted_gguf(tmp_path):
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"GGUF" + b"\x00" * 7)
    with pytest.raises(ValueError, match="is not a readable GGUF file"):
        resolve(path)


def test_hub_name_without_cache_fails_fast(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="not in the local Hugging Face cache.*--model /path/to/gemma-2b"):
        resolve("google/gemma-2b")


def test_random_preset_and_unknown_preset():
    assert resolve("random:gemma-7b").config.num_key_value_heads == 16
    with pytest.raises(ValueError, match="unknown preset 'gemma-9x'"):
        resolve("random:gemma-9x")
