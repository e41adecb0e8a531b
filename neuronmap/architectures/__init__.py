"""Architecture adapters: one small module per model family, mapping its real modules to hook names.

To add a family, write one module with a `@register("model_type")` function yielding its hook points
(see `gpt2.py`) and import it here.
"""

from torch import nn

from . import bert, generic, gpt2, gpt_neox, llama
from .base import ADAPTERS, Adapter


def adapter_for(model: nn.Module) -> tuple[str, Adapter]:
    """The adapter for `model`'s HF family, or the module-path adapter for anything else, with its name."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in ADAPTERS:
        return model_type, ADAPTERS[model_type]
    return "module paths", generic.hook_points


__all__ = ["ADAPTERS", "adapter_for", "bert", "gpt2", "gpt_neox", "llama"]
