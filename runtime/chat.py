"""Chat templates (chat_template.jinja), rendered as transformers' apply_chat_template renders them:
a sandboxed jinja2 environment with trim_blocks and lstrip_blocks, loop controls, its tojson,
raise_exception and strftime_now, and the tokenizer's special tokens as variables."""

from __future__ import annotations

import json
from datetime import datetime
from functools import cached_property
from pathlib import Path

TEMPLATE_NAME = "chat_template.jinja"

# Gemma 3's chat template (google/gemma-3-*-it, tokenizer_config.json), which the exporter writes when
# the source checkpoint has none: turns are `<start_of_turn>{user|model}\n{text}<end_of_turn>\n`, a
# system message is prepended to the first user turn, and the generation prompt opens a model turn.
DEFAULT_CHAT_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""


class ChatTemplateError(ValueError):
    """The template refused the conversation (raise_exception) or could not be rendered."""


class ChatTemplate:
    def __init__(self, source: str, special_tokens: dict[str, str] | None = None):
        """`special_tokens`: the variables transformers passes from the tokenizer (bos_token, eos_token...)."""
        self.source = source
        self.special_tokens = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
                               **(special_tokens or {})}

    @classmethod
    def from_dir(cls, folder: str | Path, special_tokens: dict[str, str] | None = None) -> "ChatTemplate | None":
        """The folder's chat_template.jinja, or None when it has none."""
        path = Path(folder) / TEMPLATE_NAME
        return cls(path.read_text(), special_tokens) if path.is_file() else None

    @cached_property
    def _template(self):
        import jinja2

        try:
            return _environment().from_string(self.source)
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"{TEMPLATE_NAME} is not a valid jinja2 template: {e}") from e

    def render(self, messages: list[dict], add_generation_prompt: bool = True, **variables) -> str:
        """The conversation as the model's prompt text (starting with <bos> when the template writes it)."""
        import jinja2

        if not isinstance(messages, list) or not messages:
            raise ValueError(f"messages must be a non-empty list of {{'role', 'content'}} dicts, got {messages!r}")
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or "role" not in message:
                raise ValueError(f"message {i} must be a dict with a 'role' (and 'content'), got {message!r}")
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         **{**self.special_tokens, **variables})
        except ChatTemplateError:
            raise
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"chat template: {e}") from e


def _environment():
    """transformers' environment (utils/chat_template_utils.py, _compile_jinja_template)."""
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                       extensions=[jinja2.ext.loopcontrols, _generation_tag()])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def _raise(message: str):
    raise ChatTemplateError(f"chat template: {message}")


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers' override: no HTML escaping, and its options exposed
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _generation_tag():
    """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask marker): renders its body."""
    import jinja2.ext
    import jinja2.nodes

    class GenerationTag(jinja2.ext.Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    return GenerationTag
