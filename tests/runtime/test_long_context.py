"""Sequences many windows long on the static layout: tiny Gemma 2 and 3 (window 8) exported with --sliding-cache
ring (sliding-window layers keep 16 slots: the window and a chunk of 8), window (GroupQueryAttention's windowed cache
of 16 slots) and full (96 slots, as the global layers), on the fused graph (GroupQueryAttention where a layer's cache
is not a ring) and the standard one. Through the
runtime: a left-padded batch of two long prompts, prefilled in the chunks the ring takes, then decoded together;
logits at every step against transformers, greedy tokens equal to transformers' generate."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import runtime
from exporter import ExportOptions, export
from exporter.verify import TOLERANCES, backend_steps
from models.loading import load_model
from runtime.spec import RING_CHUNK, ArtifactOptions, ModelSpec, resolve
from tests.reference import left_padded_batch, transformers_reference

# "full" on the fused graph is also what tests/exporter/test_fusions.py and the scheduler's fused tests run: slow here
CASES = [pytest.param(case, id="-".join(case), marks=[pytest.mark.slow] if case[1:] == ("ort", "full") else [])
         for case in [("tiny-gemma2", "ort", "ring"), ("tiny-gemma2", "ort", "full"), ("tiny-gemma2", "ort", "window"),
                      ("tiny-gemma3", "ort", "ring"), ("tiny-gemma3", "ort", "full"), ("tiny-gemma3", "ort", "window"),
                      ("tiny-gemma3", "onnx", "ring")]]
MAX_LENGTH, PROMPTS, NEW = 96, [45, 29], 30


@pytest.fixture(scope="module", params=CASES)
def case(request, tmp_path_factory):
    name, target, sliding_cache = request.param
    folder = tmp_path_factory.mktemp("long") / name
    export(f"random:{name}", folder, ExportOptions(target=target, kv_cache="static", max_length=MAX_LENGTH,
                                                   sliding_cache=sliding_cache, verify=False, progress=False))
    return name, sliding_cache, runtime.load(folder)


@pytest.fixture(scope="module")
def reference(case):
    """transformers' greedy tokens and their logits for the batch (eos ignored: every row runs NEW steps)."""
    name = case[0]
    module, ckpt = load_model(f"random:{name}", progress=False)
    ref = transformers_reference(ckpt.config, module)
    ids, mask = left_padded_batch(ckpt.config.vocab_size, PROMPTS)
    with torch.no_grad():
        out = ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, eos_token_id=None,
                           pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    tokens = out.sequences[:, ids.shape[1]:].numpy()
    return ids.numpy(), mask.numpy(), tokens, [step.float().numpy() for step in out.logits]


def test_the_layout_is_what_was_asked(case):
    name, sliding_cache, model = case
    kv = model.manifest.kv
    window = kv.sliding_window
    sliding_slots = {"ring": window + min(window, RING_CHUNK), "window": 2 * window, "full": MAX_LENGTH}[sliding_cache]
    expected = [sliding_slots if i in kv.sliding_window_layers else MAX_LENGTH for i in range(kv.num_layers)]
    assert list(kv.slots) == expected and kv.sliding_cache == sliding_cache
    assert model.backend.chunk_limit(0) == (None if sliding_cache == "full" else window)
    if model.manifest.graph.target == "ort":  # GroupQueryAttention on the layers whose cache is not a ring
        fused = 0 if sliding_cache == "ring" else len(kv.sliding_window_layers)
        fusions = model.manifest.fusions
        assert fusions["group_query_attention_rotary"] == kv.num_layers - len(kv.sliding_window_layers) + fused
        assert "group_query_attention" not in fusions and model.backend.rows_prefill_over_cache


def test_logits_at_every_step_match_transformers(case, reference):
    _, _, model = case
    ids, mask, tokens, expected = reference
    steps = backend_steps(model.backend, model.manifest, ids, mask, tokens[:, :-1])
    worst = max(float(np.abs(got[:, -1] - want).max()) for got, want in zip(steps, expected))
    assert len(steps) == NEW and worst <= TOLERANCES["fp32"]


def test_greedy_tokens_equal_transformers_generate(case, reference):
    _, _, model = case
    ids, mask, tokens, _ = reference
    got = model.generate(ids, mask, max_new_tokens=NEW, eos_token_id=[])
    np.testing.assert_array_equal(got[:, ids.shape[1]:], tokens)


GEMMA3_270M = ModelSpec(family="gemma3_text", hidden_size=640, num_hidden_layers=18, num_attention_heads=4,
                        num_key_value_heads=1, head_dim=256, vocab_size=262144, max_position_embeddings=32768,
                        sliding_window=512, layer_types=tuple(["sliding_attention"] * 5 + ["full_attention"]) * 3)


def test_the_ring_is_the_static_layouts_default_where_it_is_smaller():
    kv = resolve(ArtifactOptions(kv_cache="static", max_length=32768), GEMMA3_270M).kv
    assert kv.sliding_cache == "ring" and kv.ring_size == 1024 and kv.ring_chunk == 512
    assert kv.slots == tuple(32768 if t == "full_attention" else 1024 for t in GEMMA3_270M.layer_types)
    full = resolve(ArtifactOptions(kv_cache="static", max_length=32768, sliding_cache="full"), GEMMA3_270M).kv
    assert kv.bytes_per_row() / full.bytes_per_row() == pytest.approx((3 * 32768 + 15 * 1024) / (18 * 32768))
    assert [kv.chunk_limit(n) for n in (0, 512, 1000, 1024, 1600)] == [512, 512, 24, 512, 448]
    small = resolve(ArtifactOptions(kv_cache="static", max_length=1024), GEMMA3_270M).kv
    assert small.sliding_cache == "full" and set(small.slots) == {1024} and small.chunk_limit(100) is None
    assert resolve(ArtifactOptions(), GEMMA3_270M).kv.slots == ()  # dynamic: the past grows
    with pytest.raises(ValueError, match="--sliding-cache applies to the static KV layout"):
        resolve(ArtifactOptions(sliding_cache="ring"), GEMMA3_270M)
    with pytest.raises(ValueError, match="--sliding-cache window is GroupQueryAttention's cache: it needs --target ort"):
        resolve(ArtifactOptions(kv_cache="static", max_length=4096, sliding_cache="window"), GEMMA3_270M)


def test_the_window_is_the_fused_static_layouts_default_where_it_is_smaller():
    """--target ort: the sliding-window layers keep GroupQueryAttention's windowed cache (the window and 128 slots),
    which holds a row's latest tokens from slot 0 and compacts every 129 tokens; a float16 export keeps the ring."""
    kv = resolve(ArtifactOptions(target="ort", kv_cache="static", max_length=4096), GEMMA3_270M).kv
    assert kv.sliding_cache == "window" and kv.window_slots == 640 and kv.ring_size is None
    assert kv.slots == tuple(4096 if t == "full_attention" else 640 for t in GEMMA3_270M.layer_types)
    assert [kv.resident(n) for n in (100, 640, 641, 769, 770, 2048)] == [100, 640, 512, 640, 512, 629]
    assert kv.chunk_limit(1000) == 512  # the kernel's scratch: a window's worth of new tokens a run
    fp16 = resolve(ArtifactOptions(target="ort", dtype="fp16", kv_cache="static", max_length=4096), GEMMA3_270M).kv
    assert fp16.sliding_cache == "ring"
    with pytest.raises(ValueError, match="--sliding-cache window is fused for float32 graphs, not fp16"):
        resolve(ArtifactOptions(target="ort", dtype="fp16", kv_cache="static", max_length=4096,
                                sliding_cache="window"), GEMMA3_270M)


def test_a_manifest_whose_slots_do_not_fit_is_refused(case, tmp_path):
    import json
    import shutil

    from runtime.manifest import ArtifactError, read_manifest

    folder = tmp_path / "edited"
    shutil.copytree(case[2].manifest.folder, folder)
    data = json.loads((folder / "manifest.json").read_text())
    data["kv"]["slots"] = data["kv"]["slots"][:-1]
    (folder / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match=r"kv.slots \[.*\] must give each of the \d layers 1 to 96 slots"):
        read_manifest(folder, verify=False)


def test_a_chat_turn_keeps_a_ring_prefix_only_while_the_ring_holds_its_window(case):
    """The ring (window 8, chunks of 8, 16 slots) holds a row's latest 16 tokens: of 30, a prefix of m is whole
    when the window before position m is still there, m >= 30 - 8 - 1 (runtime/kv.py). The windowed cache (16 slots)
    keeps a prefix that it has not compacted since."""
    _, sliding_cache, model = case
    model.generate(np.arange(3, 33)[None], max_new_tokens=1, eos_token_id=[])  # the cache holds 30 tokens
    cache = model.cache
    assert cache.lengths[0] == 30
    if sliding_cache == "window":  # 16 slots, window 8: compacts 9 at once; after 30 tokens, the last 12 in slots 0-11
        assert cache.reusable(0, 29) and not cache.reusable(0, 24)  # 24 held its last 15: not a prefix of those
        return
    assert cache.reusable(0, 24) and cache.reusable(0, 21)
    assert cache.reusable(0, 20) == (sliding_cache != "ring")
    if sliding_cache == "ring":
        with pytest.raises(ValueError, match="cannot keep 20 tokens"):
            cache.keep(0, 20)


def long_ids(tokenizer, n: int) -> np.ndarray:
    """The first n tokens (after <bos>) of the held-out and calibration texts, repeated as often as n needs."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    text = (root / "tests/data/heldout.txt").read_text() + "\n\n" + (root / "exporter/data/calibration.txt").read_text()
    ids = tokenizer(text, add_special_tokens=False).input_ids
    ids = (ids * (n // len(ids) + 1))[: n - 1]
    return np.array([[tokenizer.bos_token_id, *ids]], np.int64)


@pytest.fixture(scope="module")
def real_8000(real_reference, real_tokenizer):
    """An 8,000-token prompt, transformers' 20 greedy tokens after it and its logits at each of those steps."""
    ids = long_ids(real_tokenizer, 8000)
    with torch.no_grad():
        out = real_reference.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.ones(ids.shape, dtype=torch.long),
                                      max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0,
                                      output_logits=True, return_dict_in_generate=True)
    return ids, out.sequences[:, ids.shape[1]:].numpy(), [step.float().numpy() for step in out.logits]


def runtime_steps(model, ids, tokens):
    """The runtime's last-position logits at every step, fed the prompt (in chunks) then `tokens`."""
    steps = backend_steps(model.backend, model.manifest, ids, np.ones(ids.shape, np.int64), tokens)
    return [step[:, -1] for step in steps]


@pytest.mark.real
@pytest.mark.slow  # transformers' 8,000-token reference takes minutes; the tiny models' windows run by default
def test_an_8000_token_prompt_on_the_real_models_window(real_static_artifact, real_8000):
    """The sliding-window layers keep 640 slots of the 8,192 (GroupQueryAttention's windowed cache): the prompt
    prefills in one run. Last-position logits within 1e-3 of transformers', and 20 greedy tokens equal (each step's
    argmax, fed transformers' tokens, is transformers' next token)."""
    ids, tokens, expected = real_8000
    model = runtime.load(real_static_artifact)
    assert model.manifest.kv.sliding_cache == "window" and model.manifest.kv.window_slots == 640
    got = runtime_steps(model, ids, tokens[:, :-1])
    assert float(np.abs(got[0] - expected[0]).max()) <= 1e-3
    assert [int(step.argmax()) for step in got] == tokens[0].tolist()


@pytest.fixture(scope="module")
def real_fp16_ring(tmp_path_factory, real_model_dir):
    folder = tmp_path_factory.mktemp("real-fp16") / "gemma3-270m-fp16"
    export("gemma3-270m", folder, ExportOptions(target="ort", dtype="fp16", kv_cache="static", max_length=8192,
                                                logits="last", verify=False, progress=False))
    return runtime.load(folder)


@pytest.mark.real
@pytest.mark.slow  # an fp16 export of the real model of its own; the default run stays near 20 minutes
def test_fp16_stays_finite_over_8000_tokens(real_fp16_ring, real_8000):
    """float16 weights and KV cache, the residual stream in float32: finite at every step, and within the float16
    tolerance of transformers' float32 logits (measured: 0.018)."""
    ids, tokens, expected = real_8000
    got = runtime_steps(real_fp16_ring, ids, tokens[:, :3])
    assert all(np.isfinite(step).all() for step in got)
    assert max(float(np.abs(g - e).max()) for g, e in zip(got, expected)) <= TOLERANCES["fp16"]


@pytest.mark.slow
@pytest.mark.real
def test_a_32k_token_prompt_on_the_real_models_window(tmp_path, real_model_dir, real_tokenizer):
    """32,000 tokens on --max-length 32768 (the model's context): the sliding layers keep 640 slots. The reference
    is models/ in PyTorch with every layer's cache full, fed the same chunks (transformers would hold a
    [heads, 32k, 32k] score matrix: 16 GB a layer); models/ equals transformers (tests/models/test_parity.py).
    Last-position logits within 1e-3, 8 greedy tokens equal."""
    from models import empty_past

    folder = tmp_path / "gemma3-270m-32k"
    export("gemma3-270m", folder, ExportOptions(target="ort", kv_cache="static", max_length=32768, logits="last",
                                                verify=False, progress=False))
    model = runtime.load(folder)
    assert model.manifest.kv.window_slots == 640
    ids = long_ids(real_tokenizer, 32000)

    reference, _ = load_model(real_model_dir, kv_layout="static", progress=False)
    past = empty_past(reference.config, 1, 32000 + 8)
    step, done, tokens = torch.from_numpy(ids), 0, []
    with torch.no_grad():
        while len(tokens) < 8:
            size = min(step.shape[1] - done, 512)
            piece = step[:, done:done + size]
            mask = torch.ones(1, done + size if not tokens else ids.shape[1] + len(tokens), dtype=torch.long)
            positions = torch.arange(mask.shape[1] - size, mask.shape[1])[None]
            logits, past = reference(piece, positions, mask, past, logits_to_keep=1)
            done += size
            if done == step.shape[1]:
                if not tokens:
                    first = logits[0, -1].numpy()
                tokens.append(int(logits[0, -1].argmax()))
                step, done = torch.tensor([[tokens[-1]]]), 0

    got = runtime_steps(model, ids, np.array([tokens[:-1]]))
    assert float(np.abs(got[0][0] - first).max()) <= 1e-3
    assert [int(s.argmax()) for s in got] == tokens
