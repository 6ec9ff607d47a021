"""The artifact's chat template (chat_template.jinja), rendered as transformers renders it."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path


class ChatTemplate:
    def __init__(self, source: str, bos_token: str = "<bos>"):
        self.source = source
        self.bos_token = bos_token

    @classmethod
    def from_dir(cls, folder: str | Path, bos_token: str = "<bos>") -> "ChatTemplate | None":
        path = Path(folder) / "chat_template.jinja"
        return cls(path.read_text(), bos_token) if path.is_file() else None

    @cached_property
    def _template(self):
        # transformers' apply_chat_template: a sandboxed environment, trim_blocks and lstrip_blocks.
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        return env.from_string(self.source)

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or "role" not in message or "content" not in message:
                raise ValueError(f"message {i} must be a dict with 'role' and 'content', got {message!r}")
        return self._template.render(
            messages=messages, bos_token=self.bos_token, add_generation_prompt=add_generation_prompt
        )


def _raise(message: str):
    raise ValueError(f"chat template: {message}")
