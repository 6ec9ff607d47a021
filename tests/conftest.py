"""Shared fixtures: the packaged real model (prepared once per machine) and transformers references."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def real_model_dir():
    """Hugging Face folder of the real Gemma 3 270M, dequantized from the packaged GGUF."""
    from models import packaged

    return packaged.prepare()


@pytest.fixture(scope="session")
def real_reference(real_model_dir):
    """transformers' own Gemma3ForCausalLM on the real weights: the PyTorch reference."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(real_model_dir, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def real_tokenizer(real_model_dir):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(real_model_dir)
