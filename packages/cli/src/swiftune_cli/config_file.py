"""YAML config files of ``swiftune train``: read and checked against the schema, merged with flags, printed back."""

from __future__ import annotations

import os
from pathlib import Path

from swiftune_cli.config_schema import GROUPS, OPTIONS, OPTIONS_BY_KEY, defaults, validated


def load_config_file(path: str | os.PathLike) -> dict:
    """The checked settings of a YAML config file (a flat mapping of schema keys).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the YAML does not parse, is not a mapping, or holds an unknown key or a wrong value.
    """
    import yaml

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"Config file '{path}' does not exist.")
    try:
        content = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ValueError(
            f"Config file '{path}' is not valid YAML{where}: {getattr(error, 'problem', error)}."
        ) from None
    if content is None:
        return {}
    if not isinstance(content, dict):
        raise ValueError(f"Config file '{path}' must hold a mapping of keys to values, not a {type(content).__name__}.")
    return validated(content, f"config file '{path.name}'")


def merged_config(config_path: str | os.PathLike | None, flag_values: dict) -> dict:
    """Defaults, overridden by the config file, overridden by the flags given on the command line.

    Args:
        config_path: a YAML file, or None.
        flag_values: only the options given as flags (the parser leaves the others out).
    """
    config = defaults()
    if config_path is not None:
        config.update(load_config_file(config_path))
    config.update({key: value for key, value in flag_values.items() if key in OPTIONS_BY_KEY})
    return config


def config_to_yaml(config: dict) -> str:
    """The settings as a YAML config file, grouped under comments, that ``--config`` reads back unchanged."""
    import yaml

    lines = []
    for group in GROUPS:
        lines.append(f"# {group}")
        for option in OPTIONS:
            if option.group == group:
                lines.append(f"{option.key}: {_yaml_value(yaml, config[option.key])}")
        lines.append("")
    return "\n".join(lines)


def _yaml_value(yaml, value) -> str:
    # One line per key: lists in flow style ([a, b]); the document-end marker a bare scalar gets is dropped.
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    return text.removesuffix("...").strip()
