"""gemma-run mask: the numpy rules against models/gemma.py's masks, and what the command prints."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from models.gemma import attention_masks
from models.gemma import ring_mask as torch_ring_mask
from runtime.cli import main
from runtime.mask import ring_mask, ring_slots, token_masks


@pytest.mark.parametrize("window", [None, 3])
def test_token_masks_are_the_graphs_for_a_left_padded_batch(window):
    mask = np.array([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]], np.int64)
    full, sliding = attention_masks(torch.from_numpy(mask), 7, 7, window)
    ours = token_masks(mask, window)
    np.testing.assert_array_equal(ours["full_attention"], full[:, 0].numpy())
    if window:
        np.testing.assert_array_equal(ours["sliding_attention"], sliding[:, 0].numpy())


def test_the_ring_rule_is_the_graphs():
    rng = np.random.default_rng(0)
    for _ in range(50):
        ring = int(rng.integers(4, 12))
        window = int(rng.integers(1, ring))
        seq_len = int(rng.integers(1, ring - window + 1))
        lengths = rng.integers(seq_len, 4 * ring, size=3)
        slots = min(int(lengths.max()), ring)
        expected = torch_ring_mask(torch.from_numpy(lengths), seq_len, slots, ring, window)[:, 0].numpy()
        np.testing.assert_array_equal(ring_mask(lengths, seq_len, slots, ring, window), expected)


def test_ring_slots_hold_each_residues_latest_token():
    assert ring_slots(3, 6).tolist() == [0, 1, 2, -1, -1, -1]
    assert ring_slots(9, 6).tolist() == [6, 7, 8, 3, 4, 5]


def run(*args, input=None):
    return CliRunner().invoke(main, ["mask", *map(str, args)], input=input)


def test_the_static_ring_is_drawn_with_its_slots(tiny_text_artifacts):
    prompt = " the of and" * 7  # 22 tokens with <bos>: the ring of 16 slots has wrapped
    result = run(tiny_text_artifacts["static"], prompt)
    assert result.exit_code == 0, result.output
    out = result.output
    assert "sliding_attention (layers 0-4): causal, window 8; a ring of 16 slots" in out
    assert "full_attention (layers 5): causal; 64 slots" in out
    assert "ring after 22 tokens: slots 0-5: tokens 16-21, slots 6-15: tokens 6-15" in out
    rows = [line for line in out.splitlines() if line.startswith("    21 ")]  # the last token, in each grid
    assert [row.count("■") for row in rows] == [8, 22]  # the window's 8; every token


def test_the_dynamic_layout_pads_shorter_prompts(tiny_text_artifacts):
    result = run(tiny_text_artifacts["dynamic"], " the of and is", " the of")
    assert result.exit_code == 0, result.output
    out = result.output
    assert "prompt 2: 3 tokens (dynamic layout: left-padded to 5)" in out
    second = out[out.index("prompt 2"):]
    pad_rows = [line for line in second.splitlines() if "'<pad>'" in line]
    assert len(pad_rows) == 2 * 2  # 2 pads, in both layer types' grids
    last = [line for line in second.splitlines() if line.startswith("    4 ")]
    assert len(last) == 2 and all(row.split()[-5:] == ["⬚", "⬚", "■", "■", "■"] for row in last)  # pads unseen


def test_no_prompt_is_a_usage_error(tiny_text_artifacts):
    result = run(tiny_text_artifacts["static"], input="")
    assert result.exit_code == 2 and "a prompt is empty" in result.output
