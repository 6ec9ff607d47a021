"""The generation loop against PyTorch: token for token, both KV layouts, batches, stops, chat, streaming."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import runtime
from runtime.generate import ContextLengthError
from tests import reference
from tests.reference import PROMPTS


def torch_greedy(model, ids: np.ndarray, mask: np.ndarray, steps: int) -> np.ndarray:
    return reference.torch_greedy(model, torch.from_numpy(ids), torch.from_numpy(mask), steps).numpy()


@pytest.mark.parametrize("layout", ["dynamic", "static"])
def test_tiny_greedy_matches_pytorch(tiny_artifacts, tiny_torch, layout):
    model = runtime.load(tiny_artifacts[layout])
    ids = np.array([[0, 0, 0, 2, 17, 99, 5], [2, 40, 41, 42, 43, 44, 45]], np.int64)
    mask = (ids != 0).astype(np.int64)
    expected = torch_greedy(tiny_torch, ids, mask, 30)  # 37 tokens: far past the window of 8
    out = model.generate(ids, attention_mask=mask, max_new_tokens=30, eos_token_id=[])
    assert out.shape == (2, 37)
    assert (out[:, 7:] == expected).all()
    assert len(set(expected[0].tolist())) > 5


def test_static_layout_allocates_nothing_per_step(tiny_artifacts):
    """One KV buffer per cache tensor, written in place: the same memory at every step, and again in the next call."""
    model = runtime.load(tiny_artifacts["static"])
    backend = model.backend
    seen = []
    run = type(backend)._run

    def spy(self, *args, **kwargs):
        seen.append([v.data_ptr() for v in self._buffers])
        return run(self, *args, **kwargs)

    backend._run = spy.__get__(backend)
    for _ in range(2):
        model.generate(np.array([[2, 5, 6], [2, 7, 8]]), max_new_tokens=8, eos_token_id=[])
    assert len(seen) == 2 * 8 and all(step == seen[0] for step in seen)  # every step of both calls
    assert len(set(seen[0])) == 12  # one buffer each for 6 layers' keys and values: past and present alike


def test_assumed_context_reads_the_filled_slots(tiny_artifacts):
    """scripts/bench_long.py's decode after a context it did not compute: KVCache.assume counts the tokens, and
    the backend's fill writes the very buffers a step reads (its logits follow the value written)."""
    model = runtime.load(tiny_artifacts["static"])
    logits = []
    for value in (0.0, 0.5, 0.5):
        cache = model.new_cache(1, 40)
        cache.assume(0, 30)
        model.backend.fill(value)
        logits.append(cache.feed(slice(0, 1), np.array([[7]])))
    assert cache.lengths[0] == 31
    assert not np.allclose(logits[0], logits[1]) and np.array_equal(logits[1], logits[2])


def test_context_limits(tiny_artifacts):
    static = runtime.load(tiny_artifacts["static"])  # max_length 64: the buffers cannot grow
    with pytest.raises(ContextLengthError, match="the prompt has 64 tokens but the context holds 64"):
        static.generate(np.full((1, 64), 7), max_new_tokens=4)
    with pytest.raises(ContextLengthError, match="70 tokens do not fit the static KV cache of 64; lower max_new_tokens to 4"):
        static.generate(np.full((1, 60), 7), max_new_tokens=10)
    assert static.generate(np.full((1, 60), 7), max_new_tokens=4, eos_token_id=[]).shape == (1, 64)
    dynamic = runtime.load(tiny_artifacts["dynamic"])
    dynamic.context_length = 64  # as if the model's context were 64: max_new_tokens is cut to fit
    assert dynamic.generate(np.full((1, 60), 7), max_new_tokens=10, eos_token_id=[]).shape == (1, 64)


def test_eos_stops_each_row_and_pads(tiny_artifacts, tiny_torch):
    model = runtime.load(tiny_artifacts["dynamic"])
    ids = np.array([[2, 17, 99, 5]], np.int64)
    expected = torch_greedy(tiny_torch, ids, np.ones_like(ids), 10)[0]
    eos = int(expected[3])
    out = model.generate(ids, max_new_tokens=10, eos_token_id=eos)
    first = int(np.flatnonzero(expected == eos)[0])
    assert out[0, 4:].tolist() == expected[: first + 1].tolist()


def test_generate_validates_options(tiny_artifacts):
    model = runtime.load(tiny_artifacts["dynamic"])
    with pytest.raises(ValueError, match="top_p 0.0 is out of range"):
        model.generate(np.array([[2, 3]]), do_sample=True, top_p=0.0)
    with pytest.raises(ValueError, match="max_new_tokens 0 is out of range"):
        model.generate(np.array([[2, 3]]), max_new_tokens=0)
    with pytest.raises(ValueError, match="no tokenizer.json"):
        model.generate_text("hello")


def test_seeded_sampling_is_repeatable(tiny_artifacts):
    model = runtime.load(tiny_artifacts["dynamic"])
    runs = [model.generate(np.array([[2, 3, 4]]), max_new_tokens=12, do_sample=True, seed=3, eos_token_id=[])
            for _ in range(2)]
    assert (runs[0] == runs[1]).all()
    other = model.generate(np.array([[2, 3, 4]]), max_new_tokens=12, do_sample=True, seed=4, eos_token_id=[])
    assert not (runs[0] == other).all()


@pytest.fixture(scope="module")
def model(real_artifact):
    return runtime.load(real_artifact)


@pytest.mark.real
class TestRealModel:
    def test_onnx_logits_match_transformers(self, real_artifact, real_reference, real_tokenizer):
        """Every position of three prompts (one of ~700 tokens, past the 512 window): <= 1e-3."""
        import onnxruntime as ort

        session = ort.InferenceSession(str(real_artifact / "model.onnx"))
        worst = 0.0
        for prompt in PROMPTS:
            ids = real_tokenizer(prompt, return_tensors="np").input_ids
            feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(ids.shape[1])[None]}
            empty = np.zeros((1, 1, 0, 256), np.float32)
            feeds.update({f"past_key_values.{i}.{kv}": empty for i in range(18) for kv in ("key", "value")})
            logits = session.run(["logits"], feeds)[0]
            with torch.no_grad():
                expected = real_reference(input_ids=torch.from_numpy(ids)).logits.numpy()
            worst = max(worst, float(np.abs(logits - expected).max()))
        assert worst <= 1e-3

    @pytest.mark.parametrize("prompt", PROMPTS)
    def test_greedy_matches_transformers(self, model, real_reference, real_tokenizer, prompt):
        enc = real_tokenizer(prompt, return_tensors="pt")
        expected = real_reference.generate(**enc, max_new_tokens=40, do_sample=False)
        ids = enc.input_ids.numpy()
        out = model.generate(ids, max_new_tokens=40)
        assert out.tolist() == expected.numpy().tolist()

    def test_batch_of_two_matches_transformers(self, model, real_reference, real_tokenizer):
        prompts = PROMPTS[:2]
        real_tokenizer.padding_side = "left"
        enc = real_tokenizer(prompts, return_tensors="pt", padding=True)
        expected = real_reference.generate(**enc, max_new_tokens=24, do_sample=False)
        out = model.generate(enc.input_ids.numpy(), attention_mask=enc.attention_mask.numpy(), max_new_tokens=24)
        assert out.tolist() == expected.numpy().tolist()

    def test_text_pipeline_and_streaming(self, model):
        options = runtime.SamplingParams(max_new_tokens=20)
        text = model.generate_text("The capital of France is", options)
        assert text.startswith(" the capital of the country of France")
        assert "".join(model.stream("The capital of France is", options)) == text
        result = runtime.pipeline("text-generation", model=model)("The capital of France is", max_new_tokens=20)
        assert result == [{"generated_text": "The capital of France is" + text}]
        batch = runtime.pipeline("text-generation", model=model)(["The capital of France is", "Hi"], max_new_tokens=5)
        assert len(batch) == 2 and batch[0][0]["generated_text"].startswith("The capital of France is the capital")

    def test_stop_strings(self, model):
        options = runtime.SamplingParams(max_new_tokens=30, stop=("France.",))
        text = model.generate_text("The capital of France is", options)
        assert text == " the capital of the country of "
        assert "".join(model.stream("The capital of France is", options)) == text

    def test_chat_keeps_the_cache_between_turns(self, model):
        options = runtime.SamplingParams(max_new_tokens=12)
        chat = model.chat_session(options)
        first = "".join(chat.send("Name a color."))
        after_first = list(chat.cached)
        second = "".join(chat.send("Name another one."))
        # The second turn prefilled only what the first turn's cache did not hold (at least the first prompt)...
        first_prompt = model.tokenizer.encode(model.apply_chat_template(chat.messages[:1]), add_special_tokens=False)
        rendered = model.apply_chat_template(chat.messages[:3])
        full = model.tokenizer.encode(rendered, add_special_tokens=False)
        reused = len(full) - chat.prefilled
        assert reused >= len(first_prompt) and full[:reused] == after_first[:reused]
        assert model.backend.past_length == len(chat.cached)
        # ...and its reply equals a fresh run on the whole conversation.
        assert second == model.generate_text(rendered, options, chat=True)
        assert first == chat.messages[1]["content"]

    def test_pipeline_with_chat_messages(self, model):
        messages = [{"role": "user", "content": "Say hello."}]
        out = runtime.pipeline("text-generation", model=model)(messages, max_new_tokens=8)
        conversation = out[0]["generated_text"]
        assert conversation[:1] == messages and conversation[1]["role"] == "assistant"
