"""The runtime tokenizer against transformers' (the real Gemma 3 tokenizer), and streaming decode."""

from __future__ import annotations

import json
import shutil

import pytest

from runtime.chat import ChatTemplate
from runtime.tokenizer import Tokenizer

pytestmark = pytest.mark.real

TEXTS = ["The capital of France is", "  leading spaces", "Ünïcödé — 世界 🎉 naïve café", "<start_of_turn>user\nhi"]


@pytest.fixture(scope="module")
def tokenizer(real_model_dir):
    return Tokenizer.from_dir(real_model_dir)


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_transformers(tokenizer, real_tokenizer, text):
    assert tokenizer.encode(text) == real_tokenizer(text).input_ids
    assert tokenizer.encode(text)[0] == 2 and tokenizer.encode(text)[1] != 2


def test_add_bos_token_false_is_respected(real_model_dir, tmp_path):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(real_model_dir / name, tmp_path / name)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": False}))
    assert Tokenizer.from_dir(tmp_path).encode("Hello")[0] != 2


def test_batch_is_left_padded(tokenizer, real_tokenizer):
    ids, mask = tokenizer.encode_batch(TEXTS[:2])
    real_tokenizer.padding_side = "left"
    expected = real_tokenizer(TEXTS[:2], padding=True)
    assert ids.tolist() == expected.input_ids
    assert mask.tolist() == expected.attention_mask


@pytest.mark.parametrize("text", TEXTS[1:3] + ["a\u00a0b\tc\n\nd", "🎉🎉 x"])
def test_stream_concatenates_to_the_full_decode(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    decoder = tokenizer.stream_decoder()
    pieces = [decoder.push(t) for t in ids] + [decoder.flush()]
    assert "".join(pieces) == tokenizer.decode(ids)
    assert not any("\ufffd" in p for p in pieces)


def test_byte_fallback_characters_are_emitted_whole(tokenizer):
    # A rare character encodes as byte tokens <0x..>: nothing is emitted until it is complete.
    ids = tokenizer.encode("\U0001d11e", add_special_tokens=False)
    decoder = tokenizer.stream_decoder()
    pieces = [decoder.push(t) for t in ids]
    assert "".join(pieces) == "\U0001d11e" and all(p in ("", "\U0001d11e") for p in pieces)


def test_chat_template_matches_transformers(real_model_dir, real_tokenizer):
    from exporter.artifact import DEFAULT_CHAT_TEMPLATE

    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
    ]
    ours = ChatTemplate(DEFAULT_CHAT_TEMPLATE).render(messages)
    theirs = real_tokenizer.apply_chat_template(messages, chat_template=DEFAULT_CHAT_TEMPLATE, tokenize=False,
                                                add_generation_prompt=True)
    assert ours == theirs
    assert ours.endswith("<start_of_turn>model\n") and ours.startswith("<bos><start_of_turn>user\nAnswer briefly.")
    with pytest.raises(ValueError, match="roles must alternate"):
        ChatTemplate(DEFAULT_CHAT_TEMPLATE).render([{"role": "assistant", "content": "x"}])
