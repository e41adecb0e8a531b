"""The `[samples, features]` matrix an analysis reads, from whatever holds the activations.

A `Trace` gives one row per real token (padding left out) of a captured hook point; a tensor `[..., features]` or a
numpy array gives its rows as they are; an activation store (or one of its hooks) gives every stored row, read
whole, so methods that stream take the store itself instead (they say so).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..errors import InputError
from ..trace import Trace


def as_matrix(source: Any, hook: str | None = None, *, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """`source` as a finite `[samples, features]` tensor of `dtype` (on the CPU).

    `source`: a `Trace` with `hook` (one row per real token; a hook whose features are several dimensions, such as
    `attn.hook_z`'s heads, is flattened), a tensor or array `[..., features]`, or an `ActivationStore` with `hook`
    (or its `store[hook]` view). NaN or infinite values are an error naming how many.
    """
    if isinstance(source, Trace):
        if hook is None:
            raise InputError(f"a trace holds several hook points ({', '.join(source.keys())}): pass hook=")
        values = source[hook]
        mask = source.attention_mask
        if mask is not None and values.dim() >= 2 and tuple(values.shape[:2]) == tuple(mask.shape):
            values = values[mask.bool().to(values.device)]
        else:
            values = values.flatten(0, min(1, values.dim() - 1)) if values.dim() > 1 else values[:, None]
        matrix = values.flatten(1)
    elif isinstance(source, (torch.Tensor, np.ndarray)):
        matrix = torch.as_tensor(source)
        if matrix.dim() == 0:
            raise InputError("activations must have a features dimension, got a scalar")
        matrix = matrix[:, None] if matrix.dim() == 1 else matrix.flatten(0, -2)
    elif hasattr(source, "hooks") and hasattr(source, "batches"):  # an ActivationStore
        if hook is None:
            hooks = list(source.hooks)
            if len(hooks) != 1:
                raise InputError(f"the store holds {len(hooks)} hooks ({', '.join(hooks)}): pass hook=")
            hook = hooks[0]
        matrix = source[hook][:].flatten(1)
    elif hasattr(source, "read") and hasattr(source, "__len__"):  # one hook of a store
        matrix = source[:].flatten(1)
    else:
        raise InputError(
            f"cannot read activations from a {type(source).__name__}: give a Trace with hook=, a tensor or array "
            "[samples, features], or an activation store"
        )
    matrix = matrix.detach().to(device="cpu", dtype=dtype)
    bad = int((~torch.isfinite(matrix)).sum())
    if bad:
        raise InputError(f"the activations hold {bad:,} NaN or infinite values; analyses need finite numbers")
    return matrix
