"""FastLanguageModel: the user's entry point for loading a causal LM, adding LoRA and switching modes.

The API follows what users of transformers and peft know. Loading resolves the name (local folder, name table,
local Hugging Face cache), checks every option before anything loads, quantizes with bitsandbytes when asked,
stretches RoPE when ``max_seq_length`` is beyond the model's positions, and puts swiftune's kernels into the model
where its architecture has a fast path (``swiftune_loader.architectures``); any other causal LM loads and trains
through plain transformers. The helpers live beside this file: loading_options, rope_scaling, lora_options,
checkpointing and inference_mode.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import torch

from swiftune_loader.checkpointing import enable_checkpointing, park_for_recompute, replay_from_cuda_graphs
from swiftune_loader.embedding_offload import check_offloadable, offload_input_embeddings
from swiftune_loader.inference_mode import enter_inference, enter_training
from swiftune_loader.loading_options import (
    apply_tokenizer_fix,
    check_gradient_checkpointing,
    check_loading_options,
    check_stored_quantization,
    quantization_config,
    require_bitsandbytes,
    stored_quantization,
    target_device,
    weight_dtype,
)
from swiftune_loader.lora_options import (
    DEFAULT_LORA_TARGETS,
    check_target_modules,
    default_targets,
    log_fused_lora_fallback,
)
from swiftune_loader.model_path import check_weight_safety, has_only_pickle_weights, resolve_model_path
from swiftune_loader.precision import resolve_device_map, resolve_dtype
from swiftune_loader.rope_scaling import extend_rope_to, set_user_rope_scaling

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_LORA_TARGETS", "FastLanguageModel"]


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
        fix_tokenizer: bool | Callable = False,
        use_gradient_checkpointing: bool | str = "offload",
        rope_scaling: dict | None = None,
        fast_path: bool | None = None,
        allow_pickle: bool = False,
        **kwargs,
    ):
        """Load a model and its tokenizer from a local folder, a cached hub name, or the bundled default model.

        Args:
            model_name: a local model folder; a hub id (``"org/name"``) found in the local Hugging Face cache after
                the 16-bit / 4-bit name table (:mod:`swiftune_loader.model_names`); or None / "default" for the
                bundled SmolLM2-135M-Instruct. Nothing is downloaded.
            max_seq_length: longest sequence to train on; stored on the model and the tokenizer. Beyond the
                model's ``max_position_embeddings`` it stretches RoPE (:mod:`swiftune_loader.rope_scaling`).
            dtype: compute dtype; None or "auto" picks bfloat16 on GPUs that support it, else float16, and float32
                on the CPU. With full_finetuning, float16 weights are kept in float32 (see loading_options).
            load_in_4bit: quantize linear weights to NF4 with double quantization (bitsandbytes; QLoRA).
            load_in_8bit: quantize linear weights to int8 with bitsandbytes.
            full_finetuning: train all weights (no adapters; quantization not allowed).
            device_map: passed to transformers; None puts the model on the first GPU, or the CPU.
            trust_remote_code: run code shipped in the model folder; off unless you trust the folder.
            fix_tokenizer: False, or a callable ``(model, tokenizer) -> tokenizer`` applied after loading.
                ``swiftune.FastLanguageModel`` (the meta-package) passes swiftune-tokenizers-fix here; this package
                does not import it, so True alone is refused.
            use_gradient_checkpointing: True (recompute each decoder layer in backward), "offload" (also park
                each layer's input in pinned CPU memory until backward), or False. Applied by
                :meth:`get_peft_model`, or here with full_finetuning.
            rope_scaling: a RoPE scaling dict for the config (``{"rope_type": "linear", "factor": 2.0}``); it
                replaces the automatic stretching for ``max_seq_length``.
            fast_path: put swiftune's kernels into the model (norms, RoPE, gated MLP, fused LoRA). None: on a GPU
                only, since on the CPU the kernels fall back to their pure-torch references. The handle that
                undoes it is ``model._swiftune_patch``.
            allow_pickle: load a folder whose weights are pickle files (.bin) only. Off by default: unpickling runs
                code stored in the file; safetensors are always preferred when present.
            **kwargs: passed on to ``AutoModelForCausalLM.from_pretrained``.

        Returns:
            (model, tokenizer)
        """
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        check_loading_options(
            max_seq_length, load_in_4bit, load_in_8bit, full_finetuning, use_gradient_checkpointing, fix_tokenizer
        )
        max_seq_length = int(max_seq_length)
        path = resolve_model_path(model_name, load_in_4bit=load_in_4bit)
        check_weight_safety(path, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
        use_safetensors = kwargs.pop("use_safetensors", None)
        if use_safetensors is None:
            use_safetensors = not (allow_pickle and has_only_pickle_weights(path))
        compute_dtype = resolve_dtype(dtype)
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        stored = stored_quantization(config)
        check_stored_quantization(stored, load_in_4bit, load_in_8bit, full_finetuning)
        device_map = resolve_device_map(device_map)
        if load_in_4bit or load_in_8bit or stored in ("4bit", "8bit"):
            require_bitsandbytes(target_device(device_map), "4-bit loading" if load_in_4bit else "8-bit loading")
        if rope_scaling is not None:
            set_user_rope_scaling(config, rope_scaling)
        else:
            extend_rope_to(config, max_seq_length)
        model = AutoModelForCausalLM.from_pretrained(
            path,
            config=config,
            dtype=weight_dtype(compute_dtype, full_finetuning),
            device_map=device_map,
            # A pre-quantized checkpoint carries its own quantization config.
            quantization_config=None if stored else quantization_config(load_in_4bit, load_in_8bit, compute_dtype),
            trust_remote_code=trust_remote_code,
            use_safetensors=use_safetensors,
            **kwargs,
        )
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        tokenizer.model_max_length = max_seq_length
        tokenizer = apply_tokenizer_fix(fix_tokenizer, model, tokenizer)
        model.max_seq_length = max_seq_length
        model._swiftune_tokenizer = tokenizer  # for_inference pads it on the left, for_training puts it back
        model._swiftune_gradient_checkpointing = use_gradient_checkpointing
        model._swiftune_full_finetuning = bool(full_finetuning)
        if full_finetuning:
            model.requires_grad_(True)
            enable_checkpointing(model, use_gradient_checkpointing)
        model._swiftune_patch = _apply_fast_path(model, fast_path)
        logger.info("Loaded %s (%s, %s) on %s.", path, config.model_type, model.dtype, model.device)
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
        offload_embeddings: bool = False,
        cuda_graphs: bool = False,
        park_intermediates: bool = False,
        **kwargs,
    ):
        """Wrap ``model`` with LoRA adapters (a peft ``PeftModel``); only the adapters are trained.

        Where the model has swiftune's fast path, adapters without dropout or DoRA run through the fused LoRA
        kernels; with dropout or DoRA they run through peft's layers (logged once).

        Args:
            model: a model from :meth:`from_pretrained`.
            r: LoRA rank (> 0).
            target_modules: names of the layers to adapt, or "all-linear"; None adapts the attention and MLP
                projections of every decoder layer. A name that matches no module is an error that lists the
                model's linear layers.
            lora_alpha: LoRA scaling numerator (scale = lora_alpha / r, or / sqrt(r) with use_rslora).
            lora_dropout: dropout on the adapter input.
            bias: "none", "all" or "lora_only", as in peft.
            use_gradient_checkpointing: True, "offload", False, or None to keep from_pretrained's choice
                ("offload" by default); see :meth:`from_pretrained`.
            random_state: seed for the adapter initialisation.
            use_rslora: rank-stabilised scaling.
            modules_to_save: extra modules trained in full and saved with the adapter (e.g. ["lm_head"]).
            init_lora_weights: peft's initialisation choice.
            layers_to_transform: only adapt these layer indices.
            offload_embeddings: keep the frozen input embedding in page-locked host memory; the GPU reads only
                each batch's rows from there (:mod:`swiftune_loader.embedding_offload`). Frees ~1 GB of GPU memory
                at a 128k vocabulary, with identical outputs. Needs an embedding that is not tied to the LM head
                and not trained (not in ``modules_to_save``).
            cuda_graphs: replay each checkpointed decoder layer from CUDA graphs once its input shapes repeat
                (:mod:`swiftune_kernels.layer_graphs`), so that a step does not wait on the host. Costs one layer's
                backward working set, held apart (~0.9 GiB at Llama-8B, batch 2 x 2048); layers with dropout or
                hooks stay eager. Needs swiftune's checkpointing ("offload", "auto" or a GiB budget).
            park_intermediates: layers whose input is offloaded also park the fused LoRA MLP's gate pre-activation
                in pinned host memory during the forward, and the recompute takes it back instead of computing it
                (one matmul and, under QLoRA, one dequantization less per layer; identical gradients). With
                ``cuda_graphs`` it goes through two fixed device slots (:mod:`swiftune_kernels.slot_parking`);
                without, up is parked too (:mod:`swiftune_kernels.recompute_parking`). Uses the host link and host
                memory (one gate a layer: 112 MiB at Llama-8B, batch 2 x 2048). The fastest 8B QLoRA setting
                measured (docs/BENCHMARKS.md): ``use_gradient_checkpointing=0.1, offload_embeddings=True,
                cuda_graphs=True, park_intermediates=True``. Needs swiftune's checkpointing.
            **kwargs: passed on to peft's ``LoraConfig`` (e.g. use_dora=True).

        Returns:
            The peft model, in training mode.
        """
        from peft import LoraConfig, get_peft_model

        if not isinstance(r, int) or r <= 0:
            raise ValueError(f"LoRA rank r must be a positive integer, got {r!r}.")
        if lora_alpha is None or lora_alpha <= 0:
            raise ValueError(f"lora_alpha must be positive, got {lora_alpha!r}.")
        if not 0.0 <= float(lora_dropout) < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout!r}.")
        if hasattr(model, "peft_config"):
            raise ValueError("This model already has LoRA adapters; call get_peft_model once per model.")
        if getattr(model, "_swiftune_full_finetuning", False):
            raise ValueError(
                "This model was loaded with full_finetuning=True (every weight trains); load it without "
                "full_finetuning to add LoRA adapters."
            )
        checkpointing = (
            getattr(model, "_swiftune_gradient_checkpointing", "offload")
            if use_gradient_checkpointing is None
            else use_gradient_checkpointing
        )
        check_gradient_checkpointing(checkpointing)
        for option, on in (("cuda_graphs", cuda_graphs), ("park_intermediates", park_intermediates)):
            if on and checkpointing in (True, False):
                raise ValueError(
                    f"{option} works on swiftune's checkpointed layers, and use_gradient_checkpointing="
                    f'{checkpointing!r} does not use them; pass "offload", "auto" or a GiB budget.'
                )
        if offload_embeddings:
            if kwargs.get("trainable_token_indices"):
                raise ValueError("trainable_token_indices trains embedding rows; leave offload_embeddings off.")
            check_offloadable(model, trained_modules=modules_to_save, freeze=True)
        check_target_modules(model, target_modules)
        log_fused_lora_fallback(model, float(lora_dropout), bool(kwargs.get("use_dora", False)))
        torch.manual_seed(random_state)
        if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
            # Only freeze the base. peft's prepare_model_for_kbit_training would also upcast the embeddings, lm_head
            # and norms to float32: +2.1 GB at vocab 128256, a float32 residual stream (twice the checkpointed and
            # offloaded bytes) and a float32 fused loss. Our kernels already compute norms and the loss in float32.
            for parameter in model.parameters():
                parameter.requires_grad_(False)
        if offload_embeddings:  # frozen, as peft freezes every base weight that is not in modules_to_save
            offload_input_embeddings(model, trained_modules=modules_to_save, freeze=True)
        enable_checkpointing(model, checkpointing)  # after the offload: an "auto" plan sees the memory it frees
        if cuda_graphs:
            replay_from_cuda_graphs(model)
        if park_intermediates:
            park_for_recompute(model)
        config = LoraConfig(
            r=r,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            bias=bias,
            target_modules=target_modules if target_modules is not None else default_targets(model),
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
    def for_inference(model, tokenizer=None):
        """Put ``model`` in generation mode: eval, KV cache on, checkpointing (transformers' or offloaded) off,
        the tokenizer padding on the left for batched prompts. Returns the model.

        Args:
            model: a model from :meth:`from_pretrained` or :meth:`get_peft_model`.
            tokenizer: the tokenizer to switch to left padding; by default the one from_pretrained returned.
        """
        return enter_inference(model, tokenizer)

    @staticmethod
    def for_training(model, tokenizer=None):
        """Put ``model`` back in training mode, restoring the checkpointing and padding side that
        :meth:`for_inference` changed, with the KV cache off. Returns the model."""
        return enter_training(model, tokenizer)


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
