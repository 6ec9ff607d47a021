"""The artifact directory: written to a temporary sibling and renamed into place only when complete.

An export killed half-way leaves a `.NAME.partial-PID` folder (removed by the next export) and never
something that loads: the manifest, which the runtime requires, is the last file written.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from importlib import metadata
from pathlib import Path

from runtime.chat import DEFAULT_CHAT_TEMPLATE
from runtime.manifest import MANIFEST_NAME, GenerationSpec

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


class ArtifactDir:
    """`with ArtifactDir(output, overwrite) as tmp:` fill `tmp`; on success it becomes `output`."""

    def __init__(self, output: str | Path, overwrite: bool = False):
        self.output = Path(output).resolve()
        self.overwrite = overwrite
        if self.output.exists() and not overwrite:
            raise FileExistsError(f"{self.output} already exists; pass --overwrite to replace it")
        self.tmp = self.output.with_name(f".{self.output.name}.partial-{os.getpid()}")

    def __enter__(self) -> Path:
        self.output.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_partials(self.output)
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir()
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        if not (self.tmp / MANIFEST_NAME).is_file():
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise RuntimeError("internal error: the artifact was closed without a manifest")
        old = self.output.with_name(f".{self.output.name}.old-{os.getpid()}")
        if self.output.exists():
            os.replace(self.output, old)
        os.replace(self.tmp, self.output)
        shutil.rmtree(old, ignore_errors=True)


def _remove_stale_partials(output: Path) -> None:
    for path in output.parent.glob(f".{output.name}.partial-*"):
        pid = path.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            log.info("removing %s left by an interrupted export", path)
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_tokenizer_files(ckpt, destination: Path, tokenizer_dir: Path | None = None) -> list[str]:
    """Copy the tokenizer, its config, the generation config and the chat template; returns the names.

    A GGUF source carries its tokenizer inside: transformers converts it to tokenizer.json once.
    The chat template goes to chat_template.jinja (Gemma's own when the source has none).
    """
    source = Path(tokenizer_dir) if tokenizer_dir else ckpt.folder
    written = []
    if source is not None and not (source / "tokenizer.json").is_file() and ckpt.gguf is not None and not tokenizer_dir:
        import transformers

        log.info("converting the tokenizer stored in %s", ckpt.gguf.name)
        tokenizer = transformers.AutoTokenizer.from_pretrained(ckpt.gguf.parent, gguf_file=ckpt.gguf.name)
        tokenizer.save_pretrained(destination)
        written = [n for n in TOKENIZER_FILES if (destination / n).is_file()]
        source = None
    if source is not None:
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copyfile(source / name, destination / name)
                written.append(name)
    if "tokenizer.json" not in written:
        log.warning("no tokenizer.json for %s: the artifact takes token ids only", ckpt.source)
        return written
    template = _chat_template(source or destination)
    if template is None:
        log.info("the source has no chat template; writing Gemma's")
        template = DEFAULT_CHAT_TEMPLATE
    (destination / "chat_template.jinja").write_text(template)
    return [*written, "chat_template.jinja"]


def _chat_template(folder: Path) -> str | None:
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text()
    config = folder / "tokenizer_config.json"
    if config.is_file():
        template = json.loads(config.read_text()).get("chat_template")
        if isinstance(template, str):
            return template
    return None


def generation_spec(config, folder: Path) -> GenerationSpec:
    """The special tokens, from the config and the files written to `folder`."""
    return GenerationSpec(bos_token_id=config.bos_token_id, eos_token_ids=tuple(end_token_ids(config, folder)),
                          pad_token_id=config.pad_token_id, add_bos_token=add_bos_token(folder))


def end_token_ids(config, destination: Path) -> list[int]:
    """The model's end tokens: the config's eos, the generation config's, and <end_of_turn> if in the vocabulary."""
    ids = list(config.eos_token_ids)
    generation = destination / "generation_config.json"
    if generation.is_file():
        eos = json.loads(generation.read_text()).get("eos_token_id")
        ids += eos if isinstance(eos, list) else [eos] if eos is not None else []
    tokenizer = destination / "tokenizer.json"
    if tokenizer.is_file():
        from tokenizers import Tokenizer

        end_of_turn = Tokenizer.from_file(str(tokenizer)).token_to_id("<end_of_turn>")
        if end_of_turn is not None:
            ids.append(end_of_turn)
    return sorted(set(ids))


def add_bos_token(destination: Path) -> bool:
    config = destination / "tokenizer_config.json"
    if config.is_file():
        return bool(json.loads(config.read_text()).get("add_bos_token", True))
    return True


def tool_versions() -> dict[str, str]:
    versions = {}
    for name in ("gemma-deploy", "torch", "transformers", "onnx", "onnxscript", "onnxruntime"):
        try:
            versions[name.replace("-", "_")] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions
