"""The artifact's tokenizer (`tokenizers`, from tokenizer.json) with <bos> handled as transformers does,
left-padded batches, and a streaming decoder that emits text pieces as they become complete."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


class Tokenizer:
    def __init__(self, tokenizer, bos_token_id: int | None, add_bos_token: bool, pad_token_id: int = 0):
        self.tokenizer = tokenizer
        self.bos_token_id = bos_token_id
        self.add_bos_token = add_bos_token
        self.pad_token_id = pad_token_id
        self.bos_token = tokenizer.id_to_token(bos_token_id) if bos_token_id is not None else ""

    @classmethod
    def from_dir(cls, folder: str | Path, bos_token_id: int | None = None, pad_token_id: int = 0) -> "Tokenizer":
        from tokenizers import Tokenizer as _Tokenizer

        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist: this artifact takes token ids only (export with --tokenizer)")
        tokenizer = _Tokenizer.from_file(str(path))
        config = {}
        if (folder / "tokenizer_config.json").is_file():
            config = json.loads((folder / "tokenizer_config.json").read_text())
        if bos_token_id is None:
            bos_token_id = tokenizer.token_to_id(config.get("bos_token") or "<bos>")
        return cls(tokenizer, bos_token_id, bool(config.get("add_bos_token", True)), pad_token_id)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def token_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Ids with exactly one leading <bos> when add_bos_token says so, whatever tokenizer.json's
        post-processor does (Gemma 3's adds it, some Gemma 1 files rely on tokenizer_config instead)."""
        ids = self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids
        if not add_special_tokens or self.bos_token_id is None:
            return ids
        has_bos = bool(ids) and ids[0] == self.bos_token_id and not text.startswith(self.bos_token)
        if self.add_bos_token and not has_bos:
            return [self.bos_token_id, *ids]
        if not self.add_bos_token and has_bos:
            return ids[1:]
        return ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Left-padded ids and attention mask [batch, longest]."""
        return left_pad([self.encode(t, add_special_tokens) for t in texts], self.pad_token_id)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def stream_decoder(self, skip_special_tokens: bool = True) -> "StreamDecoder":
        return StreamDecoder(self, skip_special_tokens)


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    if not sequences or any(len(s) == 0 for s in sequences):
        raise ValueError("every prompt must have at least one token")
    width = max(len(s) for s in sequences)
    ids = np.full((len(sequences), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(sequences), width), dtype=np.int64)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq) :] = seq
        mask[row, width - len(seq) :] = 1
    return ids, mask


class StreamDecoder:
    """Incremental detokenization (the offsets scheme of text-generation-inference): a piece is emitted
    once it decodes to complete characters, so byte-fallback tokens of one multi-byte character and
    SentencePiece's spaces come out right; the pieces concatenate to the full decode."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0  # start of the window decoded for context
        self.read = 0  # end of what was already emitted

    def push(self, token: int) -> str:
        self.ids.append(int(token))
        before = self.tokenizer.decode(self.ids[self.prefix : self.read], self.skip)
        after = self.tokenizer.decode(self.ids[self.prefix :], self.skip)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        """What is left at the end (an incomplete character shows as U+FFFD, as a full decode would)."""
        before = self.tokenizer.decode(self.ids[self.prefix : self.read], self.skip)
        after = self.tokenizer.decode(self.ids[self.prefix :], self.skip)
        self.prefix = self.read = len(self.ids)
        return after[len(before) :]
