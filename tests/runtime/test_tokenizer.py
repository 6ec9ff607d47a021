"""The runtime tokenizer against transformers' AutoTokenizer (the tiny Gemma-style tokenizer always,
the real Gemma 3 tokenizer under the `real` mark), and streaming decode."""

from __future__ import annotations

import json
import shutil

import pytest

from runtime.tokenizer import Tokenizer

TEXTS = [
    "The capital of France is",
    "  leading spaces",
    "Ünïcödé — 世界 🎉 naïve café",
    "<start_of_turn>user\nhi",
    "<bos>written bos",
    "a\u00a0b\tc\n\nd",
    "日本語のテキスト、한국어 텍스트, Ελληνικά",
    "🎉🎉 x \U0001d11e",
]


@pytest.fixture(scope="module", params=["tiny", pytest.param("real", marks=pytest.mark.real)])
def folder(request, tiny_tokenizer_dir):
    return tiny_tokenizer_dir if request.param == "tiny" else request.getfixturevalue("real_model_dir")


@pytest.fixture(scope="module")
def tokenizer(folder):
    return Tokenizer.from_dir(folder)


@pytest.fixture(scope="module")
def reference(folder):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("text", TEXTS)
def test_encode_and_decode_match_transformers(tokenizer, reference, text):
    ids = tokenizer.encode(text)
    assert ids == reference(text).input_ids
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids) == reference.decode(ids, skip_special_tokens=True)
    assert tokenizer.decode(ids, skip_special_tokens=False) == reference.decode(ids)
    assert tokenizer.encode(text, add_special_tokens=False) == reference(text, add_special_tokens=False).input_ids


def test_batch_is_left_padded_as_transformers(tokenizer, reference):
    ids, mask = tokenizer.encode_batch(TEXTS[:3])
    expected = reference(TEXTS[:3], padding=True, padding_side="left")
    assert ids.tolist() == expected.input_ids
    assert mask.tolist() == expected.attention_mask


@pytest.mark.parametrize("add_bos_token", [True, False])
@pytest.mark.parametrize("post_processor", [True, False])
def test_bos_is_added_once_as_add_bos_token_says(folder, tmp_path, add_bos_token, post_processor):
    """An explicit add_bos_token decides whatever tokenizer.json's post-processor does: never doubled,
    never lost. (transformers 5 ignores the key and follows the post-processor; they agree on Gemma's files.)"""
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": add_bos_token}))
    data = json.loads((folder / "tokenizer.json").read_text())
    if not post_processor:
        data["post_processor"] = None
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    tokenizer = Tokenizer.from_dir(tmp_path)
    plain = tokenizer.encode("Hello there", add_special_tokens=False)
    assert tokenizer.encode("Hello there") == ([tokenizer.bos_token_id] if add_bos_token else []) + plain


def test_without_add_bos_token_the_post_processor_decides(folder, tmp_path):
    shutil.copy(folder / "tokenizer.json", tmp_path / "tokenizer.json")
    assert Tokenizer.from_dir(tmp_path).add_bos_token  # Gemma's post-processor adds <bos>
    assert Tokenizer.from_dir(tmp_path, add_bos_token=False).encode("Hello")[0] != 2


@pytest.mark.parametrize("text", TEXTS)
def test_stream_concatenates_to_the_full_decode(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    decoder = tokenizer.stream_decoder()
    pieces = [decoder.push(t) for t in ids] + [decoder.flush()]
    assert "".join(pieces) == tokenizer.decode(ids)
    assert not any("\ufffd" in p for p in pieces)


def test_byte_fallback_characters_are_emitted_whole(tokenizer):
    # A rare character encodes as byte tokens <0x..>: it comes out in one piece, never as U+FFFD halves.
    for char in ("\U0001d11e", "🎉", "é"):
        ids = tokenizer.encode(char + " and " + char, add_special_tokens=False)
        decoder = tokenizer.stream_decoder()
        pieces = [decoder.push(t) for t in ids] + [decoder.flush()]
        assert "".join(pieces) == char + " and " + char
        assert not any("\ufffd" in p for p in pieces)
        assert sum(p.count(char) for p in pieces) == 2


def test_an_incomplete_character_ends_as_in_the_full_decode(tokenizer):
    ids = tokenizer.encode("🎉", add_special_tokens=False)[:-1]
    decoder = tokenizer.stream_decoder()
    pieces = [decoder.push(t) for t in ids] + [decoder.flush()]
    assert "".join(pieces) == tokenizer.decode(ids)


def test_empty_prompt_in_a_batch_is_refused(tokenizer):
    with pytest.raises(ValueError, match="prompt 1 has no tokens"):
        tokenizer.encode_batch(["hi", ""], add_special_tokens=False)


def test_decode_stream_still_differs_on_invalid_byte_runs(tokenizer):
    """Why StreamDecoder is ours and not tokenizers' DecodeStream: on a byte run that is not UTF-8 DecodeStream
    emits its ASCII bytes, where the full decode gives U+FFFD for each byte. When this fails, DecodeStream agrees
    with the full decode: switch StreamDecoder to it."""
    from tokenizers.decoders import DecodeStream

    ids = [tokenizer.token_id(f"<0x{b:02X}>") for b in (0x56, 0x80, 0x6D)]  # 'V', a stray continuation byte, 'm'
    full = tokenizer.decode(ids)
    stream = DecodeStream(skip_special_tokens=True)
    theirs = "".join(stream.step(tokenizer.tokenizer, i) or "" for i in ids)
    decoder = tokenizer.stream_decoder()
    ours = "".join([decoder.push(i) for i in ids] + [decoder.flush()])
    assert ours == full == "\ufffd" * 3
    assert theirs != full
