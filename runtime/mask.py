"""gemma-run mask: which tokens each token attends to, per layer type, as the artifact's graph masks them: the
counterpart of transformers' AttentionMaskVisualizer, read from the manifest (no session is started).

    full_attention     causal, and padding: a left-padded batch's pads are seen by no one (dynamic layout)
    sliding_attention  causal, padding, and the window: token q sees tokens q - W + 1 .. q
    the ring           static layout, --sliding-cache ring: a sliding-window layer keeps R slots; token i goes to
                       slot i mod R, and after n tokens slot j holds the row's latest token there (or nothing)
    the window         static layout, --sliding-cache window: a sliding-window layer keeps GroupQueryAttention's
                       windowed cache, the row's latest tokens in order from slot 0 (KVSpec.resident)

The rules are models/gemma.py's (attention_masks, ring_mask), here in numpy for the torch-free runtime;
tests/runtime/test_mask.py holds the two to each other.
"""

from __future__ import annotations

import numpy as np

from .manifest import Manifest

SEEN, UNSEEN = "■", "⬚"
GREEN, DIM, RESET = "\033[92m", "\033[2m", "\033[0m"


def token_masks(attention_mask: np.ndarray, sliding_window: int | None) -> dict[str, np.ndarray]:
    """[B, T, T] boolean masks of one run over a left-padded batch [B, T] (every position a query), by layer type:
    query i sees key j when j <= i, j is no pad, and (sliding layers) j > i - W."""
    T = attention_mask.shape[1]
    q, k = np.arange(T)[:, None], np.arange(T)[None, :]
    full = (k <= q)[None] & attention_mask.astype(bool)[:, None, :]
    masks = {"full_attention": full}
    if sliding_window is not None:
        masks["sliding_attention"] = full & (k > q - sliding_window)[None]
    return masks


def ring_slots(length: int, ring_size: int) -> np.ndarray:
    """[R]: the token each ring slot holds after `length` tokens, -1 for a slot not written yet."""
    j = np.arange(ring_size)
    held = j + ring_size * (np.maximum(length - 1 - j, 0) // ring_size)
    return np.where(j < length, held, -1)


def ring_mask(lengths: np.ndarray, seq_len: int, slots: int, ring_size: int, sliding_window: int) -> np.ndarray:
    """[B, S, slots]: what each of a step's S queries sees on the ring (models.gemma.ring_mask)."""
    held = np.stack([ring_slots(int(n), ring_size)[:slots] for n in lengths])[:, None, :]  # [B, 1, K]
    q = (np.asarray(lengths)[:, None] - seq_len + np.arange(seq_len))[:, :, None]  # [B, S, 1]
    return (held >= 0) & (held <= q) & (held > q - sliding_window)


def layer_groups(manifest: Manifest) -> dict[str, list[int]]:
    """The layers of each type, in order of first appearance."""
    groups: dict[str, list[int]] = {}
    for i, layer_type in enumerate(manifest.model.layer_types):
        groups.setdefault(layer_type, []).append(i)
    return groups


def grid(labels: list[str], mask: np.ndarray, color: bool) -> list[str]:
    """Rows of a query x key grid: ■ seen, ⬚ not; the diagonal green, pads dimmed (with color)."""
    n = mask.shape[1]
    columns = list(range(n))
    width = max(len(repr(label)) for label in labels)
    digits = len(str(max(columns, default=0)))
    lines = [" " * (width + digits + 3) + " ".join(row) for row in zip(*[str(c).rjust(digits) for c in columns])]
    for i, label in enumerate(labels):
        cells = []
        for j in range(n):
            cell = SEEN if mask[i, j] else UNSEEN
            if color and columns[j] == i and mask[i, j]:
                cell = f"{GREEN}{cell}{RESET}"
            cells.append(cell)
        name = repr(label).ljust(width)
        if color and label == "<pad>":
            name = f"{DIM}{name}{RESET}"
        lines.append(f"{str(i).rjust(digits)} {name}  " + " ".join(cells))
    return lines


def _ranges(layers: list[int]) -> str:
    """[0, 1, 2, 4, 5] -> "0-2, 4-5"."""
    spans, start = [], layers[0]
    for previous, current in zip(layers, layers[1:] + [None]):
        if current != previous + 1:
            spans.append(f"{start}-{previous}" if previous > start else str(start))
            start = current
    return ", ".join(spans)


def describe(manifest: Manifest, rows: list[list[str]], pad: str = "<pad>", color: bool = False) -> str:
    """The report for the prompts' token strings `rows`: each prompt's grid per layer type, as the artifact's
    layout runs them (dynamic: one left-padded batch; static: each row on its own), and the ring's slots."""
    kv = manifest.kv
    static = kv is not None and kv.layout == "static"
    window = manifest.model.sliding_window if "sliding_attention" in manifest.model.layer_types else None
    width = max(len(r) for r in rows)
    lines = []
    for index, tokens in enumerate(rows):
        pads = 0 if static else width - len(tokens)
        labels = [pad] * pads + tokens
        masks = token_masks(np.array([[0] * pads + [1] * len(tokens)], np.int64), window)
        layout = "static layout: a row of its own" if static else f"dynamic layout: left-padded to {width}"
        lines.append(f"prompt {index + 1}: {len(tokens)} tokens ({layout})")
        for layer_type, layers in layer_groups(manifest).items():
            rules = "causal" + ("" if static else ", padding")
            ring = kv.ring_size if static and layer_type == "sliding_attention" else None
            if layer_type == "sliding_attention":
                rules += f", window {window}"
            window_slots = kv.window_slots if static and layer_type == "sliding_attention" else None
            if ring:
                rules += f"; a ring of {ring} slots"
            elif window_slots:
                rules += (f"; a windowed cache of {window_slots} slots (GroupQueryAttention's: the row's latest "
                          f"{kv.resident(len(labels))} tokens from slot 0)")
            elif static:
                rules += f"; {kv.max_length} slots"
            lines.append(f"  {layer_type} (layers {_ranges(layers)}): {rules}")
            lines.extend("    " + line for line in grid(labels, masks[layer_type][0], color))
            if ring:
                lines.append("    " + _ring_summary(len(labels), ring))
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _ring_summary(length: int, ring_size: int) -> str:
    """Which token each slot holds after the prompt, runs of consecutive slots merged."""
    held = ring_slots(length, ring_size)
    parts, start = [], 0
    for j in range(1, ring_size + 1):
        if j < ring_size and (held[j] < 0 if held[start] < 0 else held[j] == held[j - 1] + 1):
            continue  # the run goes on
        slots = f"slot {start}" if j - 1 == start else f"slots {start}-{j - 1}"
        if held[start] < 0:
            parts.append(f"{slots} empty")
        else:
            parts.append(f"{slots}: token {held[start]}" if j - 1 == start else
                         f"{slots}: tokens {held[start]}-{held[j - 1]}")
        start = j
    return f"ring after {length} tokens: " + ", ".join(parts)
