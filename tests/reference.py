"""Helpers shared by the tests: transformers references for our configs, prompts, greedy loops, checkpoints."""

from __future__ import annotations

import json

import torch

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


def torch_greedy(model, ids: torch.Tensor, mask: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy new tokens [B, steps] of a models/ decoder for a (left-padded) batch."""
    from models import empty_past, position_ids_from_mask

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

    from models.gemma import decoder_of

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
