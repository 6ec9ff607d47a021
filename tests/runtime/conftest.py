"""Runtime fixtures: a tiny Gemma-style tokenizer (byte fallback, SentencePiece spaces, Gemma's special
token ids) that fits tiny-gemma3's 512-entry vocabulary, and the tiny artifacts with it, so that text
generation, streaming, stop strings and chat run without the real model."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import string
from pathlib import Path

import pytest

from runtime.chat import DEFAULT_CHAT_TEMPLATE
from runtime.manifest import read_manifest, write_manifest

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]  # ids 0..6 as Gemma's first
END_OF_TURN = 6
WORDS = ["▁the", "▁of", "▁and", "▁is", "▁capital", "▁France", "▁Paris", "user", "model", "▁a", "▁in", "▁to"]


def tiny_tokenizer(vocab_size: int = 512):
    """A BPE with byte fallback, `▁` for spaces and Gemma's decoder and <bos> post-processor."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE

    vocab = {token: i for i, token in enumerate(SPECIALS)}
    vocab.update({f"<0x{b:02X}>": len(vocab) + b for b in range(256)})
    for char in "▁" + string.ascii_letters + string.digits + ".,!?'":
        vocab[char] = len(vocab)
    merges = []
    for word in WORDS:  # each word built left to right from its characters
        for end in range(2, len(word) + 1):
            left, right = word[: end - 1], word[end - 1]
            if word[:end] not in vocab:
                vocab[word[:end]] = len(vocab)
                merges.append((left, right))
    assert len(vocab) <= vocab_size, len(vocab)
    while len(vocab) < vocab_size:  # pieces no text encodes to, so that every id the model samples decodes
        vocab[f"▁w{len(vocab)}"] = len(vocab)
    tokenizer = Tokenizer(BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tokenizer.normalizer = normalizers.Replace(" ", "▁")
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B",
                                                             special_tokens=[("<bos>", 2)])
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    return tokenizer


def write_tokenizer(folder, add_bos_token=None) -> None:
    tiny_tokenizer().save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<bos>", "eos_token": "<eos>",
              "pad_token": "<pad>", "unk_token": "<unk>"}
    if add_bos_token is not None:
        config["add_bos_token"] = add_bos_token
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-tokenizer")
    write_tokenizer(folder)
    return folder


def add_text_files(source, destination):
    """A copy of an artifact with the tiny tokenizer, Gemma's chat template and <end_of_turn> as an end token."""
    shutil.copytree(source, destination)
    write_tokenizer(destination, add_bos_token=True)
    (destination / "chat_template.jinja").write_text(DEFAULT_CHAT_TEMPLATE)
    manifest = read_manifest(destination, verify=False)
    generation = dataclasses.replace(manifest.generation, eos_token_ids=(1, END_OF_TURN))
    write_manifest(destination, dataclasses.replace(manifest, generation=generation))
    return destination


@pytest.fixture(scope="session")
def tiny_text_artifacts(tiny_artifacts, tmp_path_factory):
    """tiny_artifacts (dynamic and static KV) with a tokenizer and a chat template."""
    root = tmp_path_factory.mktemp("tiny-text")
    return {layout: add_text_files(folder, root / layout) for layout, folder in tiny_artifacts.items()}


@pytest.fixture(scope="session")
def tiny_torch():
    """tiny-gemma3 in PyTorch: seed 0, as `random:tiny-gemma3` exports it."""
    from models import presets, random_model

    return random_model(presets.config("tiny-gemma3"))


@pytest.fixture(scope="session")
def real_artifact(request):
    """GEMMA_DEPLOY_REAL_ARTIFACT=DIR runs the runtime's `real` tests on an artifact exported earlier
    (gemma-export --model gemma3-270m); without it the session exports one (tests/conftest.py)."""
    folder = os.environ.get("GEMMA_DEPLOY_REAL_ARTIFACT")
    if folder:
        return Path(folder)
    return request.getfixturevalue("real_artifact")
