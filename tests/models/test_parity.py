"""models/ against transformers: every family's tiny config, and the real Gemma 3 270M."""

from __future__ import annotations

import pytest
import torch

from models import empty_past, position_ids_from_mask, presets, random_model
from models.gemma import decoder_of, ring_mask
from models.loading import load_model
from runtime.spec import ArtifactOptions, ModelSpec, resolve
from tests.families import ALL
from tests.reference import PROMPTS, left_padded_batch, torch_greedy, transformers_reference

FP32_TOL = 1e-4


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
    outputs = []
    with torch.no_grad():
        out = ref(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=True)
        outputs.append(out.logits)
        cache = out.past_key_values
        for t in range(decode_ids.shape[1]):
            mask = torch.cat([mask, torch.ones(ids.shape[0], 1, dtype=mask.dtype)], dim=1)
            out = ref(
                input_ids=decode_ids[:, t : t + 1],
                attention_mask=mask,
                position_ids=position_ids_from_mask(mask)[:, -1:],
                past_key_values=cache,
                use_cache=True,
            )
            outputs.append(out.logits)
            cache = out.past_key_values
    return outputs


def max_diff(ours, theirs, mask):
    """Largest |difference| over the real (non-pad) positions of every step."""
    diffs = [(ours[0] - theirs[0])[mask.bool()].abs().max()]
    diffs += [(a - b).abs().max() for a, b in zip(ours[1:], theirs[1:])]
    return float(max(diffs))


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
@pytest.mark.parametrize("name", ALL)
def test_tiny_family_matches_transformers(name, static):
    config = presets.config(name)
    model = random_model(config, seed=1, kv_layout="static" if static else "dynamic")
    ref = transformers_reference(config, model)
    # Two prompts of different lengths, left-padded; 12 + 6 steps crosses the sliding window of 8.
    ids, mask = left_padded_batch(config.vocab_size, [12, 7])
    decode_ids = torch.randint(3, config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(2))
    ours = run_steps(model, config, ids, mask, decode_ids, static_length=32 if static else None)
    theirs = reference_steps(ref, ids, mask, decode_ids)
    assert max_diff(ours, theirs, mask) <= FP32_TOL


@pytest.mark.parametrize("sliding_cache", ["ring", "full"])
@pytest.mark.parametrize("name", ["tiny-gemma2", "tiny-gemma3"])
def test_sliding_layers_on_a_ring_match_transformers_many_windows_long(name, sliding_cache):
    """Window 8: the ring holds 16 slots (the window and a chunk of 8), so prompts of 45 and 29 tokens prefill in
    chunks that wrap around it, and 30 decode steps wrap it again; global layers keep all 96 slots."""
    config = presets.config(name)
    ring = 2 * config.sliding_window if sliding_cache == "ring" else None
    model = random_model(config, seed=1, kv_layout="static", ring_size=ring)
    ref = transformers_reference(config, model)
    ids, mask = left_padded_batch(config.vocab_size, [45, 29])
    decode_ids = torch.randint(3, config.vocab_size, (2, 30), generator=torch.Generator().manual_seed(2))
    ours = run_steps(model, config, ids, mask, decode_ids, static_length=96)
    theirs = reference_steps(ref, ids, mask, decode_ids)
    assert max_diff(ours, theirs, mask) <= FP32_TOL


def test_ring_mask_keeps_each_slots_latest_token_in_the_window():
    """The ring's mask by hand: ring of 6 slots, window 4, a row of 9 tokens after a step of 2 queries (7, 8)."""
    mask = ring_mask(torch.tensor([9]), seq_len=2, slots=6, ring_size=6, sliding_window=4)[0, 0]
    # slots 0..5 hold tokens 6, 7, 8, 3, 4, 5 (the latest of each residue mod 6)
    assert mask.tolist() == [[True, True, False, False, True, True],   # query 7 sees 4..7
                             [True, True, True, False, False, True]]   # query 8 sees 5..8
    short = ring_mask(torch.tensor([3]), seq_len=1, slots=3, ring_size=6, sliding_window=4)[0, 0]
    assert short.tolist() == [[True, True, True]]  # before the ring wraps: slot j is token j


@pytest.mark.parametrize("name", ALL)
def test_greedy_decoding_is_not_degenerate(name):
    """Random weights must give varied greedy tokens, or KV-cache bugs hide (DESIGN.md)."""
    config = presets.config(name)
    model = random_model(config)
    ids, mask = left_padded_batch(config.vocab_size, [5])
    tokens = torch_greedy(model, ids, mask, 48)[0].tolist()
    assert len(set(tokens)) >= 12


@pytest.mark.parametrize("task", ["feature-extraction", "sequence-classification", "token-classification"])
def test_heads_match_transformers(task):
    config = presets.config("tiny-gemma-2b")  # the seeds' GemmaFor{Sequence,Token}Classification
    model = random_model(config, task=task)
    ref = transformers_reference(config, model, task=task)
    ids, mask = left_padded_batch(config.vocab_size, [9, 5])
    with torch.no_grad():
        ours, _ = model(ids, position_ids_from_mask(mask), mask, empty_past(config, 2))
        out = ref(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask))
    theirs = out.last_hidden_state if task == "feature-extraction" else out.logits
    if task == "sequence-classification":
        assert float((ours - theirs).abs().max()) <= FP32_TOL
    else:
        assert float((ours - theirs)[mask.bool()].abs().max()) <= FP32_TOL


@pytest.mark.real
def test_real_model_logits_and_greedy_tokens(real_model_dir, real_reference, real_tokenizer):
    model, _ = load_model(real_model_dir, progress=False)
    config = model.config
    worst = 0.0
    for prompt in PROMPTS:
        enc = real_tokenizer(prompt, return_tensors="pt")
        ids, mask = enc.input_ids, enc.attention_mask
        with torch.no_grad():
            ours, _ = model(ids, position_ids_from_mask(mask), mask, empty_past(config, 1))
            theirs = real_reference(input_ids=ids, attention_mask=mask).logits
        worst = max(worst, float((ours - theirs).abs().max()))
    assert real_tokenizer(PROMPTS[-1], return_tensors="pt").input_ids.shape[1] > 512
    assert worst <= 1e-3

    # 40 greedy tokens, identical to transformers' generate.
    enc = real_tokenizer(PROMPTS[0], return_tensors="pt")
    expected = real_reference.generate(**enc, max_new_tokens=40, do_sample=False)[0, enc.input_ids.shape[1] :]
    tokens = torch_greedy(model, enc.input_ids, enc.attention_mask, 40)[0].tolist()
    assert tokens == expected.tolist()
    assert real_tokenizer.decode(tokens).startswith(" the capital of the country of France")
