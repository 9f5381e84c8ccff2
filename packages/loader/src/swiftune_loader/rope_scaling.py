"""RoPE scaling on the config, before the model is built: the user's own, or one that stretches the positions to
``max_seq_length`` when it is longer than the model's ``max_position_embeddings``.

transformers 5 keeps RoPE settings in ``config.rope_parameters`` (``rope_type``, ``rope_theta``, ``factor``, ...);
``rope_scaling`` is its deprecated alias. Models with a different RoPE per layer type (Gemma 3) nest one dict per
type. How each type is stretched:

- "default" becomes "linear" with ``factor = max_seq_length / max_position_embeddings``. Linear (position
  interpolation) rather than "dynamic": dynamic NTK changes the frequencies with the length of each batch, so a
  model would train on positions computed differently from one batch to the next; linear gives every sequence the
  same positions, which fine-tuning then adapts to.
- "linear", "llama3" (Llama 3.1 / 3.2) and "yarn" keep their type, and their ``factor`` is multiplied by the same
  ratio. For llama3 this keeps the model's own smoothing between high and low frequencies (its
  ``low_freq_factor`` / ``high_freq_factor`` and ``original_max_position_embeddings``) and stretches the low
  frequencies further, the way Llama 3.1 itself was extended from 8k.
- "dynamic" is left as it is: it already rescales by itself beyond ``max_position_embeddings``.
- Others ("longrope" with its per-frequency factor lists, ...) are left as they are, with a warning.

Where the factor changed, ``max_position_embeddings`` becomes ``max_seq_length``.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

_MULTIPLIED = ("linear", "llama3", "yarn")


def set_user_rope_scaling(config, rope_scaling: dict) -> None:
    """Put the user's RoPE scaling on ``config``, keeping the model's ``rope_theta`` (and partial rotary factor).

    Accepts transformers 4's spelling (``{"type": "linear", "factor": 2.0}``) and 5's (``rope_type``).
    """
    if not isinstance(rope_scaling, dict) or not ({"type", "rope_type"} & set(rope_scaling)):
        raise ValueError(
            f"rope_scaling must be a dict with a 'rope_type' (e.g. {{'rope_type': 'linear', 'factor': 2.0}}), "
            f"got {rope_scaling!r}."
        )
    wanted = dict(rope_scaling)
    if "type" in wanted:
        wanted.setdefault("rope_type", wanted.pop("type"))
    current = getattr(config, "rope_parameters", None) or {}
    kept = {k: current[k] for k in ("rope_theta", "partial_rotary_factor") if k in current}
    config.rope_parameters = {**kept, **wanted}
    if hasattr(config, "standardize_rope_params"):
        config.standardize_rope_params()
        config.validate_rope()
    logger.info("RoPE scaling set as given: %s.", config.rope_parameters)


def extend_rope_to(config, max_seq_length: int) -> str | None:
    """Scale ``config``'s RoPE so that ``max_seq_length`` positions fit; see the module docstring.

    Returns:
        The one line that was logged about it, or None when nothing needed to change.
    """
    max_positions = getattr(config, "max_position_embeddings", None)
    parameters = getattr(config, "rope_parameters", None)
    if not max_positions or not parameters or max_seq_length <= max_positions:
        return None
    ratio = max_seq_length / max_positions
    nested = not ({"rope_type", "rope_theta"} & set(parameters))
    # Sliding-window layers see a local window only: stretching their positions would change them for nothing.
    groups = [p for key, p in parameters.items() if p and key != "sliding_attention"] if nested else [parameters]
    kinds = {group.get("rope_type", "default") for group in groups}
    unsupported = kinds - {"default", "dynamic", *_MULTIPLIED}
    if unsupported:
        message = (
            f"max_seq_length={max_seq_length} is beyond the model's {max_positions} positions, and its RoPE type "
            f"{sorted(unsupported)} cannot be stretched: it is left as it is (longer sequences may degrade)."
        )
        logger.warning(message)
        return message
    if kinds == {"dynamic"}:
        message = (
            f"max_seq_length={max_seq_length} is beyond the model's {max_positions} positions: its dynamic RoPE "
            "scaling stretches by itself."
        )
        logger.info(message)
        return message
    for group in groups:
        kind = group.get("rope_type", "default")
        if kind == "default":
            group["rope_type"], group["factor"] = "linear", ratio
        elif kind in _MULTIPLIED:
            group["factor"] = float(group.get("factor", 1.0)) * ratio
    config.max_position_embeddings = int(max_seq_length)
    summary = ", ".join(f"{g['rope_type']} factor {g['factor']:g}" for g in groups if "factor" in g)
    message = (
        f"max_seq_length={max_seq_length} is beyond the model's {max_positions} positions: RoPE scaling {summary} "
        "(config.rope_parameters)."
    )
    # A warning, not info: it changes what every position means, which the user should see without logging set up.
    logger.warning(message)
    return message
