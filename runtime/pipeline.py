"""`pipeline("text-generation", model=DIR)`: the seeds' pipeline use, on our artifacts."""

from __future__ import annotations

from .model import GemmaRuntime, GenerationOptions, load


class TextGenerationPipeline:
    """Called with a prompt, a list of prompts, or chat messages; returns what transformers' returns:
    [{"generated_text": prompt + completion}] (a list of those for a list of prompts), and for messages
    the conversation with the assistant's reply appended."""

    def __init__(self, model: GemmaRuntime):
        self.model = model

    def __call__(self, inputs, max_new_tokens: int | None = None, do_sample: bool = False, temperature: float = 1.0,
                 top_k: int = 50, top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0,
                 seed: int | None = None, return_full_text: bool = True, stop_strings=None, **unused):
        if unused:
            raise TypeError(f"unsupported generation arguments: {', '.join(sorted(unused))}")
        options = GenerationOptions.from_transformers(
            max_new_tokens or 256, do_sample, temperature, top_k, top_p, min_p, repetition_penalty, seed, stop_strings
        )
        if _is_chat(inputs):
            reply = self.model.generate_text(self.model.apply_chat_template(inputs), options, chat=True)
            if not return_full_text:
                return [{"generated_text": reply}]
            return [{"generated_text": [*inputs, {"role": "assistant", "content": reply}]}]
        single = isinstance(inputs, str)
        prompts = [inputs] if single else list(inputs)
        completions = self.model.generate_text(prompts, options)
        results = [[{"generated_text": (p + c) if return_full_text else c}] for p, c in zip(prompts, completions)]
        return results[0] if single else results


def _is_chat(inputs) -> bool:
    return isinstance(inputs, list) and bool(inputs) and isinstance(inputs[0], dict)


def pipeline(task: str = "text-generation", model=None, provider: str = "cpu", **load_options) -> TextGenerationPipeline:
    if task != "text-generation":
        raise ValueError(f"task {task!r} is not supported by runtime.pipeline; supported: text-generation")
    if model is None:
        raise ValueError("pipeline needs model=<artifact directory> (exported with gemma-export)")
    runtime = model if isinstance(model, GemmaRuntime) else load(model, provider=provider, **load_options)
    return TextGenerationPipeline(runtime)
