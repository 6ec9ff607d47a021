"""Text generation on tiny-gemma3 (random weights) with a tiny Gemma-style tokenizer, both KV layouts:
streaming, stop strings, batches, the pipeline's shapes, chat turns that reuse the cache, and the
loop's sampling options against transformers' processors on the PyTorch source."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import runtime
from tests import reference

from .conftest import END_OF_TURN

PROMPT = "The capital of France is"
LAYOUTS = ["dynamic", "static"]


@pytest.fixture(scope="module", params=LAYOUTS)
def model(request, tiny_text_artifacts):
    return runtime.load(tiny_text_artifacts[request.param])


@pytest.fixture(scope="module")
def dynamic(tiny_text_artifacts):
    return runtime.load(tiny_text_artifacts["dynamic"])


def options(**kw):
    return runtime.SamplingParams(**{"max_new_tokens": 24, **kw})


def test_text_is_the_decoded_tokens(model):
    ids = model.tokenizer.encode(PROMPT)
    tokens = model.generate([ids], max_new_tokens=24, eos_token_id=[])[0, len(ids):]
    end = next((i for i, t in enumerate(tokens) if t in model.eos_token_ids), len(tokens))
    assert model.generate_text(PROMPT, options()) == model.tokenizer.decode(tokens[:end])


def test_stream_concatenates_to_the_completion(model):
    for kw in ({}, {"temperature": 0.9, "top_p": 0.9, "seed": 5}):
        text = model.generate_text(PROMPT, options(**kw))
        pieces = list(model.stream(PROMPT, options(**kw)))
        assert "".join(pieces) == text and len(pieces) > 1


def test_stop_strings_cut_the_completion_before_them(model):
    full = model.generate_text(PROMPT, options(max_new_tokens=40))
    stop = full[len(full) // 2 : len(full) // 2 + 3]  # a piece from the middle of what the model writes
    expected = full[: full.find(stop)]
    assert len(expected) < len(full)
    assert model.generate_text(PROMPT, options(max_new_tokens=40, stop=("\x00never", stop))) == expected
    assert "".join(model.stream(PROMPT, options(max_new_tokens=40, stop=(stop,)))) == expected


def test_batch_rows_equal_single_prompts(model):
    prompts = [PROMPT, "Paris", "a b c d e f g h the of and"]  # three lengths: left padding
    batch = model.generate_text(prompts, options(max_new_tokens=12))
    assert batch == [model.generate_text(p, options(max_new_tokens=12)) for p in prompts]


def test_batch_stop_strings_end_each_row(dynamic):
    prompts = [PROMPT, "Paris"]
    full = dynamic.generate_text(prompts, options(max_new_tokens=30))
    stop = full[0][5:8]
    cut = dynamic.generate_text(prompts, options(max_new_tokens=30, stop=(stop,)))
    assert cut == [text if stop not in text else text[: text.find(stop)] for text in full]


def test_rows_end_at_their_own_end_token_and_are_padded(dynamic):
    ids, mask = dynamic.tokenizer.encode_batch([PROMPT, "Paris is"])
    free = dynamic.generate(ids, attention_mask=mask, max_new_tokens=16, eos_token_id=[])
    eos = int(free[0, ids.shape[1] + 2])  # row 0's third new token becomes the end token
    out = dynamic.generate(ids, attention_mask=mask, max_new_tokens=16, eos_token_id=eos, pad_token_id=0)
    for row in range(2):
        new, expected = out[row, ids.shape[1]:].tolist(), free[row, ids.shape[1]:].tolist()
        end = expected.index(eos) + 1 if eos in expected else len(expected)
        assert new[:end] == expected[:end] and set(new[end:]) <= {0}


def test_pipeline_returns_what_transformers_returns(dynamic):
    generate = runtime.pipeline("text-generation", model=dynamic)
    completion = dynamic.generate_text(PROMPT, options(max_new_tokens=8))
    assert generate(PROMPT, max_new_tokens=8) == [{"generated_text": PROMPT + completion}]
    assert generate(PROMPT, max_new_tokens=8, return_full_text=False) == [{"generated_text": completion}]
    assert generate([PROMPT, "Paris"], max_new_tokens=8)[0] == [{"generated_text": PROMPT + completion}]
    messages = [{"role": "user", "content": "Hi"}]
    reply = dynamic.generate_text(dynamic.apply_chat_template(messages), options(max_new_tokens=8), chat=True)
    assert generate(messages, max_new_tokens=8) == [{"generated_text": [*messages, {"role": "assistant", "content": reply}]}]
    assert generate([messages, messages], max_new_tokens=8, return_full_text=False) == [[{"generated_text": reply}]] * 2
    with pytest.raises(TypeError, match="unsupported generation arguments: num_beams"):
        generate(PROMPT, num_beams=4)


def test_chat_template_output_is_not_given_a_second_bos(dynamic):
    rendered = dynamic.apply_chat_template([{"role": "user", "content": "Hi"}])
    ids, _ = dynamic.encode([rendered], chat=True)
    assert ids[0, 0] == 2 and ids[0, 1] != 2


def test_chat_reuses_the_cache_and_answers_as_a_fresh_run(model):
    # Short turns: the static cache holds 64 tokens, and a reply of random tokens re-tokenizes longer.
    chat = model.chat_session(options(max_new_tokens=5), system="a")
    first = "".join(chat.send("Hi"))
    held = list(chat.cached)
    second = "".join(chat.send("Ok"))
    rendered = model.apply_chat_template(chat.messages[:4])
    full = model.tokenizer.encode(rendered, add_special_tokens=False)
    reused = len(full) - chat.prefilled
    first_prompt = model.tokenizer.encode(model.apply_chat_template(chat.messages[:2]), add_special_tokens=False)
    assert reused >= len(first_prompt) and full[:reused] == held[:reused]
    assert model.cache.lengths[0] == len(chat.cached)
    assert chat.messages[2] == {"role": "assistant", "content": first}
    assert second == model.generate_text(rendered, options(max_new_tokens=5), chat=True)


def test_chat_starts_over_after_another_generation(dynamic):
    chat = dynamic.chat_session(options(max_new_tokens=6))
    "".join(chat.send("Name a color."))
    dynamic.generate_text("Paris", options(max_new_tokens=3))  # the backend's cache now holds something else
    second = "".join(chat.send("And another one?"))
    rendered = dynamic.apply_chat_template(chat.messages[:3])
    assert chat.prefilled == len(dynamic.tokenizer.encode(rendered, add_special_tokens=False))
    assert second == dynamic.generate_text(rendered, options(max_new_tokens=6), chat=True)
    chat.reset()
    assert chat.messages == [] and chat.cached == []


def test_end_of_turn_ends_a_reply(dynamic):
    ids = dynamic.tokenizer.encode(PROMPT)
    out = dynamic.generate([ids], max_new_tokens=20, eos_token_id=[])[0, len(ids):].tolist()
    forced = out[3]
    dynamic.eos_token_ids = [1, END_OF_TURN, forced]  # as if the model had written <end_of_turn> there
    try:
        text = dynamic.generate_text(PROMPT, options(max_new_tokens=20))
        assert text == dynamic.tokenizer.decode(out[: out.index(forced)])
        assert "".join(dynamic.stream(PROMPT, options(max_new_tokens=20))) == text
    finally:
        dynamic.eos_token_ids = [1, END_OF_TURN]


def test_all_logits_and_keeping_a_prefix(model):
    """Every position's logits, then the row cut back to 3 tokens and the last two fed again: the same logits as in
    one pass (runtime/kv.py: a copy of the past in the dynamic layout, a shorter length in the static one)."""
    cache = model.new_cache(1, 8)
    ids = np.array([[2, 30, 31, 32, 33]])
    every = cache.feed(slice(0, 1), ids, all_logits=True)
    assert every.shape == (1, 5, 512)
    cache.keep(0, 3)
    last = cache.feed(slice(0, 1), ids[:, 3:])
    np.testing.assert_allclose(last, every[:, -1], atol=1e-5)
    assert cache.lengths[0] == 5 and cache.tokens[0] == ids[0].tolist()
    with pytest.raises(ValueError, match="row 0 cannot keep 9 tokens"):
        cache.keep(0, 9)


def test_generation_config_supplies_defaults(tiny_text_artifacts, tmp_path):
    import shutil

    from runtime.manifest import read_manifest, write_manifest

    folder = tmp_path / "artifact"
    shutil.copytree(tiny_text_artifacts["dynamic"], folder)
    manifest = read_manifest(folder)
    (folder / "generation_config.json").write_text(json.dumps({"do_sample": True, "top_k": 5, "temperature": 0.7}))
    write_manifest(folder, manifest)
    model = runtime.load(folder)
    ids = np.array([[2, 30, 31]])
    by_default = model.generate(ids, max_new_tokens=10, seed=4, eos_token_id=[])
    explicit = model.generate(ids, max_new_tokens=10, do_sample=True, top_k=5, temperature=0.7, seed=4, eos_token_id=[])
    greedy = model.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=[])
    assert (by_default == explicit).all() and not (by_default == greedy).all()


def test_repetition_penalty_as_transformers_generate_does(dynamic, tiny_torch):
    """Greedy with a repetition penalty: transformers' processor on the PyTorch source, step by step."""
    from transformers import RepetitionPenaltyLogitsProcessor

    from models import empty_past, position_ids_from_mask

    ids = torch.tensor([[2, 40, 41, 40, 41, 40]])
    penalty = RepetitionPenaltyLogitsProcessor(1.5)
    seq, mask, past, step = ids, torch.ones_like(ids), empty_past(tiny_torch.config, 1), ids
    with torch.no_grad():
        for _ in range(20):
            logits, past = tiny_torch(step, position_ids_from_mask(mask)[:, -step.shape[1]:], mask, past)
            step = penalty(seq, logits[:, -1]).argmax(-1, keepdim=True)
            seq = torch.cat([seq, step], dim=1)
            mask = torch.cat([mask, torch.ones_like(step)], dim=1)
    out = dynamic.generate(ids.numpy(), max_new_tokens=20, repetition_penalty=1.5, eos_token_id=[])
    assert out.tolist() == seq.tolist()
    plain = reference.torch_greedy(tiny_torch, ids, torch.ones_like(ids), 20)
    assert plain.tolist() != seq[:, ids.shape[1]:].tolist()  # the penalty changed something
