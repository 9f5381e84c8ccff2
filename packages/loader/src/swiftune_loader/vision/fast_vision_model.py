"""FastVisionModel: load a vision-language model and its processor, add LoRA by role, switch modes.

It takes the loading options of :class:`swiftune_loader.FastLanguageModel` (dtype, 4-bit, 8-bit, full fine-tuning,
gradient checkpointing, fast path) and checks them with the same shared functions; the model is loaded through
transformers' ``AutoModelForImageTextToText`` and the processor through ``AutoProcessor``. Adapters are added by
``FastLanguageModel.get_peft_model`` once the targets are chosen by role (:mod:`swiftune_loader.vision.lora_targets`).
"""

from __future__ import annotations

import logging
import os

import torch

from swiftune_kernels import apply_offloaded_checkpointing
from swiftune_loader.checkpointing import disable_checkpointing, enable_checkpointing
from swiftune_loader.fast_language_model import FastLanguageModel
from swiftune_loader.inference_mode import unwrap
from swiftune_loader.loading_options import (
    apply_tokenizer_fix,
    check_loading_options,
    check_stored_quantization,
    quantization_config,
    require_bitsandbytes,
    stored_quantization,
    target_device,
    weight_dtype,
)
from swiftune_loader.model_path import resolve_model_path
from swiftune_loader.precision import resolve_device_map, resolve_dtype
from swiftune_loader.vision.architectures import LAYOUTS, layout_of
from swiftune_loader.vision.fast_path import patch_language_model
from swiftune_loader.vision.lora_targets import all_linear_targets, role_targets
from swiftune_loader.vision.processors import load_processor

logger = logging.getLogger(__name__)

# What for_inference changed, kept on the model so that for_training restores exactly that.
_STATE = "_swiftune_inference_state"


class FastVisionModel:
    """Load vision-language models for fine-tuning, add LoRA adapters by role, and switch between training and
    inference."""

    @staticmethod
    def from_pretrained(
        model_name: str | os.PathLike,
        max_seq_length: int = 2048,
        dtype: torch.dtype | str | None = None,
        load_in_4bit: bool = False,
        load_in_8bit: bool = False,
        full_finetuning: bool = False,
        device_map=None,
        trust_remote_code: bool = False,
        use_gradient_checkpointing: bool | str = "offload",
        fast_path: bool | None = None,
        fix_tokenizer=None,
        **kwargs,
    ):
        """Load a vision-language model and its processor from a local folder (or a hub id in the local cache).

        Args:
            model_name: a model folder holding config.json, safetensors weights and the processor files.
            max_seq_length: longest sequence (text and image tokens) to train on; stored on the model and tokenizer.
            dtype: weight and compute dtype; None picks bfloat16 on GPUs that support it, float32 on the CPU.
            load_in_4bit: quantize the vision tower's and language model's linear weights to NF4 (QLoRA); the
                projectors and the lm_head stay in ``dtype``.
            load_in_8bit: quantize them to int8 instead.
            full_finetuning: train all weights instead of adapters (no quantization allowed).
            device_map: passed to transformers; None puts the model on the first GPU, or the CPU.
            trust_remote_code: run code shipped in the model folder; off unless you trust the folder.
            use_gradient_checkpointing: "offload" (recompute each layer in backward, and park each language layer's
                input in pinned CPU memory until backward where that pays), True (recompute only) or False. Applied
                by :meth:`get_peft_model`, or here with full_finetuning.
            fast_path: put swiftune's kernels into the language model. None: on a GPU only. The handle that undoes
                it is ``model._swiftune_patch``.
            fix_tokenizer: a callable ``(model, tokenizer) -> tokenizer`` applied to the processor's tokenizer.
            **kwargs: passed on to ``AutoModelForImageTextToText.from_pretrained``.

        Returns:
            (model, processor)

        Raises:
            ValueError: a contradictory option, or a text-only model (load those with FastLanguageModel).
            FileNotFoundError: the folder is missing or holds no model.
        """
        from transformers import AutoConfig, AutoModelForImageTextToText

        check_loading_options(
            max_seq_length, load_in_4bit, load_in_8bit, full_finetuning, use_gradient_checkpointing, fix_tokenizer
        )
        if model_name is None or str(model_name).strip() == "":
            raise ValueError("FastVisionModel needs a vision-language model: pass the folder that holds config.json.")
        path = resolve_model_path(model_name, load_in_4bit=load_in_4bit)
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        if getattr(config, "vision_config", None) is None:
            raise ValueError(
                f"'{model_name}' is a text-only model (model_type={config.model_type!r}); load it with "
                "FastLanguageModel.from_pretrained."
            )
        check_stored_quantization(stored_quantization(config), load_in_4bit, load_in_8bit, full_finetuning)
        compute_dtype = resolve_dtype(dtype)
        device_map = resolve_device_map(device_map)
        quantization = None
        if load_in_4bit or load_in_8bit:
            require_bitsandbytes(target_device(device_map), "load_in_4bit" if load_in_4bit else "load_in_8bit")
            quantization = quantization_config(load_in_4bit, load_in_8bit, compute_dtype)
            # Projectors are small and carry every image feature into the text space: they stay in 16-bit.
            quantization.llm_int8_skip_modules = _unquantized_modules(config)
        model = AutoModelForImageTextToText.from_pretrained(
            path,
            config=config,
            dtype=weight_dtype(compute_dtype, full_finetuning),
            device_map=device_map,
            quantization_config=quantization,
            trust_remote_code=trust_remote_code,
            use_safetensors=kwargs.pop("use_safetensors", True),
            **kwargs,
        )
        processor = load_processor(path, trust_remote_code=trust_remote_code)
        tokenizer = apply_tokenizer_fix(fix_tokenizer, model, processor.tokenizer)
        tokenizer.model_max_length = int(max_seq_length)
        processor.tokenizer = tokenizer
        model.max_seq_length = int(max_seq_length)
        model._swiftune_tokenizer = tokenizer  # for_inference pads it on the left, for_training puts it back
        model._swiftune_gradient_checkpointing = use_gradient_checkpointing
        model._swiftune_full_finetuning = bool(full_finetuning)
        if full_finetuning:
            model.requires_grad_(True)
            _enable_checkpointing(model, use_gradient_checkpointing)
        if fast_path is None:
            fast_path = next(model.parameters()).is_cuda
        model._swiftune_patch = patch_language_model(model) if fast_path else None
        logger.info("Loaded %s (%s, %s) on %s.", path, config.model_type, compute_dtype, model.device)
        return model, processor

    @staticmethod
    def get_peft_model(
        model,
        finetune_vision_layers: bool = True,
        finetune_language_layers: bool = True,
        finetune_attention_modules: bool = True,
        finetune_mlp_modules: bool = True,
        r: int = 16,
        target_modules: list[str] | str | None = None,
        lora_alpha: int = 16,
        lora_dropout: float = 0.0,
        bias: str = "none",
        use_gradient_checkpointing: bool | str | None = None,
        random_state: int = 3407,
        use_rslora: bool = False,
        modules_to_save: list[str] | None = None,
        **kwargs,
    ):
        """Wrap ``model`` with LoRA adapters chosen by role (a peft ``PeftModel``); only the adapters are trained.

        Args:
            model: a model from :meth:`from_pretrained`.
            finetune_vision_layers: adapt the vision tower's blocks.
            finetune_language_layers: adapt the language model's layers.
            finetune_attention_modules: adapt attention projections (self- and cross-attention).
            finetune_mlp_modules: adapt MLP projections.
            r: LoRA rank (> 0).
            target_modules: None to choose by the four switches; "all-linear" for every linear layer but the
                lm_head (vision tower, projectors, language model); or a list of module names / a regex as peft
                takes them, which overrides the switches.
            lora_alpha: LoRA scaling numerator (scale = lora_alpha / r, or / sqrt(r) with use_rslora).
            lora_dropout: dropout on the adapter input.
            bias: "none", "all" or "lora_only", as in peft.
            use_gradient_checkpointing: True, "offload", False, or None to keep from_pretrained's choice.
            random_state: seed for the adapter initialisation.
            use_rslora: rank-stabilised scaling.
            modules_to_save: modules trained in full and saved with the adapter (e.g. ["lm_head"], or a projector:
                ["multi_modal_projector"], ["merger"]).
            **kwargs: passed on to ``FastLanguageModel.get_peft_model`` (and from there to peft's ``LoraConfig``).

        Returns:
            The peft model, in training mode.
        """
        if target_modules is None:
            components = (finetune_vision_layers, finetune_language_layers)
            targets = role_targets(model, *components, finetune_attention_modules, finetune_mlp_modules)
        elif isinstance(target_modules, str) and target_modules == "all-linear":
            targets = all_linear_targets(model)
        else:
            targets = target_modules
        checkpointing = (
            getattr(model, "_swiftune_gradient_checkpointing", "offload")
            if use_gradient_checkpointing is None
            else use_gradient_checkpointing
        )
        quantized = getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
        # The loader's offload reaches text models' decoder layers only; a vision-language model's is put on here,
        # once the loader has checked every option and added the adapters (they leave the layers in place).
        offload_here = checkpointing == "offload" and not quantized
        peft_model = FastLanguageModel.get_peft_model(
            model,
            r=r,
            target_modules=targets,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            bias=bias,
            use_gradient_checkpointing=False if offload_here else checkpointing,
            random_state=random_state,
            use_rslora=use_rslora,
            modules_to_save=modules_to_save,
            **kwargs,
        )
        if offload_here:
            _enable_checkpointing(peft_model.get_base_model(), "offload")
        return peft_model

    @staticmethod
    def for_inference(model, processor=None):
        """Put ``model`` in generation mode: eval, KV cache on, checkpointing off, the tokenizer padding on the left
        (batched prompts must end where generation starts). Returns the model.

        Args:
            model: a model from :meth:`from_pretrained` or :meth:`get_peft_model`.
            processor: the processor whose tokenizer pads on the left; by default the one from_pretrained returned.
        """
        model.eval()
        inner = unwrap(model)
        state = inner.__dict__.get(_STATE)
        if state is None:  # a second call keeps the training setup recorded by the first
            state = inner.__dict__[_STATE] = {"checkpointing": disable_checkpointing(inner)}
        tokenizer = processor.tokenizer if processor is not None else getattr(inner, "_swiftune_tokenizer", None)
        if tokenizer is not None and "padding_side" not in state:
            state["tokenizer"], state["padding_side"] = tokenizer, tokenizer.padding_side
            tokenizer.padding_side = "left"
        _set_use_cache(inner, True)
        return model

    @staticmethod
    def for_training(model, processor=None):
        """Put ``model`` back in training mode, restoring the checkpointing and padding side that
        :meth:`for_inference` changed, with the KV cache off. Returns the model."""
        model.train()
        inner = unwrap(model)
        state = inner.__dict__.pop(_STATE, None) or {}
        _enable_checkpointing(inner, state.get("checkpointing", False))
        if "tokenizer" in state:
            state["tokenizer"].padding_side = state["padding_side"]
        elif processor is not None:
            processor.tokenizer.padding_side = "right"
        _set_use_cache(inner, False)
        return model


def _enable_checkpointing(model, mode) -> None:
    """Checkpointing on a vision-language model: transformers' on every layer (True), or (``"offload"``) swiftune's
    offloaded checkpointing on the language model's layers and transformers' on the vision tower's blocks.

    The loader's ``enable_checkpointing`` finds the decoder layers of text models only (``model.model.layers``).
    """
    if mode != "offload":
        enable_checkpointing(model, mode)
        return
    layout = layout_of(model)
    layers = getattr(model.get_submodule(layout.language_model), "layers", None) if layout else None
    if not isinstance(layers, torch.nn.ModuleList):
        enable_checkpointing(model, True)
        return
    model._swiftune_offload = apply_offloaded_checkpointing(layers, policy="auto")
    vision = model.get_submodule(layout.vision_tower)
    if getattr(vision, "supports_gradient_checkpointing", False):
        enable_checkpointing(vision, True)


def _set_use_cache(model, value: bool) -> None:
    # Generation reads the text config's flag in some families and the top config's in others.
    model.config.use_cache = value
    if hasattr(model.config, "get_text_config"):
        model.config.get_text_config().use_cache = value
    if value and getattr(model, "generation_config", None) is not None:
        model.generation_config.use_cache = True


def _unquantized_modules(config) -> list[str]:
    """Module paths kept in 16-bit under 4-bit / 8-bit loading: the projectors and the lm_head."""
    layout = LAYOUTS.get(config.model_type)
    projectors = list(layout.projectors) if layout else ["multi_modal_projector", "merger"]
    return projectors + ["lm_head"]
