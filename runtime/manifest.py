"""An artifact's manifest.json: the spec it was exported to (runtime/spec.py) and what each stage produced.

    read_manifest(folder)            the validated Manifest, or ArtifactError naming the field or file
    write_manifest(folder, manifest) list every file with size and sha256, then write manifest.json last
    file_digest(path)                sha256 of a file, streamed in 1 MiB blocks

Refused, with a message that names the field or the file: a directory without manifest.json (an export
that did not finish), an unknown schema_version or kind, a missing field or a value the runtime does not know
(every section is checked by its dataclass), a missing or altered file (size, then sha256), and I/O names
that disagree with the KV cache description.

This module imports the standard library only: the exporter uses it to write what the runtime reads.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .spec import DECODER_INPUTS, LOGITS_TO_KEEP, ArtifactSpec, SectionError, load_section

MANIFEST_NAME = "manifest.json"
SCHEMA_VERSION = 2
KIND = "gemma-deploy-artifact"


class ArtifactError(ValueError):
    """The artifact cannot be used as it is; the message says what is wrong and what to do."""


# -- what the stages produce --------------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerationSpec:
    """Special tokens, from the checkpoint's config, generation config and tokenizer."""

    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    add_bos_token: bool | None = None  # None: as tokenizer.json's post-processor does


@dataclass(frozen=True)
class QuantResult:
    weights: dict[str, int]  # weights quantized, by bits: {"int4": n, "int8": m}
    skipped: tuple[str, ...]  # left in float (--lm-head float)


@dataclass(frozen=True)
class ParitySummary:
    """The export's verification against PyTorch (parity.json has every step)."""

    passed: bool
    tolerance: float
    max_abs_diff: float
    mean_abs_diff: float
    greedy_agreement: float
    new_tokens: int


@dataclass(frozen=True)
class Profile:
    """A TensorRT optimization profile: input name -> (min, opt, max) shapes."""

    name: str
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]

    def contains(self, shapes: dict[str, tuple[int, ...]]) -> bool:
        """Whether every given input shape lies within this profile's [min, max] box."""
        for name, shape in shapes.items():
            low, _, high = self.shapes[name]
            if len(shape) != len(low) or any(not lo <= s <= hi for s, lo, hi in zip(shape, low, high)):
                return False
        return True


@dataclass(frozen=True)
class TrtPlan:
    """Everything about an engine decided before a GPU is looked for (exporter/trt/plan.py)."""

    profiles: tuple[Profile, ...]
    kv_cache_bytes: int  # keys and values of every layer at max batch and max length
    kv_buffer_bytes: int  # what the runtime allocates on the device for them
    logits_buffer_bytes: int
    weight_bytes: dict[str, int]  # by ONNX element type of the initializers
    operators: dict[str, Any]  # exporter/trt/operators.py OperatorCheck.to_dict()

    @property
    def supported(self) -> bool:
        return not self.operators.get("unsupported")


@dataclass(frozen=True)
class Engine:
    """A built TensorRT engine: it runs only on the GPU model and TensorRT version that built it."""

    file: str
    gpu: str
    compute_capability: str
    tensorrt_version: str
    profiles: tuple[str, ...]
    build_seconds: float


@dataclass(frozen=True)
class ExportStats:
    seconds: float
    trace_seconds: float
    peak_rss_bytes: int
    weight_bytes: int


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    size: int


@dataclass(frozen=True)
class Manifest(ArtifactSpec):
    """The spec an artifact was exported to, plus what the stages produced. `folder` is where it was read from."""

    source: str = ""
    generation: GenerationSpec | None = None  # text generation
    fusions: dict[str, int] = field(default_factory=dict)  # --target ort: each fusion's count
    quantized: QuantResult | None = None
    parity: ParitySummary | None = None
    plan: TrtPlan | None = None  # --target trt
    engines: tuple[Engine, ...] = ()
    export: ExportStats | None = None
    tools: dict[str, str] = field(default_factory=dict)
    files: dict[str, FileEntry] = field(default_factory=dict)
    folder: Path | None = field(default=None, compare=False, metadata={"json": False})

    def path(self, name: str) -> Path:
        return self.folder / name

    @property
    def spec(self) -> ArtifactSpec:
        return ArtifactSpec(**{f.name: getattr(self, f.name) for f in dataclasses.fields(ArtifactSpec)})

    def to_json(self) -> dict:
        data = {"schema_version": SCHEMA_VERSION, "kind": KIND}
        for f in dataclasses.fields(self):
            if f.metadata.get("json", True):
                value = getattr(self, f.name)
                data[f.name] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else _plain(value)
        return data


def _plain(value):
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value


# -- writing (the exporter) ---------------------------------------------------------------------------------


def file_digest(path: str | Path, block_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in blocks (1 MiB) so that a multi-GB weight file never sits in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(block_size):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: str | Path, manifest: Manifest) -> Manifest:
    """Record every file of `folder` (recursively, manifest.json aside) with its size and sha256, then write
    manifest.json atomically and last: a directory with a manifest is complete. Returns the manifest written."""
    folder = Path(folder)
    paths = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_NAME and not _is_temp(p))
    files = {p.relative_to(folder).as_posix(): FileEntry(file_digest(p), p.stat().st_size) for p in paths}
    manifest = dataclasses.replace(manifest, files=files, folder=folder)
    tmp = folder / f".{MANIFEST_NAME}.tmp"
    tmp.write_text(json.dumps(manifest.to_json(), indent=2))
    os.replace(tmp, folder / MANIFEST_NAME)
    return manifest


def _is_temp(path: Path) -> bool:
    return path.name.startswith(".") and path.name.endswith(".tmp")


# -- reading (the runtime) ----------------------------------------------------------------------------------


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
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ArtifactError(
            f"{path}: schema_version {version!r} is not supported; this runtime reads schema_version "
            f"{SCHEMA_VERSION} (upgrade gemma-deploy, or re-export with this version)"
        )
    if data.get("kind") != KIND:
        raise ArtifactError(f"{path}: kind {data.get('kind')!r} is not supported; supported: {KIND}")
    try:
        manifest = dataclasses.replace(load_section(Manifest, data, "manifest"), folder=folder)
    except SectionError as e:
        raise ArtifactError(f"{path}: {str(e).removeprefix('manifest.')}; export the artifact again") from None
    if not manifest.files:
        raise ArtifactError(f"{path}: field 'files' must map each file name to its sha256 and size")
    _check_files(folder, manifest.files, verify)
    _check_io(path, manifest)
    return manifest


def _check_files(folder: Path, files: dict[str, FileEntry], verify: bool) -> None:
    for name, entry in files.items():
        path = folder / name
        if not path.is_file():
            raise ArtifactError(
                f"{name} is listed in the manifest but missing from {folder}; copy the whole artifact directory"
            )
        size = path.stat().st_size
        if size != entry.size:
            raise ArtifactError(
                f"{name} has {size} bytes but the manifest says {entry.size}: the file is truncated or altered; "
                "copy or export the artifact again"
            )
        if verify and file_digest(path) != entry.sha256:
            raise ArtifactError(
                f"{name} does not match its sha256 in the manifest: the file was altered; copy or export the artifact again"
            )


def _check_io(path: Path, manifest: Manifest) -> None:
    graph, kv = manifest.graph, manifest.kv
    if graph.with_past != (kv is not None):
        raise ArtifactError(f"{path}: a {graph.task} graph {'needs' if graph.with_past else 'has no'} kv section; "
                            "the manifest is inconsistent, export the artifact again")
    if kv is None:
        return
    if len(kv.layers) != kv.num_layers or len(kv.shapes) != kv.num_layers:
        raise ArtifactError(f"{path}: kv.layers and kv.shapes must have an entry for each of the kv.num_layers "
                            f"{kv.num_layers} layers that store KV, got {len(kv.layers)} and {len(kv.shapes)}; the "
                            "manifest is inconsistent, export the artifact again")
    model = manifest.model
    if kv.layers != model.kv_layers or kv.shapes != tuple(model.kv_shapes[i] for i in kv.layers):
        raise ArtifactError(f"{path}: kv.layers {list(kv.layers)} and kv.shapes {[list(s) for s in kv.shapes]} "
                            f"disagree with the model's layers that store KV ({list(model.kv_layers)}, each "
                            "[num_kv_heads, head_dim] from model.kv_shapes); the manifest is inconsistent, export the "
                            "artifact again")
    sizes = {"model.hidden_size": model.hidden_size, "model.num_attention_heads": model.num_attention_heads,
             "model.vocab_size": model.vocab_size, "kv.num_kv_heads": kv.num_kv_heads, "kv.head_dim": kv.head_dim,
             **{f"kv.shapes[{i}]": min(shape) for i, shape in enumerate(kv.shapes)}}
    for name, size in sizes.items():
        if size < 1:
            raise ArtifactError(f"{path}: {name} must be positive, got {size}; the manifest is inconsistent, export "
                                "the artifact again")
    if kv.layout == "static" and not (kv.max_length or 0) > 0:
        raise ArtifactError(f"{path}: kv.max_length {kv.max_length!r} must be a positive integer for the static layout")
    if kv.layout == "static" and (len(kv.slots) != kv.num_layers or not all(0 < n <= kv.max_length for n in kv.slots)):
        raise ArtifactError(f"{path}: kv.slots {list(kv.slots)} must give each of the {kv.num_layers} layers 1 to "
                            f"{kv.max_length} slots; the manifest is inconsistent, export the artifact again")
    expected_inputs, expected_outputs = (*DECODER_INPUTS, *kv.past_names), ("logits", *kv.present_names)
    if graph.keeps_logits and graph.logits == "last":  # older artifacts return the last position alone
        expected_inputs += (LOGITS_TO_KEEP,)
    for key, names, expected in (("inputs", graph.inputs, expected_inputs), ("outputs", graph.outputs, expected_outputs)):
        if tuple(names) != expected:
            raise ArtifactError(
                f"{path}: graph.{key} does not match kv ({kv.num_layers} layers: expected {expected[0]} ... "
                f"{expected[-1]}, got {len(names)} names); the manifest is inconsistent, export the artifact again"
            )
