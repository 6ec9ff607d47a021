"""Build a TensorRT engine from an artifact's graph and its build plan (TensorRT 10 Python API).

    build_artifact_engine(DIR)          build engines/<gpu>-sm<cc>-trt<version>.plan, record it in the manifest
    require_tensorrt()                  TensorRT and a GPU, or TensorRTUnavailable with what to install

The calls follow the TensorRT Python API reference and developer guide
(https://docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/python-api-docs.html):

- the network is strongly typed (NetworkDefinitionCreationFlag.STRONGLY_TYPED): our graphs carry their
  precisions (fp16/bf16 weights, float32 residual stream, norms and softmax, int4 blocked
  DequantizeLinear), and TensorRT keeps every tensor in the type the ONNX gives it rather than choosing
  per layer (the precision flags FP16/BF16/INT8 are then not allowed, and not needed);
- OnnxParser.parse_from_file reads the external data next to model.onnx;
- one optimization profile per plan profile, in the plan's order (0: prefill, 1: decode), so the
  runtime picks a profile by index;
- a timing cache (IBuilderConfig.create_timing_cache / set_timing_cache) loaded before and saved after
  each build, shared by the builds on one GPU and TensorRT version: a second build skips the timing;
- builder_optimization_level from the plan (0..5; TensorRT's default 3);
- IProgressMonitor drives a progress bar over the builder's phases.

Nothing here runs without TensorRT and an NVIDIA GPU; the plan (plan.py) is what this machine checks.
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from runtime.manifest import read_manifest, write_manifest
from runtime.trt_device import DeviceInfo, TensorRTUnavailable, current_device, engine_file_name, import_tensorrt

from .plan import BuildPlan

log = logging.getLogger(__name__)

EXIT_NO_TENSORRT = 3  # gemma-export: the ONNX and the plan are written, the engine needs a GPU machine


class BuildError(RuntimeError):
    """TensorRT refused the graph or failed to build; the message carries its errors."""


@dataclass(frozen=True)
class BuildResult:
    engine: Path
    seconds: float
    device: DeviceInfo
    tensorrt_version: str


def require_tensorrt() -> tuple[object, DeviceInfo]:
    """The tensorrt module and the GPU it builds for; TensorRTUnavailable (with the fix) otherwise."""
    trt = import_tensorrt()
    return trt, current_device()


def resume_command(folder: Path) -> str:
    return f"gemma-export --resume-build {folder}"


def unavailable_message(folder: Path) -> str:
    """What to do when the build cannot run here (the fix of a TensorRTUnavailable)."""
    return (f"the ONNX graph and the build plan are in {folder}; on a machine with an NVIDIA GPU, install TensorRT "
            f"(pip install 'gemma-deploy[trt]') and finish the build with: {resume_command(folder)}")


def timing_cache_path(device: DeviceInfo, tensorrt_version: str) -> Path:
    """One timing cache per GPU and TensorRT version, shared by every build on this machine."""
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gemma-deploy" / "tensorrt"
    return root / f"timing-{device.slug}-sm{device.compute_capability.replace('.', '')}-trt{tensorrt_version}.cache"


def build_engine(onnx_path: Path, plan: BuildPlan, engine_path: Path, progress: bool = True,
                 timing_cache: Path | None = None) -> BuildResult:
    """Parse `onnx_path`, build with the plan's profiles, write the serialized engine atomically."""
    trt, device = require_tensorrt()
    if not plan.supported:
        raise BuildError(f"the graph has operators TensorRT's parser does not support: {plan.operators['unsupported']}")
    start = time.perf_counter()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BuildError(f"TensorRT {trt.__version__} cannot parse {onnx_path}: {errors}")

    config = builder.create_builder_config()
    config.builder_optimization_level = plan.optimization_level
    for profile in plan.profiles:
        trt_profile = builder.create_optimization_profile()
        for name, (low, opt, high) in profile.shapes.items():
            trt_profile.set_shape(name, low, opt, high)
        config.add_optimization_profile(trt_profile)
    timing_cache = timing_cache or timing_cache_path(device, trt.__version__)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    if progress:
        config.progress_monitor = _progress_monitor(trt)

    log.info("building the TensorRT engine for %s (%s, compute capability %s) with TensorRT %s",
             onnx_path.name, device.name, device.compute_capability, trt.__version__)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BuildError(f"TensorRT {trt.__version__} failed to build {onnx_path} (its log above says why)")
    _write_atomically(engine_path, memoryview(serialized))
    timing_cache.parent.mkdir(parents=True, exist_ok=True)
    _write_atomically(timing_cache, memoryview(config.get_timing_cache().serialize()))
    return BuildResult(engine_path, time.perf_counter() - start, device, trt.__version__)


def build_artifact_engine(folder: str | Path, progress: bool = True) -> dict:
    """Build the engine of an artifact whose manifest holds a build plan (gemma-export --resume-build),
    add it to manifest["trt"]["engines"] and rewrite the manifest. Returns the new manifest."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    section = manifest.get("trt") or {}
    if manifest.target != "trt" or "plan" not in section:
        raise ValueError(f"{folder} has no TensorRT build plan (target {manifest.target!r}); export it with "
                         "gemma-export --target trt")
    plan = BuildPlan.from_dict(section["plan"])
    log.info("%s", plan.table())
    try:
        trt, device = require_tensorrt()
    except TensorRTUnavailable as e:
        raise TensorRTUnavailable(e.reason, unavailable_message(folder)) from e
    name = engine_file_name(device, trt.__version__)
    result = build_engine(manifest.path("model.onnx"), plan, folder / "engines" / name, progress)
    entry = {
        "file": f"engines/{name}",
        "gpu": device.name,
        "compute_capability": device.compute_capability,
        "tensorrt_version": result.tensorrt_version,
        "profiles": [p.name for p in plan.profiles],
        "build_seconds": round(result.seconds, 1),
    }
    engines = [e for e in section.get("engines", []) if e["file"] != entry["file"]] + [entry]
    data = {k: v for k, v in manifest.data.items() if k not in ("schema_version", "kind", "files")}
    data["trt"] = {**section, "engines": engines}
    log.info("built %s in %.0f s", entry["file"], result.seconds)
    return write_manifest(folder, data)


def _write_atomically(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _progress_monitor(trt):
    """A tqdm bar per top-level build phase (trt.IProgressMonitor: phase_start, step_complete, phase_finish)."""
    from tqdm import tqdm

    class Progress(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self.bars = {}

        def phase_start(self, phase_name, parent_phase, num_steps):
            if parent_phase is None:
                self.bars[phase_name] = tqdm(total=num_steps, desc=re.sub(r"\s+", " ", phase_name), leave=False)

        def step_complete(self, phase_name, step):
            if phase_name in self.bars:
                self.bars[phase_name].update(step - self.bars[phase_name].n)
            return True  # False would cancel the build

        def phase_finish(self, phase_name):
            bar = self.bars.pop(phase_name, None)
            if bar is not None:
                bar.close()

    return Progress()
