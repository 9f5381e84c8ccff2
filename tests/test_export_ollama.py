"""The Ollama Modelfile for the tiny ChatML tokenizer, against a fixture taken from Ollama's template documentation."""

import re

import pytest

from swiftune_export import write_modelfile
from swiftune_tokenizers_fix.testing import build_chat_tokenizer

# docs/template.md of ollama/ollama, "Example Messages / ChatML", in a TEMPLATE block; the documented template ends at
# "assistant", here followed by the newline that the Jinja template's generation prompt has ('<|im_start|>assistant\n').
EXPECTED_CHATML = '''FROM ./model-q4_k.gguf
TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
"""
SYSTEM """You answer in one sentence."""
PARAMETER stop "<|im_start|>"
PARAMETER stop "<|im_end|>"
PARAMETER temperature 0.7
PARAMETER num_ctx 4096
'''


def test_chatml_modelfile_text(tmp_path):
    tokenizer = build_chat_tokenizer()
    gguf_file = tmp_path / "model-q4_k.gguf"
    gguf_file.write_bytes(b"GGUF")
    path = write_modelfile(
        tmp_path,
        gguf_file,
        tokenizer=tokenizer,
        system="You answer in one sentence.",
        parameters={"temperature": 0.7, "num_ctx": 4096},
    )
    assert path == tmp_path / "Modelfile"
    assert path.read_text() == EXPECTED_CHATML


def _render_go_messages_template(template: str, messages: list[dict]) -> str:
    """Enough of Go's text/template for these templates: '{{-' / '-}}' trimming, range .Messages, .Role, .Content."""
    template = re.sub(r"\s*\{\{-", "{{", template)
    template = re.sub(r"-\}\}\s*", "}}", template)
    head, rest = template.split("{{ range .Messages }}")
    body, tail = rest.split("{{ end }}")
    out = head
    for message in messages:
        out += body.replace("{{ .Role }}", message["role"]).replace("{{ .Content }}", message["content"])
    return out + tail


def test_go_template_renders_like_the_jinja_template(tmp_path):
    """Ollama's prompt for a conversation must equal transformers' apply_chat_template for it."""
    tokenizer = build_chat_tokenizer()
    text = write_modelfile(tmp_path, tmp_path / "m.gguf", tokenizer=tokenizer).read_text()
    go_template = re.search(r'TEMPLATE """(.*?)"""', text, re.S).group(1)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Where is Quillhaven?"},
        {"role": "assistant", "content": "In the Sea of Marrow."},
        {"role": "user", "content": "When was it founded?"},
    ]
    jinja = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert _render_go_messages_template(go_template, messages) == jinja


def test_llama3_family_and_errors(tmp_path):
    text = write_modelfile(tmp_path, tmp_path / "m.gguf", chat_template_family="llama-3").read_text()
    assert "<|start_header_id|>{{ .Role }}<|end_header_id|>" in text
    assert 'PARAMETER stop "<|eot_id|>"' in text
    with pytest.raises(ValueError, match="chat_template_family="):
        write_modelfile(tmp_path, tmp_path / "m.gguf", tokenizer=None, overwrite=True)
    with pytest.raises(ValueError, match="choose one of"):
        write_modelfile(tmp_path, tmp_path / "m.gguf", chat_template_family="vicuna")
