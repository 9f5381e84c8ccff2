"""Ollama Modelfiles: FROM the GGUF, the chat format as an Ollama Go template, and stop parameters.

Ollama does not run Jinja chat templates; it renders its own Go templates over ``.Messages`` (each with ``.Role``
and ``.Content``) and ``.System``. So the chat format is recognised (from a family name or from the tokenizer's
Jinja template) and written from a table of Go templates, one per family, in the form Ollama's template
documentation gives.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from swiftune_export.atomic import atomic_file

# family -> (Go template, stop strings, marker that identifies the family in a Jinja chat template)
OLLAMA_TEMPLATES: dict[str, tuple[str, tuple[str, ...], str]] = {
    "chatml": (
        "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n",
        ("<|im_start|>", "<|im_end|>"),
        "<|im_start|>",
    ),
    "llama-3": (
        "{{- if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>\n{{- end }}\n"
        "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>\n"
        "{{- end }}<|start_header_id|>assistant<|end_header_id|>\n\n",
        ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        "<|start_header_id|>",
    ),
}


def detect_chat_family(chat_template: str | None) -> str:
    """The family of a Jinja chat template, recognised by its role markers.

    Raises:
        ValueError: no template, or one of a family without an Ollama template here.
    """
    for family, (_, _, marker) in OLLAMA_TEMPLATES.items():
        if chat_template and marker in chat_template:
            return family
    raise ValueError(
        f"Cannot tell the chat format ({sorted(OLLAMA_TEMPLATES)} are supported) from this tokenizer's chat template; "
        "pass chat_template_family= explicitly, or write the Modelfile's TEMPLATE by hand."
    )


def _tokenizer_facts(tokenizer) -> tuple[str | None, str | None]:
    """(chat template, eos token) of a tokenizer object or of a model/tokenizer folder."""
    if tokenizer is None:
        return None, None
    if isinstance(tokenizer, str | os.PathLike):
        folder = Path(tokenizer)
        config_path = folder / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        template = config.get("chat_template")
        if template is None and (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text()
        eos = config.get("eos_token")
        return template, eos.get("content") if isinstance(eos, dict) else eos
    return getattr(tokenizer, "chat_template", None), getattr(tokenizer, "eos_token", None)


def modelfile_text(
    gguf_from: str,
    chat_template_family: str | None = None,
    tokenizer=None,
    system: str | None = None,
    parameters: dict | None = None,
) -> str:
    """The Modelfile as text; see ``write_modelfile``."""
    template, eos = _tokenizer_facts(tokenizer)
    family = chat_template_family or detect_chat_family(template)
    if family not in OLLAMA_TEMPLATES:
        raise ValueError(f"Unknown chat template family {family!r}; choose one of {sorted(OLLAMA_TEMPLATES)}.")
    go_template, stops, _ = OLLAMA_TEMPLATES[family]
    for label, text in (("system", system), ("FROM path", gguf_from)):
        if text is not None and '"""' in text:
            raise ValueError(f'The {label} must not contain """ (it ends a Modelfile block).')
    lines = [f"FROM {gguf_from}", f'TEMPLATE """{go_template}"""']
    if system is not None:
        lines.append(f'SYSTEM """{system}"""')
    # The EOS token ends generation too, when it is not one of the family's markers (e.g. <|endoftext|>).
    for stop in dict.fromkeys((*stops, *([eos] if eos else []))):
        lines.append(f"PARAMETER stop {json.dumps(stop)}")
    for key, value in (parameters or {}).items():
        values = value if isinstance(value, list | tuple) else [value]
        for item in values:
            lines.append(f"PARAMETER {key} {json.dumps(item) if isinstance(item, str) else item}")
    return "\n".join(lines) + "\n"


def write_modelfile(
    out_dir: str | os.PathLike,
    gguf_file: str | os.PathLike,
    chat_template_family: str | None = None,
    tokenizer=None,
    system: str | None = None,
    parameters: dict | None = None,
    overwrite: bool = True,
) -> Path:
    """Write ``out_dir/Modelfile`` for ``ollama create NAME -f Modelfile``.

    Args:
        out_dir: the folder of the Modelfile (usually the GGUF's folder: FROM is then written relative to it).
        gguf_file: the GGUF file.
        chat_template_family: ``"chatml"`` or ``"llama-3"``; by default recognised from the tokenizer's template.
        tokenizer: a tokenizer object (``chat_template``, ``eos_token``) or a folder with tokenizer_config.json /
            chat_template.jinja; its EOS token becomes a stop parameter too.
        system: a default system prompt (SYSTEM).
        parameters: further ``PARAMETER`` lines, e.g. ``{"temperature": 0.7, "num_ctx": 4096}``; a list value
            gives one line per item.
        overwrite: replace an existing Modelfile.

    Returns:
        The Modelfile's path.

    Raises:
        ValueError: the chat format is not recognised or not supported.
    """
    out_dir = Path(out_dir).expanduser()
    gguf_path = Path(gguf_file).expanduser()
    try:
        source = "./" + gguf_path.resolve().relative_to(out_dir.resolve()).as_posix()
    except ValueError:
        source = str(gguf_path.resolve())
    text = modelfile_text(source, chat_template_family, tokenizer, system, parameters)
    target = out_dir / "Modelfile"
    with atomic_file(target, overwrite=overwrite) as staging:
        staging.write_text(text, encoding="utf-8")
    return target
