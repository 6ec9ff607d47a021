"""Helpers shared by the tests: transformers references for our configs, prompts, greedy loops, checkpoints."""

from __future__ import annotations

import json

import torch

from models import empty_past, position_ids_from_mask
from models.gemma import decoder_of
from runtime.spec import ArtifactOptions, ModelSpec, resolve

LONG_PROMPT = (
    "The history of the city begins with a small fishing village on the banks of a wide river. "
    "Over the centuries, merchants arrived from distant lands, bringing spices, silk and new ideas. "
    "Bridges were built, markets grew, and the village became a town with walls and towers. "
) * 12  # about 700 tokens with Gemma 3's tokenizer: past the 512-token sliding window

PROMPTS = ["The capital of France is", "LLMs generate text through a process known as", LONG_PROMPT]


def transformers_reference(config, module, task="text-generation"):
    """transformers' model for our config, with the same weights as `module`."""
    import transformers

    hf_config = transformers.AutoConfig.for_model(**config.to_dict())
    classes = {
        "text-generation": transformers.AutoModelForCausalLM,
        "feature-extraction": transformers.AutoModel,
        "sequence-classification": transformers.AutoModelForSequenceClassification,
        "token-classification": transformers.AutoModelForTokenClassification,
    }
    ref = classes[task].from_config(hf_config, dtype=torch.float32).eval()
    ref.load_state_dict(module.state_dict(), strict=True)
    return ref


def left_padded_batch(vocab_size: int, lengths: list[int], seed: int = 0):
    """Random ids (no special tokens) for prompts of the given lengths, left-padded to the longest."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, width - n :] = torch.randint(3, vocab_size, (n,), generator=generator)
        mask[row, width - n :] = 1
    return ids, mask


def run_steps(model, config, ids, mask, decode_ids, static_length=None):
    """Prefill `ids`, then feed `decode_ids` one column at a time; logits of every step [B, S, V].

    Dynamic layout: the left-padded batch as it is. Static layout (`static_length` slots a row, sliding layers on
    the model's ring if it has one): each row's prompt alone at slot 0 of its own buffer, in the chunks the ring
    takes (runtime.spec.KVSpec.chunk_limit), its logits laid out as the left-padded batch's, then the rows decoded
    together, each after its own length."""
    B, W = ids.shape
    if static_length is None:
        past = empty_past(config, B)
        outputs = []
        with torch.no_grad():
            logits, past = model(ids, position_ids_from_mask(mask), mask, past)
            outputs.append(logits)
            for t in range(decode_ids.shape[1]):
                mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype)], dim=1)
                position_ids = position_ids_from_mask(mask)[:, -1:]
                logits, past = model(decode_ids[:, t : t + 1], position_ids, mask, past)
                outputs.append(logits)
        return outputs
    ring = decoder_of(model).ring_size
    kv = resolve(ArtifactOptions(kv_cache="static", max_length=static_length,
                                 sliding_cache="ring" if ring else "full"), ModelSpec.from_config(config)).kv
    assert kv.ring_size == ring
    past = empty_past(config, B, static_length, ring_size=ring)
    lengths = mask.sum(-1)
    first = torch.zeros(B, W, config.vocab_size)
    with torch.no_grad():
        for row in range(B):
            n, done = int(lengths[row]), 0
            prompt = ids[row:row + 1, W - n:]
            while done < n:
                size = min(n - done, kv.chunk_limit(done) or n)
                row_past = [(k[row:row + 1], v[row:row + 1]) for k, v in past]
                logits, present = model(prompt[:, done:done + size], torch.arange(done, done + size)[None],
                                        torch.ones(1, done + size, dtype=torch.long), row_past)
                for (k, v), (pk, pv) in zip(past, present):
                    k[row], v[row] = pk[0], pv[0]
                first[row, W - n + done:W - n + done + size] = logits[0]
                done += size
        outputs = [first]
        for t in range(decode_ids.shape[1]):
            lengths = lengths + 1
            step_mask = (torch.arange(int(lengths.max()))[None] < lengths[:, None]).long()
            logits, past = model(decode_ids[:, t : t + 1], (lengths - 1)[:, None], step_mask, past)
            outputs.append(logits)
    return outputs


def reference_steps(ref, ids, mask, decode_ids):
    """transformers with its own DynamicCache over the same steps."""
    cache_key = "cache" if ref.config.model_type == "gemma4_text" else "past_key_values"  # Gemma 4 renamed it
    outputs = []
    with torch.no_grad():
        out = ref(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=True)
        outputs.append(out.logits)
        cache = getattr(out, cache_key)
        for t in range(decode_ids.shape[1]):
            mask = torch.cat([mask, torch.ones(ids.shape[0], 1, dtype=mask.dtype)], dim=1)
            out = ref(
                input_ids=decode_ids[:, t : t + 1],
                attention_mask=mask,
                position_ids=position_ids_from_mask(mask)[:, -1:],
                use_cache=True,
                **{cache_key: cache},
            )
            outputs.append(out.logits)
            cache = getattr(out, cache_key)
    return outputs


def max_diff(ours, theirs, mask):
    """Largest |difference| over the real (non-pad) positions of every step."""
    diffs = [(ours[0] - theirs[0])[mask.bool()].abs().max()]
    diffs += [(a - b).abs().max() for a, b in zip(ours[1:], theirs[1:])]
    return float(max(diffs))


def torch_greedy(model, ids: torch.Tensor, mask: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy new tokens [B, steps] of a models/ decoder for a (left-padded) batch."""
    past = empty_past(model.config, ids.shape[0])
    out = []
    with torch.no_grad():
        step = ids
        for _ in range(steps):
            logits, past = model(step, position_ids_from_mask(mask)[:, -step.shape[1] :], mask, past)
            step = logits[:, -1:].argmax(-1)
            out.append(step[:, 0])
            mask = torch.cat([mask, torch.ones(ids.shape[0], 1, dtype=mask.dtype)], dim=1)
    return torch.stack(out, dim=1)


def save_folder(model, folder, shards=1):
    """`model` as a Hugging Face folder (config.json, safetensors, sharded with an index if asked); lm_head is
    left out when it is the embedding itself, as Gemma's checkpoints do."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(model.config.to_dict()))
    tied = getattr(model, "lm_head", None) is not None and model.lm_head.weight is decoder_of(model).embed_tokens.weight
    state = {k: v.contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    names = sorted(state)
    if shards == 1:
        save_file(state, folder / "model.safetensors")
        return
    weight_map = {}
    for i in range(shards):
        part = {k: state[k] for k in names[i::shards]}
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file(part, folder / file)
        weight_map.update({k: file for k in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


LLAMA_CPP_PYTHON = "0.3.36"  # the sdist scripts/build_llama_cpp.sh builds llama.cpp from: its convert_hf_to_gguf.py


def llama_cpp_converter(cache) -> "Path | None":
    """llama.cpp's convert_hf_to_gguf.py (with its conversion/ package and gguf-py), from the llama-cpp-python sdist
    on PyPI, unpacked under `cache`; None if the sdist cannot be fetched."""
    import subprocess
    import sys
    import tarfile
    from pathlib import Path

    root = Path(cache) / f"llama-cpp-python-{LLAMA_CPP_PYTHON}"
    script = root / "convert_hf_to_gguf.py"
    if script.is_file():
        return script
    download = Path(cache) / "sdist"
    status = subprocess.call([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                              "-d", str(download), f"llama-cpp-python=={LLAMA_CPP_PYTHON}"], timeout=600)
    archives = list(download.glob("llama_cpp_python-*.tar.gz"))
    if status != 0 or not archives:
        return None
    prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"
    with tarfile.open(archives[0]) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(prefix) and m.isfile() and (
            m.name == prefix + "convert_hf_to_gguf.py" or m.name.startswith((prefix + "conversion/", prefix + "gguf-py/")))]
        for member in members:
            member.name = member.name.removeprefix(prefix)
        tar.extractall(root, members=members, filter="data")
    return script


def convert_to_gguf(converter, folder, output, outtype: str = "f32"):
    """`folder` (a Hugging Face folder with tokenizer.json) as llama.cpp's converter writes it to `output`."""
    import subprocess
    import sys

    subprocess.run([sys.executable, str(converter), str(folder), "--outfile", str(output), "--outtype", outtype],
                   check=True, capture_output=True, timeout=600)
    return output
