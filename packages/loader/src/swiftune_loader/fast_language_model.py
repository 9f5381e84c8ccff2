"""FastLanguageModel: the user's entry point for loading a causal LM, adding LoRA and switching modes.

The API follows what users of transformers and peft know. This first version loads through plain transformers
and peft; the architecture fast paths (swiftune kernels) are put behind the same calls by later work.
"""

from __future__ import annotations

import logging
import os

import torch

from swiftune_kernels import apply_offloaded_checkpointing
from swiftune_loader.model_path import resolve_model_path
from swiftune_loader.precision import resolve_device_map, resolve_dtype

logger = logging.getLogger(__name__)

# Linear layers of a decoder block, by the names transformers uses for Llama-family models.
DEFAULT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class FastLanguageModel:
    """Load causal language models for fine-tuning, add LoRA adapters, and switch between training and inference."""

    @staticmethod
    def from_pretrained(
        model_name: str | os.PathLike | None = None,
        max_seq_length: int = 2048,
        dtype: torch.dtype | str | None = None,
        load_in_4bit: bool = False,
        load_in_8bit: bool = False,
        full_finetuning: bool = False,
        device_map=None,
        trust_remote_code: bool = False,
        use_gradient_checkpointing: bool | str = True,
        rope_scaling: dict | None = None,
        fast_path: bool | None = None,
        **kwargs,
    ):
        """Load a model and its tokenizer from a local folder (or the bundled default when ``model_name`` is None).

        Args:
            model_name: a local model folder, or None / "default" for the bundled SmolLM2-135M-Instruct.
            max_seq_length: longest sequence to train on; stored on the model and the tokenizer.
            dtype: weight and compute dtype; None picks bfloat16 on GPUs that support it, float32 on the CPU.
            load_in_4bit: quantize linear weights to NF4 with bitsandbytes (QLoRA).
            load_in_8bit: quantize linear weights to int8 with bitsandbytes.
            full_finetuning: train all weights instead of adapters (no quantization allowed).
            device_map: passed to transformers; None puts the model on the first GPU, or the CPU.
            trust_remote_code: run code shipped in the model folder; off unless you trust the folder.
            use_gradient_checkpointing: recompute activations in backward to save memory.
            rope_scaling: a RoPE scaling dict to set on the config (e.g. to extend the context).
            fast_path: put swiftune's kernels into the model (norms, RoPE, gated MLP). None: on a GPU only, since
                on the CPU the kernels fall back to their pure-torch references. The handle that undoes it is
                ``model._swiftune_patch``.
            **kwargs: passed on to ``AutoModelForCausalLM.from_pretrained``.

        Returns:
            (model, tokenizer)
        """
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

        if max_seq_length is None or int(max_seq_length) <= 0:
            raise ValueError(f"max_seq_length must be a positive number of tokens, got {max_seq_length}.")
        if load_in_4bit and load_in_8bit:
            raise ValueError("Choose one of load_in_4bit and load_in_8bit, not both.")
        if full_finetuning and (load_in_4bit or load_in_8bit):
            raise ValueError("full_finetuning trains every weight and cannot use quantized weights; drop load_in_4bit.")
        path = resolve_model_path(model_name)
        torch_dtype = resolve_dtype(dtype)
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        if rope_scaling is not None:
            config.rope_scaling = rope_scaling
        quantization_config = None
        if load_in_4bit:
            quantization_config = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch_dtype,
            )
        elif load_in_8bit:
            quantization_config = BitsAndBytesConfig(load_in_8bit=True)
        model = AutoModelForCausalLM.from_pretrained(
            path,
            config=config,
            dtype=torch_dtype,
            device_map=resolve_device_map(device_map),
            quantization_config=quantization_config,
            trust_remote_code=trust_remote_code,
            use_safetensors=kwargs.pop("use_safetensors", True),
            **kwargs,
        )
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        tokenizer.model_max_length = int(max_seq_length)
        model.max_seq_length = int(max_seq_length)
        model._swiftune_gradient_checkpointing = use_gradient_checkpointing
        if full_finetuning:
            model.requires_grad_(True)
        model._swiftune_patch = _apply_fast_path(model, fast_path)
        logger.info("Loaded %s (%s, %s) on %s.", path, config.model_type, torch_dtype, model.device)
        return model, tokenizer

    @staticmethod
    def get_peft_model(
        model,
        r: int = 16,
        target_modules: list[str] | str | None = None,
        lora_alpha: int = 16,
        lora_dropout: float = 0.0,
        bias: str = "none",
        use_gradient_checkpointing: bool | str | None = None,
        random_state: int = 3407,
        use_rslora: bool = False,
        modules_to_save: list[str] | None = None,
        init_lora_weights: bool | str = True,
        layers_to_transform: list[int] | None = None,
        **kwargs,
    ):
        """Wrap ``model`` with LoRA adapters (a peft ``PeftModel``); only the adapters are trained.

        Args:
            model: a model from :meth:`from_pretrained`.
            r: LoRA rank (> 0).
            target_modules: names of the linear layers to adapt, or "all-linear"; None adapts the attention and MLP
                projections of every decoder layer.
            lora_alpha: LoRA scaling numerator (scale = lora_alpha / r, or / sqrt(r) with use_rslora).
            lora_dropout: dropout on the adapter input.
            bias: "none", "all" or "lora_only", as in peft.
            use_gradient_checkpointing: True (recompute each decoder layer in backward), "offload" (also move each
                layer's input to pinned CPU memory until backward), False, or None to keep from_pretrained's choice.
            random_state: seed for the adapter initialisation.
            use_rslora: rank-stabilised scaling.
            modules_to_save: extra modules trained in full and saved with the adapter (e.g. ["lm_head"]).
            init_lora_weights: peft's initialisation choice.
            layers_to_transform: only adapt these layer indices.
            **kwargs: passed on to peft's ``LoraConfig``.

        Returns:
            The peft model, in training mode.
        """
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        if not isinstance(r, int) or r <= 0:
            raise ValueError(f"LoRA rank r must be a positive integer, got {r!r}.")
        if lora_alpha is None or lora_alpha <= 0:
            raise ValueError(f"lora_alpha must be positive, got {lora_alpha!r}.")
        if not 0.0 <= float(lora_dropout) < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout!r}.")
        if hasattr(model, "peft_config"):
            raise ValueError("This model already has LoRA adapters; call get_peft_model once per model.")
        checkpointing = (
            getattr(model, "_swiftune_gradient_checkpointing", True)
            if use_gradient_checkpointing is None
            else use_gradient_checkpointing
        )
        torch.manual_seed(random_state)
        quantized = getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
        if quantized:
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=bool(checkpointing))
        elif checkpointing == "offload" and _decoder_layers(model) is not None:
            # Each decoder layer's input goes to pinned CPU memory during forward and comes back ahead of backward,
            # where the input is large enough for that to pay (swiftune_kernels.checkpoint_policy); the layer is
            # recomputed either way. Under no_grad (generation) the layers run as they are.
            model._swiftune_offload = apply_offloaded_checkpointing(_decoder_layers(model), policy="auto")
        elif checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        config = LoraConfig(
            r=r,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            bias=bias,
            target_modules=target_modules if target_modules is not None else _present_targets(model),
            use_rslora=use_rslora,
            modules_to_save=modules_to_save,
            init_lora_weights=init_lora_weights,
            layers_to_transform=layers_to_transform,
            task_type="CAUSAL_LM",
            **kwargs,
        )
        peft_model = get_peft_model(model, config)
        peft_model.max_seq_length = getattr(model, "max_seq_length", None)
        peft_model.train()
        return peft_model

    @staticmethod
    def for_inference(model):
        """Put ``model`` in generation mode: eval, KV cache on, checkpointing off. Returns the model."""
        model.eval()
        inner = _unwrap(model)
        if getattr(inner, "is_gradient_checkpointing", False):
            inner.gradient_checkpointing_disable()
            inner._swiftune_checkpointing_paused = True
        inner.config.use_cache = True
        return model

    @staticmethod
    def for_training(model):
        """Put ``model`` back in training mode, restoring checkpointing paused by :meth:`for_inference`."""
        model.train()
        inner = _unwrap(model)
        if getattr(inner, "_swiftune_checkpointing_paused", False):
            inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            inner._swiftune_checkpointing_paused = False
        inner.config.use_cache = False
        return model


def _apply_fast_path(model, fast_path: bool | None):
    """Patch ``model`` with swiftune's kernels when asked (or on a GPU by default); warn when no fast path exists."""
    from swiftune_loader.architectures import spec_for
    from swiftune_loader.patching import patch_model

    if fast_path is None:
        fast_path = next(model.parameters()).is_cuda
    if not fast_path:
        return None
    spec = spec_for(model.config.model_type)
    if spec is None:
        logger.warning(
            "No swiftune fast path for model_type=%r: it loads and trains through plain transformers.",
            model.config.model_type,
        )
        return None
    return patch_model(model, spec)


def _decoder_layers(model):
    """The decoder layers of a transformers causal LM (``model.model.layers``), or None when it has none."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    return layers if isinstance(layers, torch.nn.ModuleList) and len(layers) else None


def _unwrap(model):
    """The transformers model inside a peft wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _present_targets(model) -> list[str]:
    """The default LoRA targets that this model has; a clear error when it has none of them."""
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    present = [t for t in DEFAULT_LORA_TARGETS if t in names]
    if not present:
        raise ValueError(
            "None of the default LoRA targets "
            f"{DEFAULT_LORA_TARGETS} exist in this model; pass target_modules=[...] or target_modules='all-linear'."
        )
    return present
