"""Resolve a model name or path to a checkpoint and build the PyTorch module from it.

Accepted sources (no pickle: safetensors and GGUF only):
- a Hugging Face folder (config.json + model.safetensors, sharded or not);
- a `.gguf` file from llama.cpp (dequantized to float32);
- `random:<preset>` or `random:<path/to/config.json>`: random weights for a real config (tests, benchmarks);
- the packaged real model, `gemma3-270m` (assembled and cached once per machine, see `packaged.py`);
- a hub name such as `google/gemma-2b`, from the local Hugging Face cache (or the hub when reachable).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import packaged, presets
from .config import GemmaConfig
from .families import TASKS, family_of, load_config, task_class
from .gemma import Precision, decoder_of
from .gguf_file import gguf_config, gguf_tensor_types, gguf_tensors

log = logging.getLogger(__name__)


@dataclass
class Checkpoint:
    """Where a model's config, weights and tokenizer files come from."""

    source: str
    config: GemmaConfig
    folder: Path | None = None  # holds tokenizer.json, tokenizer_config.json, generation_config.json...
    gguf: Path | None = None
    random_seed: int | None = None  # random weights instead of a file
    dequantized_from: Path | None = None  # the GGUF whose blocks the float weights hold (the packaged model's)

    def ggml_types(self) -> dict[str, str] | None:
        """Each weight's llama.cpp type (Q8_0, Q5_0, Q4_K...) by Hugging Face name, when the weights come from a
        GGUF; None otherwise."""
        source = self.gguf or self.dequantized_from
        if source is None:
            return None
        return gguf_tensor_types(source)

    def tensors(self) -> tuple[int, Iterator[tuple[str, torch.Tensor]]]:
        """The number of tensors and an iterator of (Hugging Face name, tensor), read lazily."""
        if self.gguf is not None:
            _, count, tensors = gguf_tensors(self.gguf)
            return count, tensors
        return _safetensors(self.folder)


def resolve(model: str | Path) -> Checkpoint:
    """A checkpoint for a path, a name of the packaged model, `random:...`, or a hub name."""
    text = str(model)
    if text.startswith("random:"):
        spec = text.removeprefix("random:")
        config = load_config(spec) if spec.endswith(".json") or Path(spec).is_dir() else presets.config(spec)
        return Checkpoint(source=text, config=config, random_seed=0)
    if text in packaged.NAMES:
        folder = packaged.prepare(text)
        return Checkpoint(source=text, config=load_config(folder), folder=folder, dequantized_from=packaged.gguf_path())
    path = Path(text).expanduser()
    if path.suffix == ".gguf" or path.is_file():
        if not path.exists():
            raise FileNotFoundError(f"model file {path} does not exist")
        if path.suffix != ".gguf":
            raise ValueError(f"{path} is not a .gguf file; pass a GGUF file or a Hugging Face folder")
        return Checkpoint(source=text, config=gguf_config(path), gguf=path, folder=path.parent)
    if path.is_dir():
        return Checkpoint(source=text, config=load_config(path), folder=path)
    if path.is_absolute() or text.startswith((".", "~")) or text.count("/") != 1:
        raise FileNotFoundError(
            f"model {text!r} is neither an existing folder or .gguf file, nor a hub name (org/name), nor one of "
            f"{', '.join(packaged.NAMES)} or random:<{'|'.join(presets.PRESETS)}>"
        )
    folder = _from_hub(text)
    return Checkpoint(source=text, config=load_config(folder), folder=folder)


def _from_hub(name: str) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja"]
    try:
        return Path(snapshot_download(name, allow_patterns=patterns, local_files_only=True))
    except Exception:
        pass
    try:
        return Path(snapshot_download(name, allow_patterns=patterns, etag_timeout=5))
    except Exception as e:
        raise FileNotFoundError(
            f"{name!r} is not in the local Hugging Face cache and the hub is not reachable ({type(e).__name__}). "
            f"Download it where there is network (`hf download {name}`) and pass the folder, e.g. "
            f"--model /path/to/{name.split('/')[-1]}, or pass a .gguf file"
        ) from None


def _safetensors(folder: Path) -> tuple[int, Iterator[tuple[str, torch.Tensor]]]:
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        pickles = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt")]
        hint = f" (found {', '.join(pickles)}: pickle files are not loaded; convert them to safetensors)" if pickles else ""
        raise FileNotFoundError(f"no *.safetensors weights in {folder}{hint}")
    handles = []
    for name in files:
        path = folder / name
        if not path.is_file():
            raise FileNotFoundError(f"weight file {path} listed in {index.name} does not exist")
        try:
            handles.append(safe_open(path, framework="pt"))
        except Exception as e:
            raise ValueError(f"weight file {path} is corrupted or truncated ({e}); re-download it") from e
    count = sum(len(h.keys()) for h in handles)

    def tensors():
        for handle, name in zip(handles, files):
            for key in handle.keys():
                try:
                    yield key, handle.get_tensor(key)
                except Exception as e:
                    raise ValueError(f"tensor {key!r} of {folder / name} cannot be read ({e}); re-download it") from e

    return count, tensors()


def _normalize(name: str) -> str:
    """Map checkpoint names onto ours (multimodal Gemma 3 keeps the decoder under language_model)."""
    for prefix in ("model.language_model.", "language_model.model.", "language_model."):
        if name.startswith(prefix):
            return "model." + name.removeprefix(prefix)
    return name


def load_model(
    model: str | Path | Checkpoint,
    task: str = "text-generation",
    precision: Precision = Precision(),
    kv_layout: str = "dynamic",
    progress: bool = True,
    ring_size: int | None = None,
) -> tuple[nn.Module, Checkpoint]:
    """Build the module for `task` (in `kv_layout`, sliding layers on a ring of `ring_size` slots if given) and fill
    it with the checkpoint's weights (shapes and names checked): the embedding and lm_head in
    `precision.vocab_table`, every other weight in `precision.dtype`."""
    if task not in TASKS:
        raise ValueError(f"task {task!r} is not supported; supported: {', '.join(TASKS)}")
    ckpt = model if isinstance(model, Checkpoint) else resolve(model)
    if ckpt.random_seed is not None:
        return random_model(ckpt.config, task, ckpt.random_seed, precision, kv_layout, ring_size), ckpt

    with torch.device("meta"):  # no memory until the real tensors are assigned
        module = task_class(ckpt.config, task)(ckpt.config, precision, kv_layout, ring_size)
    expected = {k: v for k, v in module.state_dict().items()}
    prefix = "" if task == "feature-extraction" else "model."
    tied = ckpt.config.tie_word_embeddings and "lm_head.weight" in expected
    embedding_key = f"{prefix}embed_tokens.weight"
    skip = family_of(ckpt.config).skip_checkpoint_key

    count, tensors = ckpt.tensors()
    state: dict[str, torch.Tensor] = {}
    unexpected = []
    for key, tensor in _progress(tensors, count, f"loading {ckpt.source}", progress):
        key = _normalize(key)
        key = key.removeprefix("model.") if not prefix else key
        if key == "lm_head.weight" and (tied or task != "text-generation"):
            continue  # tied to the embedding (Gemma's checkpoints may still carry a copy)
        if skip(ckpt.config, key if prefix else "model." + key):
            continue  # Gemma 4: K/V weights of KV-shared layers, a multimodal checkpoint's towers
        if key not in expected:
            unexpected.append(key)
            continue
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise ValueError(
                f"tensor {key!r} has shape {tuple(tensor.shape)} in {ckpt.source} but the config "
                f"({ckpt.config.model_type}) expects {tuple(expected[key].shape)}"
            )
        vocab = key in (embedding_key, "lm_head.weight")
        state[key] = tensor.to(precision.vocab_table if vocab else precision.dtype)
    if unexpected:
        raise ValueError(f"{ckpt.source} has tensors a {ckpt.config.model_type} decoder does not: {unexpected[:8]}")
    if tied:
        state["lm_head.weight"] = state.get(embedding_key)
    missing = [k for k in expected if k not in state or state[k] is None]
    head = [k for k in missing if k.startswith("score.")]
    if head:  # transformers also starts a classification head from random weights
        log.warning("%s has no %s head; it is initialized randomly: fine-tune it before use", ckpt.source, task)
        generator = torch.Generator().manual_seed(0)
        for k in head:
            state[k] = torch.randn(expected[k].shape, generator=generator, dtype=precision.dtype) * 0.02
        missing = [k for k in missing if k not in head]
    if missing:
        raise ValueError(f"{ckpt.source} lacks tensors of the {ckpt.config.model_type} decoder: {missing[:8]}")
    module.load_state_dict(state, strict=True, assign=True)
    _finish(module)
    return module, ckpt


def _finish(module: nn.Module) -> None:
    """Re-tie lm_head (assign=True replaced the parameter) and rebuild the RoPE buffers off the meta device."""
    decoder = decoder_of(module)
    if hasattr(module, "lm_head") and module.config.tie_word_embeddings:
        module.lm_head.weight = decoder.embed_tokens.weight
    rope_inv_freq = family_of(decoder.config).rope_inv_freq
    for layer_type in dict.fromkeys(decoder.layer_types):
        decoder.register_buffer(f"inv_freq_{layer_type}", rope_inv_freq(decoder.config, layer_type), persistent=False)
    module.eval()


def random_model(
    config: GemmaConfig, task: str = "text-generation", seed: int = 0, precision: Precision = Precision(),
    kv_layout: str = "dynamic", ring_size: int | None = None,
) -> nn.Module:
    """Random weights, scaled so that greedy decoding does not collapse onto one token (docs/design.md, 'Facts
    learned on this machine'): the default std 0.02 lets the tied embedding echo the input token back. Here the
    layers dominate the residual stream: norms' scales (norm_offset + w) ~N(1, 1), linears and experts
    ~N(0, 4/fan_in), embedding ~N(0, 0.16/hidden); Gemma 4's router scales and layer scalars near 1. A family whose
    q.k is unscaled (Gemma 4's 1.0) has trained q and k norms that carry the temperature, so random ones are scaled
    by head_dim^-1/4 each, the 1/sqrt(D) the other families apply (around 1, the scores of unit-RMS q and k run to
    head_dim and the softmax turns so sharp that a float16 rounding flips it)."""
    torch.manual_seed(seed)
    with torch.device("meta"):  # no memory until each tensor is drawn, in its own dtype
        module = task_class(config, task)(config, precision, kv_layout, ring_size)
    family = family_of(config)
    table = decoder_of(module).embed_tokens.weight
    state = {}
    for name, p in module.named_parameters():  # the tied lm_head once: it is the embedding
        if name.endswith("norm.weight"):
            qk = family.unscaled_attention and name.endswith(("q_norm.weight", "k_norm.weight"))
            scale = p.shape[0] ** -0.25 if qk else 1.0
            mean = 1.0 - family.norm_offset  # the scale, norm_offset + w, around 1
            draw = lambda t, mean=mean, scale=scale: t.normal_(mean, 1.0).mul_(scale)  # noqa: E731
        elif "embed_tokens" in name:
            draw = lambda t: t.normal_(0.0, 0.4 * config.hidden_size**-0.5)  # noqa: E731
        elif p.dim() >= 2:
            draw = lambda t, std=2.0 * p.shape[-1] ** -0.5: t.normal_(0.0, std)  # noqa: E731
        elif name.endswith(("router.scale", "per_expert_scale")):
            draw = lambda t: t.uniform_(0.5, 1.5)  # noqa: E731
        else:
            draw = lambda t: t.normal_(0.0, 0.02)  # noqa: E731
        state[name] = _drawn(p.shape, precision.vocab_table if p is table else precision.dtype, draw)
    for name, b in module.named_buffers():  # persistent ones (the RoPE tables are rebuilt by _finish)
        if name.endswith("layer_scalar"):
            state[name] = _drawn(b.shape, torch.float32, lambda t: t.uniform_(0.5, 1.5))
    if "lm_head.weight" in module.state_dict():
        state["lm_head.weight"] = state[next(n for n, p in module.named_parameters() if p is table)]
    module.load_state_dict(state, strict=True, assign=True)
    _finish(module)
    return module


def _drawn(shape, dtype: torch.dtype, draw, chunk: int = 1 << 24) -> torch.Tensor:
    """A tensor of `dtype` filled by `draw` (an in-place torch sampler) in float32 chunks of `chunk` values, so that a
    half-precision weight never exists in float32 whole (E2B's per-layer table is 9.4 GB so). The values are those of
    one float32 draw cast to `dtype`: the CPU samplers fill in order, normal_ in blocks of 16, so chunks give the same
    stream as long as none but the first is shorter than 16 values."""
    out = torch.empty(shape, dtype=dtype)
    flat = out.view(-1)
    starts = list(range(0, flat.numel(), chunk))
    if len(starts) > 1 and flat.numel() - starts[-1] < 16:
        starts.pop()
    for i, start in enumerate(starts):
        end = starts[i + 1] if i + 1 < len(starts) else flat.numel()
        values = torch.empty(end - start)
        draw(values)
        flat[start:end] = values
    return out


def _progress(iterable, total: int, desc: str, enabled: bool):
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="tensor", leave=False)


__all__ = ["Checkpoint", "resolve", "load_model", "random_model"]
