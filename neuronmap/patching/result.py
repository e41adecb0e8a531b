"""Results of patching: values over labelled axes (layer × position, layer × head, ...) that render as a heatmap."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..display import Renders
from ..heatmap import heatmap_figure, heatmap_html
from .cells import BY, Plan
from .metrics import Metric


class GridResult(Renders):
    """Values over labelled axes: `.values` shaped by `.axes` with `.labels` along each; a diverging heatmap
    (one panel per leading label when there are three axes); `.top(k)`, `.to_numpy()`, `.figure()`."""

    values: torch.Tensor
    axes: list[str]
    labels: list[list[str]]

    @property
    def description(self) -> str:  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    def _effect(self) -> torch.Tensor:
        """How strong each cell is, for `top`."""
        return self.values.abs()

    def _note(self) -> str:
        return ""

    def to_numpy(self) -> np.ndarray:
        """`.values` as a numpy array."""
        return self.values.numpy()

    def top(self, k: int = 10) -> list[tuple[tuple[str, ...], float]]:
        """The `k` strongest cells, strongest first, each as (its labels along the axes, its value)."""
        flat = self.values.flatten()
        cells = []
        for i in self._effect().flatten().nan_to_num(-1).argsort(descending=True)[:k].tolist():
            index = np.unravel_index(i, self.values.shape)
            cells.append((tuple(labels[j] for labels, j in zip(self.labels, index)), float(flat[i])))
        return cells

    def figure(self) -> Any:
        """A plotly heatmap of `.values` (one panel per layer when there are three axes)."""
        return heatmap_figure(self._grid_values(), **self._grid(), title=self.description, diverging=True)

    def _repr_html_(self) -> str:
        return heatmap_html(self._grid_values(), **self._grid(), title=self.description, diverging=True, note=self._note())

    def _grid_values(self) -> torch.Tensor:
        return self.values[:, None] if len(self.axes) == 1 else self.values

    def _grid(self) -> dict[str, Any]:
        """Rows, columns (and panels) of the heatmap: the last two axes, panels for a third; a lone axis as rows."""
        if len(self.axes) == 1:
            return {"rows": self.labels[0], "columns": ["effect"], "row_title": self.axes[0], "column_title": ""}
        grid = {"rows": self.labels[-2], "columns": self.labels[-1], "row_title": self.axes[-2], "column_title": self.axes[-1]}
        if len(self.axes) == 3:
            grid["panels"] = [f"{self.axes[0]} {label}" for label in self.labels[0]]
        return grid


class PatchingResult(GridResult):
    """The metric of every cell of a patching sweep.

    `.values` is normalised (0 = the corrupted run, 1 = the clean run), shaped by `.axes` (e.g. layer × position);
    `.raw` is the metric averaged over prompts, `.per_prompt` the metric of each prompt (last dimension);
    `.clean` and `.corrupt` are the two runs' metric averaged over prompts. `.top(k)` lists the cells with the
    largest effect: denoising, how far a cell moves the corrupted run toward the clean one (|value|); noising, how
    far it moves the clean run away from itself (|1 - value|).
    """

    def __init__(
        self,
        plan: Plan,
        per_prompt: torch.Tensor,
        clean: torch.Tensor,
        corrupt: torch.Tensor,
        metric: Metric,
        direction: str,
        model_name: str,
        forwards: int,
        method: str = "",
    ):
        shape = [len(labels) for _, labels in plan.axes]
        self.method = method  # how the values were obtained, when not by patching each cell (e.g. "AtP estimate")
        self.what, self.by, self.metric, self.direction = plan.what, plan.by, metric, direction
        self.model_name, self.forwards = model_name, forwards
        self.axes = [name for name, _ in plan.axes]
        self.labels = [labels for _, labels in plan.axes]
        self.per_prompt = per_prompt.reshape(*shape, per_prompt.shape[-1])
        self.raw = self.per_prompt.mean(-1)
        self.clean, self.corrupt = float(clean.mean()), float(corrupt.mean())
        self.values = (self.raw - self.corrupt) / (self.clean - self.corrupt)

    def __repr__(self) -> str:
        shape = " × ".join(str(len(labels)) for labels in self.labels)
        return (
            f"PatchingResult({self.method + ' of ' if self.method else ''}{self.what} by {' × '.join(self.axes)} [{shape}], "
            f"{self.metric} ({self.direction}) on "
            f"{self.model_name!r}: clean {self.clean:.4g}, corrupted {self.corrupt:.4g}, {self.forwards} forwards)"
        )

    @property
    def description(self) -> str:
        """What was patched, by what, in which direction: the view's heading."""
        into = "clean into corrupted" if self.direction == "denoise" else "corrupted into clean"
        method = f"{self.method} · " if self.method else ""
        return f"{method}{self.what} by {BY.get(self.by, self.by)} · {self.metric} · {into} · {self.model_name}"

    def _effect(self) -> torch.Tensor:
        return (self.values if self.direction == "denoise" else 1 - self.values).abs()

    def _note(self) -> str:
        return (
            f"0 = the corrupted run ({self.metric} {self.corrupt:.4g}), 1 = the clean run ({self.clean:.4g}); "
            f"{self.forwards} stacked forwards"
        )
