"""A production image installs the runtime alone: importing it must not need torch, transformers or onnx."""

from __future__ import annotations

import subprocess
import sys

BLOCK = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'transformers', 'onnx', 'onnxscript', 'models', 'exporter'):
            raise ImportError(f'{name} is blocked in this test')
sys.meta_path.insert(0, Block())
"""


def run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK + code], capture_output=True, text=True, timeout=120)


def test_the_block_works():
    assert run("import torch").returncode != 0


def test_import_runtime_is_cheap():
    """`import runtime` loads neither the blocked packages nor onnxruntime, tokenizers or jinja2 (they come
    with the first model, tokenizer or template)."""
    code = """
import runtime
print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'onnx', 'onnxruntime', 'tokenizers', 'jinja2'}))
"""
    result = run(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_runtime_modules_import_without_torch():
    code = """
import runtime, runtime.cli, runtime.bench, runtime.backends.onnxruntime_backend, runtime.generate, runtime.chat
import runtime.manifest, runtime.pipeline, runtime.sampling, runtime.tokenizer, runtime.backends.base
runtime.make_sampler(temperature=0.5, seed=1)
runtime.chat.ChatTemplate(runtime.chat.DEFAULT_CHAT_TEMPLATE).render([{'role': 'user', 'content': 'hi'}])
print('ok', sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'onnx')))
"""
    result = run(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok []"


def test_runtime_generates_without_torch(tiny_text_artifacts):
    code = f"""
import numpy as np, runtime
model = runtime.load({str(tiny_text_artifacts['dynamic'])!r})
out = model.generate(np.array([[2, 10, 11, 12]]), max_new_tokens=5, eos_token_id=[])
text = ''.join(model.stream('Paris', runtime.SamplingParams(max_new_tokens=5)))
print(out.shape, text == model.generate_text('Paris', runtime.SamplingParams(max_new_tokens=5)))
"""
    result = run(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "(1, 9) True"
