"""The artifact's tokenizer: `tokenizers` on tokenizer.json, <bos> as transformers adds it, left-padded
batches, and a streaming decoder whose pieces concatenate to the full decode.

<bos>: transformers 5 takes tokenizer.json's post-processor as it is (Gemma's adds <bos>) and drops
add_bos_token from tokenizer_config.json; transformers 4 rebuilt the post-processor from add_bos_token.
Here an explicit add_bos_token (the manifest's, else tokenizer_config.json's) decides, and without one
the post-processor does: the two agree on every Gemma checkpoint, and <bos> is never doubled.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


class Tokenizer:
    def __init__(self, tokenizer, bos_token: str | None = "<bos>", add_bos_token: bool | None = None,
                 pad_token_id: int = 0):
        """`tokenizer` is a tokenizers.Tokenizer; add_bos_token None follows its post-processor."""
        self.tokenizer = tokenizer
        self.bos_token = bos_token or ""
        self.bos_token_id = tokenizer.token_to_id(bos_token) if bos_token else None
        self.pad_token_id = pad_token_id
        self.special_ids = {i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
        # What the post-processor adds in front of a text (Gemma's: <bos>), found once by encoding "".
        specials = tokenizer.encode("", add_special_tokens=True).ids
        self._post_adds_bos = bool(specials) and specials[0] == self.bos_token_id
        self.add_bos_token = self._post_adds_bos if add_bos_token is None else bool(add_bos_token)
        if self.add_bos_token and self.bos_token_id is None:
            raise ValueError(f"add_bos_token is set but the bos token {bos_token!r} is not in the vocabulary")

    @classmethod
    def from_dir(cls, folder: str | Path, add_bos_token: bool | None = None, pad_token_id: int = 0) -> "Tokenizer":
        """tokenizer.json and (if present) tokenizer_config.json of a folder; an explicit `add_bos_token`
        wins over tokenizer_config.json's."""
        from tokenizers import Tokenizer as _Tokenizer

        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist: this artifact takes token ids only (export with a tokenizer)")
        config = {}
        if (folder / "tokenizer_config.json").is_file():
            config = json.loads((folder / "tokenizer_config.json").read_text())
        if add_bos_token is None:
            add_bos_token = config.get("add_bos_token")
        return cls(_Tokenizer.from_file(str(path)), _token_text(config.get("bos_token", "<bos>")), add_bos_token,
                   pad_token_id)

    @classmethod
    def for_artifact(cls, manifest) -> "Tokenizer":
        """The tokenizer an artifact ships, with its manifest's add_bos_token and pad id."""
        generation = manifest.generation
        return cls.from_dir(manifest.folder, generation.add_bos_token if generation else None,
                            generation.pad_token_id if generation else 0)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def token_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids; with add_special_tokens, one leading <bos> when add_bos_token (a <bos> written in
        the text stays, as in transformers: "<bos>hi" gives two)."""
        # encode_batch releases the GIL (encode holds it): a long prompt tokenized in a server's worker thread
        # leaves the event loop running
        ids = self.tokenizer.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        if not add_special_tokens:
            return ids
        if self._post_adds_bos:
            ids = ids[1:]
        return [self.bos_token_id, *ids] if self.add_bos_token else ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Left-padded ids and attention mask, both [batch, longest] int64."""
        return left_pad([self.encode(t, add_special_tokens) for t in texts], self.pad_token_id)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def stream_decoder(self, skip_special_tokens: bool = True) -> "StreamDecoder":
        return StreamDecoder(self, skip_special_tokens)

    def is_byte_token(self, token: int) -> bool:
        """A byte-fallback token, <0x00> .. <0xFF>."""
        piece = self.tokenizer.id_to_token(int(token))
        return piece is not None and len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">")


def _token_text(token) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    return token.get("content") if isinstance(token, dict) else token


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """ids and attention mask [batch, longest] int64, each sequence right-aligned (left padding)."""
    if not sequences:
        raise ValueError("no prompts: expected at least one")
    for i, seq in enumerate(sequences):
        if len(seq) == 0:
            raise ValueError(f"prompt {i} has no tokens; every prompt needs at least one")
    width = max(len(s) for s in sequences)
    ids = np.full((len(sequences), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(sequences), width), dtype=np.int64)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq) :] = seq
        mask[row, width - len(seq) :] = 1
    return ids, mask


class StreamDecoder:
    """Incremental detokenization (text-generation-inference's offsets): each new token is decoded
    together with the tokens since the last emitted piece, and text is emitted only when it ends in
    complete characters and not inside a run of byte-fallback tokens, so the bytes of one character
    (<0xF0><0x9F><0x8E><0x89>) come out as one piece, invalid byte runs as the full decode shows them,
    and SentencePiece's spaces are right. The pieces concatenate to the full decode.

    tokenizers' own DecodeStream (0.23) agrees on valid text but not on a byte run that is not UTF-8: it emits
    ASCII bytes of the run as themselves (or nothing), where the full decode (ByteFallback) makes every byte of the
    run U+FFFD, so a streamed reply would differ from the returned one: <0x56><0x80><0x6D> streams "V" and decodes
    to three U+FFFD. tests/runtime/test_tokenizer.py keeps the case, to switch once it agrees."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0  # start of the context window
        self.read = 0  # end of what was already emitted

    def push(self, token: int) -> str:
        """Add a token; returns the text it completes ("" while a character is incomplete)."""
        self.ids.append(int(token))
        if self.tokenizer.is_byte_token(token) or (self.skip and token in self.tokenizer.special_ids):
            # tokenizers' ByteFallback decodes a run of byte tokens as a whole (skipped special tokens
            # do not break a run), and when the run is not valid UTF-8 every byte of it becomes U+FFFD,
            # the ASCII ones included: nothing is final before the run ends.
            return ""
        before = self.tokenizer.decode(self.ids[self.prefix : self.read], self.skip)
        after = self.tokenizer.decode(self.ids[self.prefix :], self.skip)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        """What is left at the end (an incomplete character shows as U+FFFD, as in the full decode)."""
        before = self.tokenizer.decode(self.ids[self.prefix : self.read], self.skip)
        after = self.tokenizer.decode(self.ids[self.prefix :], self.skip)
        self.prefix = self.read = len(self.ids)
        return after[len(before) :]
