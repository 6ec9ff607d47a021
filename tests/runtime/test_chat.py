"""Chat templates rendered as transformers' apply_chat_template renders them (same template, same messages)."""

from __future__ import annotations

import pytest

from runtime.chat import DEFAULT_CHAT_TEMPLATE, ChatTemplate, ChatTemplateError

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "  What is the capital of France?  "},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy? ünïcödé 世界 🎉"},
    ],
    [  # content as a list of parts, as multimodal chats write it
        {"role": "system", "content": [{"type": "text", "text": "Be kind."}]},
        {"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": " there "}]},
    ],
]

# Templates that use what transformers' environment adds to jinja2: loop controls, its tojson, namespaces,
# {% generation %}, the special tokens as variables.
FEATURES_TEMPLATE = """{{ bos_token }}{% set ns = namespace(n=0) %}
{%- for m in messages %}{% if m['role'] == 'system' %}{% continue %}{% endif %}{% set ns.n = ns.n + 1 %}
{%- if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}{{ eos_token }}{% endgeneration %}
{%- else %}[{{ ns.n }}] {{ m | tojson }}
{% endif %}{% if ns.n > 3 %}{% break %}{% endif %}{% endfor %}
{%- if add_generation_prompt %}>{% endif %}"""


@pytest.fixture(scope="module")
def reference(tiny_tokenizer_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


@pytest.mark.parametrize("template", [DEFAULT_CHAT_TEMPLATE, FEATURES_TEMPLATE], ids=["gemma", "features"])
@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_rendering_matches_transformers(reference, template, messages, add_generation_prompt):
    ours = ChatTemplate(template).render(messages, add_generation_prompt=add_generation_prompt)
    theirs = reference.apply_chat_template(messages, chat_template=template, tokenize=False,
                                           add_generation_prompt=add_generation_prompt)
    assert ours == theirs


def test_gemma_format():
    text = ChatTemplate(DEFAULT_CHAT_TEMPLATE).render(CONVERSATIONS[1])
    assert text == ("<bos><start_of_turn>user\nAnswer briefly.\n\nWhat is the capital of France?<end_of_turn>\n"
                    "<start_of_turn>model\nParis.<end_of_turn>\n"
                    "<start_of_turn>user\nAnd of Italy? ünïcödé 世界 🎉<end_of_turn>\n<start_of_turn>model\n")


def test_special_tokens_come_from_the_tokenizer_config():
    assert ChatTemplate("{{ bos_token }}|{{ eos_token }}", {"bos_token": "<s>"}).render(CONVERSATIONS[0]) == "<s>|<eos>"


def test_template_errors_name_the_problem():
    with pytest.raises(ChatTemplateError, match="chat template: Conversation roles must alternate"):
        ChatTemplate(DEFAULT_CHAT_TEMPLATE).render([{"role": "assistant", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="chat_template.jinja is not a valid jinja2 template"):
        ChatTemplate("{% for %}").render(CONVERSATIONS[0])
    with pytest.raises(ValueError, match="message 0 must be a dict with a 'role'"):
        ChatTemplate(DEFAULT_CHAT_TEMPLATE).render([{"content": "x"}])


def test_the_sandbox_refuses_python_internals():
    with pytest.raises(ChatTemplateError):
        ChatTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}").render(CONVERSATIONS[0])
