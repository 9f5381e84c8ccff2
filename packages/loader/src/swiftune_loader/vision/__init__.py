"""Vision-language fine-tuning: FastVisionModel, LoRA targets chosen by role, and the processors to go with them."""

from swiftune_loader.vision.architectures import LAYOUTS, VISION_TEXT_SPECS, VisionLanguageLayout, layout_of
from swiftune_loader.vision.fast_path import patch_language_model
from swiftune_loader.vision.fast_vision_model import FastVisionModel
from swiftune_loader.vision.lora_targets import LinearRole, all_linear_targets, linear_roles, role_targets
from swiftune_loader.vision.processors import image_only_processor_class, load_processor

__all__ = [
    "LAYOUTS",
    "VISION_TEXT_SPECS",
    "FastVisionModel",
    "LinearRole",
    "VisionLanguageLayout",
    "all_linear_targets",
    "image_only_processor_class",
    "layout_of",
    "linear_roles",
    "load_processor",
    "patch_language_model",
    "role_targets",
]
