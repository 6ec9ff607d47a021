"""Helpers shared by the tests: transformers references for our configs, prompts, greedy loops."""

from __future__ import annotations

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
