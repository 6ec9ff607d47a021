"""Read and validate an artifact's manifest.json: the contract between the exporter and the runtime.

Refused, with a message that names the field or the file: an unknown schema version, a missing field,
a missing or altered file (size, then sha256), I/O names that disagree with the KV cache description,
and a directory without a manifest (an export that did not finish).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

MANIFEST_NAME = "manifest.json"
SCHEMA_VERSION = 1
REQUIRED = ("schema_version", "task", "target", "family", "config", "dtype", "io", "files")


class ArtifactError(ValueError):
    """The artifact cannot be used as it is; the message says what to fix."""


@dataclass(frozen=True)
class Manifest:
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
    def kv_cache(self) -> dict:
        return self.data.get("kv_cache") or {}

    @property
    def generation(self) -> dict:
        return self.data.get("generation") or {}

    @property
    def past_names(self) -> list[str]:
        return [n for n in self.data["io"]["inputs"] if n.startswith("past_key_values.")]

    @property
    def present_names(self) -> list[str]:
        return [n for n in self.data["io"]["outputs"] if n.startswith("present.")]

    def path(self, name: str) -> Path:
        return self.folder / name


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(folder: str | Path, verify: bool = True) -> Manifest:
    """The validated manifest of an artifact; `verify=False` checks sizes but skips the sha256 pass."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ArtifactError(f"artifact {folder} does not exist or is not a directory; export one with gemma-export")
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise ArtifactError(
            f"{folder} has no {MANIFEST_NAME}: the artifact is incomplete (an interrupted export?); export it again"
        )
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path} is not valid JSON ({e}); export the artifact again") from e
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ArtifactError(
            f"{path}: schema_version {version!r} is not supported; this runtime reads schema_version "
            f"{SCHEMA_VERSION} (upgrade gemma-deploy or re-export)"
        )
    for key in REQUIRED:
        if key not in data:
            raise ArtifactError(f"{path}: required field {key!r} is missing; export the artifact again")
    _check_files(folder, data["files"], verify)
    manifest = Manifest(folder, data)
    _check_io(manifest)
    return manifest


def _check_files(folder: Path, files: dict, verify: bool) -> None:
    for name, entry in files.items():
        path = folder / name
        if not path.is_file():
            raise ArtifactError(f"{path} is listed in the manifest but missing; copy the whole artifact directory")
        if path.stat().st_size != entry["size"]:
            raise ArtifactError(
                f"{path} has {path.stat().st_size} bytes but the manifest says {entry['size']}: "
                "the file is truncated or altered; copy or export the artifact again"
            )
        if verify and sha256(path) != entry["sha256"]:
            raise ArtifactError(
                f"{path} does not match its sha256 in the manifest: the file was altered; copy or export the artifact again"
            )


def _check_io(manifest: Manifest) -> None:
    io = manifest["io"]
    for key in ("inputs", "outputs"):
        if not isinstance(io.get(key), list) or not io[key]:
            raise ArtifactError(f"manifest field io.{key} must be a non-empty list of names")
    kv = manifest.kv_cache
    if manifest.task != "text-generation":
        return
    layers = kv.get("num_layers")
    expected = [f"past_key_values.{i}.{t}" for i in range(layers or 0) for t in ("key", "value")]
    if manifest.past_names != expected:
        raise ArtifactError(
            f"manifest io.inputs has {len(manifest.past_names)} past_key_values entries but kv_cache.num_layers "
            f"is {layers}; the manifest is inconsistent, export the artifact again"
        )
    if kv.get("layout") not in ("dynamic", "static"):
        raise ArtifactError(f"manifest kv_cache.layout {kv.get('layout')!r} is not one of: dynamic, static")
    if kv["layout"] == "static" and not kv.get("max_length"):
        raise ArtifactError("manifest kv_cache.max_length must be set for the static layout")
