"""`pipeline("text-generation", model=DIR)`: transformers' pipeline call on our artifacts.

    gen = runtime.pipeline("text-generation", model="artifacts/gemma3-270m")
    gen("The capital of France is", max_new_tokens=20)     [{"generated_text": prompt + completion}]
    gen(["a", "b"])                                         [[{...}], [{...}]]
    gen([{"role": "user", "content": "Hi"}])               [{"generated_text": [messages..., assistant reply]}]
"""

from __future__ import annotations

from .model import GemmaRuntime, load
from .params import SamplingParams


class TextGenerationPipeline:
    """Called with a prompt, a list of prompts, a conversation (a list of {"role", "content"}) or a list
    of conversations; returns what transformers' text-generation pipeline returns. With
    return_full_text=False the generated text is the completion (the reply) alone."""

    def __init__(self, model: GemmaRuntime):
        self.model = model

    def __call__(self, inputs, max_new_tokens: int | None = None, do_sample: bool = False, temperature: float = 1.0,
                 top_k: int = 50, top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0,
                 seed: int | None = None, return_full_text: bool = True, stop_strings=None, **unused):
        if unused:
            raise TypeError(f"unsupported generation arguments: {', '.join(sorted(unused))}; supported: max_new_tokens, "
                            "do_sample, temperature, top_k, top_p, min_p, repetition_penalty, seed, return_full_text, "
                            "stop_strings")
        options = SamplingParams.from_transformers(
            max_new_tokens or 256, do_sample, temperature, top_k, top_p, min_p, repetition_penalty, seed, stop_strings
        )
        if _is_conversation(inputs):
            return self._chat([inputs], options, return_full_text)[0]
        if isinstance(inputs, list) and inputs and all(_is_conversation(c) for c in inputs):
            return self._chat(inputs, options, return_full_text)
        single = isinstance(inputs, str)
        prompts = [inputs] if single else list(inputs)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("inputs must be a prompt, a list of prompts, or chat messages ({'role', 'content'} dicts)")
        completions = self.model.generate_text(prompts, options)
        results = [[{"generated_text": p + c if return_full_text else c}] for p, c in zip(prompts, completions)]
        return results[0] if single else results

    def _chat(self, conversations, options, return_full_text):
        rendered = [self.model.apply_chat_template(c) for c in conversations]
        replies = self.model.generate_text(rendered, options, chat=True)
        if not return_full_text:
            return [[{"generated_text": r}] for r in replies]
        return [[{"generated_text": [*c, {"role": "assistant", "content": r}]}] for c, r in zip(conversations, replies)]


def _is_conversation(inputs) -> bool:
    return isinstance(inputs, list) and bool(inputs) and all(isinstance(m, dict) for m in inputs)


def pipeline(task: str = "text-generation", model=None, provider: str = "cpu", **load_options) -> TextGenerationPipeline:
    """A text-generation pipeline over an artifact directory (or a loaded GemmaRuntime)."""
    if task != "text-generation":
        raise ValueError(f"task {task!r} is not supported by runtime.pipeline; supported: text-generation")
    if model is None:
        raise ValueError("pipeline needs model=<artifact directory> (exported with gemma-export)")
    runtime = model if isinstance(model, GemmaRuntime) else load(model, provider=provider, **load_options)
    return TextGenerationPipeline(runtime)
