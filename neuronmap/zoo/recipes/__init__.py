"""Training recipes of the zoo's models: one module per entry, each with `train(out_dir, quick=False, seed=0)`
(trains, saves the HF model and tokenizer with `save_pretrained`, measures, writes `card.json`) and
`measure(model)` (the card's figures, recomputed from a loaded `neuronmap.Model`)."""

from __future__ import annotations


import functools
from collections.abc import Callable
from pathlib import Path

import torch


def deterministic(train: Callable[..., dict]) -> Callable[..., dict]:
    """Run a recipe's `train(out_dir, *, quick, seed)` on one CPU thread with torch seeded from `seed`.

    One thread makes CPU training bit-reproducible; the caller's thread count is restored afterwards.
    """

    @functools.wraps(train)
    def run(out_dir: Path, *, quick: bool = False, seed: int = 0) -> dict:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        torch.manual_seed(seed)
        try:
            return train(out_dir, quick=quick, seed=seed)
        finally:
            torch.set_num_threads(threads)

    return run
