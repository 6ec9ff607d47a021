"""Build a TensorRT engine from an artifact's graph and its build plan (TensorRT 10 Python API).

    build_artifact_engine(DIR)          build engines/<gpu>-sm<cc>-trt<version>.plan, record it in the manifest
    require_tensorrt()                  TensorRT and a GPU, or TensorRTUnavailable with what to install

The calls follow the TensorRT Python API reference,
    https://docs.nvidia.com/deeplearning/tensorrt/latest/_static/python-api/index.html   (".../python-api" below)
the bindings themselves (python/src/infer/pyCore.cpp and python/src/parsers/pyOnnx.cpp of
https://github.com/NVIDIA/TensorRT, release/10.x), and Polygraphy's backend/trt/loader.py, which makes the same calls:

- the network is strongly typed: builder.create_network(1 << int(NetworkDefinitionCreationFlag.STRONGLY_TYPED))
  (.../python-api/infer/Core/Builder.html; EXPLICIT_BATCH is ignored since 10.0, and TensorRT 11 keeps
  STRONGLY_TYPED as an ignored flag because it is always on). Our graphs carry their precisions (fp16/bf16
  weights, float32 residual stream, norms and softmax, int4 blocked DequantizeLinear), and TensorRT keeps every
  tensor in the type the ONNX gives it rather than choosing per layer (the precision flags FP16/BF16/INT8 are
  then not allowed, and not needed);
- OnnxParser.parse_from_file(path) -> bool reads the external data next to model.onnx; its errors are
  parser.get_error(i) for i < parser.num_errors, whose str() names node and operator
  (.../python-api/parsers/Onnx/pyOnnx.html). The parser owns the parsed weights: it stays alive until the build is done;
- one optimization profile per plan profile (builder.create_optimization_profile(), profile.set_shape(name, min,
  opt, max), config.add_optimization_profile), in the plan's order (0: prefill, 1: decode), so the runtime picks
  a profile by index (.../python-api/infer/Core/OptimizationProfile.html);
- a timing cache loaded before and saved after each build, shared by the builds on one GPU and TensorRT version:
  config.create_timing_cache(bytes) (b"" for an empty one), config.set_timing_cache(cache, ignore_mismatch) -> bool,
  config.get_timing_cache().serialize() after the build (.../python-api/infer/Core/BuilderConfig.html; "Timing
  Cache" in https://docs.nvidia.com/deeplearning/tensorrt/10.16.1/performance/builder-performance.html): a
  second build skips the timing; a cache TensorRT refuses is replaced by an empty one;
- config.builder_optimization_level from the plan (0..5; TensorRT's default 3);
- config.progress_monitor = a trt.IProgressMonitor subclass (phase_start(phase_name, parent_phase, num_steps),
  step_complete(phase_name, step) -> bool, phase_finish(phase_name); .../python-api/infer/Core/ProgressMonitor.html
  and samples/python/simple_progress_monitor) drives a progress bar over the builder's top-level phases;
- builder.build_serialized_network(network, config) returns an IHostMemory (a buffer) or None on failure.

Nothing here runs without TensorRT and an NVIDIA GPU; the plan (plan.py) is what this machine checks.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from runtime.manifest import Engine, TrtPlan, read_manifest, write_manifest
from runtime.spec import TrtSpec
from runtime.trt_device import DeviceInfo, TensorRTUnavailable, current_device, engine_file_name, import_tensorrt

from .plan import plan_table

log = logging.getLogger(__name__)


class BuildError(RuntimeError):
    """TensorRT refused the graph or failed to build; the message carries its errors."""


class UnsupportedOperators(BuildError):
    """The graph has operators TensorRT's ONNX parser does not take; the artifact is written, no engine built."""


def require_supported(plan: TrtPlan, graph: Path) -> None:
    """Refuse, before anyone looks for TensorRT, a graph whose plan lists operators its parser lacks."""
    unsupported = plan.operators.get("unsupported")
    if unsupported:
        raise UnsupportedOperators(
            f"{graph}: the graph has operators TensorRT's ONNX parser does not support "
            f"({'; '.join(f'{op}: {why}' for op, why in unsupported.items())}); no engine can be built from it"
        )


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


def build_engine(onnx_path: Path, trt_spec: TrtSpec, plan: TrtPlan, engine_path: Path, progress: bool = True,
                 timing_cache: Path | None = None) -> BuildResult:
    """Parse `onnx_path`, build with the plan's profiles, write the serialized engine atomically."""
    require_supported(plan, onnx_path)
    trt, device = require_tensorrt()
    start = time.perf_counter()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BuildError(f"TensorRT {trt.__version__} cannot parse {onnx_path}: {errors}")

    config = builder.create_builder_config()
    config.builder_optimization_level = trt_spec.optimization_level
    for profile in plan.profiles:
        trt_profile = builder.create_optimization_profile()
        for name, (low, opt, high) in profile.shapes.items():
            trt_profile.set_shape(name, low, opt, high)
        config.add_optimization_profile(trt_profile)
    timing_cache = timing_cache or timing_cache_path(device, trt.__version__)
    _use_timing_cache(config, timing_cache)
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


def build_artifact_engine(folder: str | Path, progress: bool = True):
    """Build the engine of an artifact whose manifest holds a build plan (gemma-export --resume-build),
    add it to the manifest's engines and rewrite the manifest. Returns the new manifest."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest.graph.target != "trt" or manifest.plan is None:
        raise ValueError(f"{folder} has no TensorRT build plan (target {manifest.graph.target!r}); export it with "
                         "gemma-export --target trt")
    log.info("%s", plan_table(manifest, manifest.plan))
    require_supported(manifest.plan, folder)
    try:
        trt, device = require_tensorrt()
    except TensorRTUnavailable as e:
        raise TensorRTUnavailable(e.reason, unavailable_message(folder)) from e
    name = engine_file_name(device, trt.__version__)
    result = build_engine(manifest.path("model.onnx"), manifest.trt, manifest.plan, folder / "engines" / name,
                          progress)
    engine = Engine(file=f"engines/{name}", gpu=device.name, compute_capability=device.compute_capability,
                    tensorrt_version=result.tensorrt_version, profiles=tuple(p.name for p in manifest.plan.profiles),
                    build_seconds=round(result.seconds, 1))
    engines = (*(e for e in manifest.engines if e.file != engine.file), engine)
    log.info("built %s in %.0f s", engine.file, result.seconds)
    return write_manifest(folder, dataclasses.replace(manifest, engines=engines))


def _use_timing_cache(config, path: Path) -> None:
    """Attach the timing cache at `path` (an empty one when there is none). createTimingCache returns None for a
    blob it cannot read and setTimingCache returns False for a cache of another device or version (with
    ignore_mismatch=False): both mean a fresh cache rather than a failed build."""
    cache = config.create_timing_cache(path.read_bytes()) if path.is_file() else None
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        if path.is_file():
            log.warning("TensorRT did not accept the timing cache %s; timing every layer again", path)
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)


def _write_atomically(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _progress_monitor(trt):
    """A tqdm bar per top-level build phase (trt.IProgressMonitor: phase_start, step_complete, phase_finish).
    The base class's __init__ must be called (pybind11 trampoline); an exception raised in step_complete is
    caught by TensorRT and cancels the build, so the callbacks do nothing that can fail."""
    from tqdm import tqdm

    class Progress(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self.bars = {}

        def phase_start(self, phase_name, parent_phase, num_steps):
            if parent_phase is None:
                self.bars[phase_name] = tqdm(total=num_steps, desc=re.sub(r"\s+", " ", phase_name), leave=False)

        def step_complete(self, phase_name, step):
            # `step` is the index of the step just finished, in [0, num_steps): step + 1 steps are done.
            bar = self.bars.get(phase_name)
            if bar is not None:
                bar.update(step + 1 - bar.n)
            return True  # False would cancel the build

        def phase_finish(self, phase_name):
            bar = self.bars.pop(phase_name, None)
            if bar is not None:
                bar.close()

    return Progress()
