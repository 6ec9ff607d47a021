"""An artifact's manifest.json: the contract between the exporter (which writes it) and the runtime.

    read_manifest(folder)            the validated Manifest, or ArtifactError naming the field or file
    write_manifest(folder, data)     list every file with size and sha256, then write manifest.json last
    file_digest(path)                sha256 of a file, streamed in 1 MiB blocks

Refused, with a message that names the field or the file: a directory without manifest.json (an export
that did not finish), an unknown schema_version or kind, a missing field, a missing or altered file
(size, then sha256), and I/O names that disagree with the KV cache description.

This module imports the standard library only: the exporter uses it to write what the runtime reads.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

MANIFEST_NAME = "manifest.json"
SCHEMA_VERSION = 1
KIND = "gemma-deploy-artifact"
REQUIRED = ("schema_version", "kind", "task", "target", "family", "config", "dtype", "io", "files")
TASKS = ("text-generation", "feature-extraction", "sequence-classification", "token-classification")
TARGETS = ("onnx", "ort", "trt")
FAMILIES = ("gemma", "gemma2", "gemma3_text")
KV_LAYOUTS = ("dynamic", "static")
LOGITS = ("all", "last")
DECODER_INPUTS = ("input_ids", "attention_mask", "position_ids")


def kv_names(prefix: str, num_layers: int) -> list[str]:
    """Graph names of the KV tensors: kv_names("past_key_values", 2) -> past_key_values.0.key, .0.value, .1.key..."""
    return [f"{prefix}.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]


def _from_known(cls, data: dict):
    """A dataclass from the keys it knows (a newer exporter may write more)."""
    return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


class ArtifactError(ValueError):
    """The artifact cannot be used as it is; the message says what is wrong and what to do."""


@dataclass(frozen=True)
class KVCacheSpec:
    """manifest["kv_cache"]: how the graph takes and gives its past keys and values."""

    layout: str = "dynamic"  # dynamic: past grows each step; static: buffers of max_length slots
    max_length: int | None = None
    num_layers: int = 0
    num_kv_heads: int = 0
    head_dim: int = 0
    dtype: str = "float32"
    sliding_window: int | None = None
    sliding_window_layers: list[int] = field(default_factory=list)
    shares_buffers: bool = False  # True: past and present may be bound to one buffer (fused in-place attention)

    @classmethod
    def from_dict(cls, data: dict) -> "KVCacheSpec":
        return _from_known(cls, data)


@dataclass(frozen=True)
class GenerationSpec:
    """manifest["generation"]: special tokens and the context the graph was exported for."""

    bos_token_id: int | None = 2
    eos_token_ids: list[int] = field(default_factory=lambda: [1])
    pad_token_id: int = 0
    add_bos_token: bool | None = None  # None: as tokenizer.json's post-processor does
    context_length: int | None = None

    @classmethod
    def from_dict(cls, data: dict) -> "GenerationSpec":
        return _from_known(cls, data)


@dataclass(frozen=True)
class Manifest:
    """A validated manifest. `data` is the JSON as written; the typed views cover what the runtime uses,
    and `manifest["key"]` / `manifest.get("key")` read any other field."""

    folder: Path
    data: dict

    def __getitem__(self, key):
        return self.data[key]

    def get(self, key, default=None):
        return self.data.get(key, default)

    @property
    def task(self) -> str:
        return self.data["task"]

    @property
    def target(self) -> str:
        return self.data["target"]

    @property
    def family(self) -> str:
        return self.data["family"]

    @property
    def dtype(self) -> str:
        return self.data["dtype"]

    @property
    def logits(self) -> str:
        return self.data.get("logits") or "all"

    @property
    def kv_cache(self) -> dict:
        """The raw kv_cache section ({} for graphs without a cache)."""
        return self.data.get("kv_cache") or {}

    @property
    def kv(self) -> KVCacheSpec:
        return KVCacheSpec.from_dict(self.kv_cache)

    @property
    def generation(self) -> dict:
        """The raw generation section."""
        return self.data.get("generation") or {}

    @property
    def generation_spec(self) -> GenerationSpec:
        return GenerationSpec.from_dict(self.generation)

    @property
    def input_names(self) -> list[str]:
        return list(self.data["io"]["inputs"])

    @property
    def output_names(self) -> list[str]:
        return list(self.data["io"]["outputs"])

    @property
    def past_names(self) -> list[str]:
        return [n for n in self.input_names if n.startswith("past_key_values.")]

    @property
    def present_names(self) -> list[str]:
        return [n for n in self.output_names if n.startswith("present.")]

    def path(self, name: str) -> Path:
        return self.folder / name


# -- writing (the exporter) ---------------------------------------------------------------------------


def file_digest(path: str | Path, block_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in blocks (1 MiB) so that a multi-GB weight file never sits in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(block_size):
            digest.update(block)
    return digest.hexdigest()


sha256 = file_digest  # the name the exporter imported first


def write_manifest(folder: str | Path, manifest: dict) -> dict:
    """Record every file of `folder` (recursively, manifest.json aside) with its size and sha256 under
    "files", then write manifest.json atomically and last: a directory with a manifest is complete.
    Returns the manifest as written."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_NAME and not _is_temp(p))
    data = {
        "schema_version": SCHEMA_VERSION,
        "kind": KIND,
        **manifest,
        "files": {p.relative_to(folder).as_posix(): {"sha256": file_digest(p), "size": p.stat().st_size} for p in files},
    }
    tmp = folder / f".{MANIFEST_NAME}.tmp"
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, folder / MANIFEST_NAME)
    return data


def _is_temp(path: Path) -> bool:
    return path.name.startswith(".") and path.name.endswith(".tmp")


# -- reading (the runtime) ----------------------------------------------------------------------------


def read_manifest(folder: str | Path, verify: bool = True) -> Manifest:
    """The validated manifest of an artifact directory. `verify=False` checks that every file is there
    with its size but skips the sha256 pass (about a second per GB)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ArtifactError(f"artifact {folder} does not exist or is not a directory; export one with gemma-export")
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise ArtifactError(
            f"{folder} has no {MANIFEST_NAME}: the artifact is incomplete (an interrupted export or copy); "
            "export it again"
        )
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path} is not valid JSON ({e}); export the artifact again") from e
    if not isinstance(data, dict):
        raise ArtifactError(f"{path} must hold a JSON object, got {type(data).__name__}; export the artifact again")
    _check_header(path, data)
    _check_files(folder, data["files"], verify)
    manifest = Manifest(folder, data)
    _check_io(path, manifest)
    return manifest


def _check_header(path: Path, data: dict) -> None:
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ArtifactError(
            f"{path}: schema_version {version!r} is not supported; this runtime reads schema_version "
            f"{SCHEMA_VERSION} (upgrade gemma-deploy, or re-export with this version)"
        )
    for key in REQUIRED:
        if key not in data:
            raise ArtifactError(f"{path}: required field {key!r} is missing; export the artifact again")
    for key, accepted in (("kind", (KIND,)), ("task", TASKS), ("target", TARGETS), ("family", FAMILIES)):
        if data[key] not in accepted:
            raise ArtifactError(f"{path}: {key} {data[key]!r} is not supported; supported: {', '.join(accepted)}")
    if data.get("logits", "all") not in LOGITS:
        raise ArtifactError(f"{path}: logits {data['logits']!r} is not supported; supported: {', '.join(LOGITS)}")
    if not isinstance(data["files"], dict) or not data["files"]:
        raise ArtifactError(f"{path}: field 'files' must map each file name to its sha256 and size")


def _check_files(folder: Path, files: dict, verify: bool) -> None:
    for name, entry in files.items():
        if not isinstance(entry, dict) or "size" not in entry or "sha256" not in entry:
            raise ArtifactError(f"manifest entry files[{name!r}] must have 'size' and 'sha256'; export the artifact again")
        path = folder / name
        if not path.is_file():
            raise ArtifactError(
                f"{name} is listed in the manifest but missing from {folder}; copy the whole artifact directory"
            )
        size = path.stat().st_size
        if size != entry["size"]:
            raise ArtifactError(
                f"{name} has {size} bytes but the manifest says {entry['size']}: the file is truncated or altered; "
                "copy or export the artifact again"
            )
        if verify and file_digest(path) != entry["sha256"]:
            raise ArtifactError(
                f"{name} does not match its sha256 in the manifest: the file was altered; copy or export the artifact again"
            )


def _check_io(path: Path, manifest: Manifest) -> None:
    io = manifest["io"]
    for key in ("inputs", "outputs"):
        if not isinstance(io, dict) or not isinstance(io.get(key), list) or not io[key]:
            raise ArtifactError(f"{path}: field io.{key} must be a non-empty list of names")
    if manifest.task != "text-generation":
        return
    kv = manifest.kv_cache
    for key in ("layout", "num_layers", "num_kv_heads", "head_dim"):
        if key not in kv:
            raise ArtifactError(f"{path}: field kv_cache.{key} is missing; export the artifact again")
    if kv["layout"] not in KV_LAYOUTS:
        raise ArtifactError(f"{path}: kv_cache.layout {kv['layout']!r} is not supported; supported: {', '.join(KV_LAYOUTS)}")
    if kv["layout"] == "static" and not (isinstance(kv.get("max_length"), int) and kv["max_length"] > 0):
        raise ArtifactError(f"{path}: kv_cache.max_length {kv.get('max_length')!r} must be a positive integer for the static layout")
    missing = [n for n in DECODER_INPUTS if n not in manifest.input_names]
    if missing or manifest.output_names[0] != "logits":
        raise ArtifactError(
            f"{path}: io must have inputs {', '.join(DECODER_INPUTS)} and 'logits' as the first output "
            f"(missing inputs: {missing or 'none'}, first output: {manifest.output_names[0]!r})"
        )
    layers = kv["num_layers"]
    if manifest.past_names != kv_names("past_key_values", layers):
        raise ArtifactError(
            f"{path}: io.inputs has {len(manifest.past_names)} past_key_values entries but kv_cache.num_layers "
            f"is {layers} (expected past_key_values.{{0..{layers - 1}}}.key/value); the manifest is inconsistent, "
            "export the artifact again"
        )
    if manifest.present_names != kv_names("present", layers):
        raise ArtifactError(
            f"{path}: io.outputs has {len(manifest.present_names)} present entries but kv_cache.num_layers "
            f"is {layers} (expected present.{{0..{layers - 1}}}.key/value); the manifest is inconsistent, "
            "export the artifact again"
        )
