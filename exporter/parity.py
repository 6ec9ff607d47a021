"""gemma-parity: check an existing artifact against its PyTorch source (the export's verification, standalone)."""

from __future__ import annotations

from pathlib import Path

from runtime.manifest import read_manifest

from .trace import GraphSpec
from .verify import DEFAULT_PROMPTS, ParityReport, verify


def check_artifact(artifact: str | Path, model: str, prompts=None, new_tokens: int = 8, tolerance=None) -> ParityReport:
    from models.loading import load_model, resolve

    manifest = read_manifest(artifact)
    ckpt = resolve(model)
    config = ckpt.config
    mine = manifest["config"]
    for key in ("hidden_size", "num_hidden_layers", "num_key_value_heads", "head_dim", "vocab_size"):
        if mine[key] != getattr(config, key):
            raise ValueError(
                f"the artifact does not match {model}: {key} is {mine[key]} in the artifact, {getattr(config, key)} in the model"
            )
    spec = GraphSpec(
        task=manifest.task,
        num_layers=config.num_hidden_layers,
        kv_layout=manifest.kv.layout,
        max_length=manifest.kv.max_length,
        logits=manifest.logits,
    )
    folder = Path(artifact)
    return verify(
        lambda: load_model(ckpt, task=manifest.task, progress=False)[0],
        folder / "model.onnx",
        spec,
        config,
        dtype=manifest.dtype,
        tokenizer_dir=folder if (folder / "tokenizer.json").is_file() else None,
        prompts=prompts or DEFAULT_PROMPTS,
        new_tokens=new_tokens,
        tolerance=tolerance,
    )
