"""`ConceptDirection` (a direction at one hook point: a CAV, or a sum of them, usable as a steering intervention)
and `TCAVResult` (TCAV scores per concept with their spread over CAVs, against random CAVs, with p-values)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ..display import Renders, escape, html_table
from ..errors import InputError


class ConceptDirection(Renders):
    """`.vector` (`[features]`) at `.hook`: a CAV's unit normal pointing towards its concept, with the linear
    classifier's cross-validated `.accuracy`, or a combination of directions (`a + b`, `a - b`, `2.0 * a`: concept
    algebra; combinations keep no accuracy). `.steer(scale)` adds `scale × vector` at the hook."""

    def __init__(self, vector: torch.Tensor, hook: str | None, *, name: str = "concept", accuracy: float | None = None):
        self.vector, self.hook, self.name, self.accuracy = vector.detach().cpu(), hook, name, accuracy

    def steer(self, scale: float = 1.0, positions: int | slice | list[int] | None = None) -> dict[str, Callable]:
        """`{hook: add scale × vector}` for `model.run(..., interventions=...)`, `model.hooks` or `generate`: at every
        position, or only at `positions` of the (padded) inputs of `run` (`generate`'s cached steps see one new
        position at a time, so steer every position there). A hook whose activation has several feature
        dimensions (such as `attn.hook_z`) takes the vector in their flattened order."""
        if self.hook is None:
            raise InputError("this direction has no hook point (it came from bare activations): build it with hook=")
        added = float(scale) * self.vector
        where = slice(None) if positions is None else positions

        def add(activation: torch.Tensor, point: Any) -> torch.Tensor:
            shift = added.to(activation.device, activation.dtype).reshape(activation.shape[2:])
            out = activation.clone()
            out[:, where] += shift
            return out

        return {self.hook: add}

    def to_numpy(self) -> np.ndarray:
        return self.vector.numpy()

    def __add__(self, other: ConceptDirection) -> ConceptDirection:
        self._compatible(other, "+")
        return ConceptDirection(self.vector + other.vector, self.hook, name=f"({self.name} + {other.name})")

    def __sub__(self, other: ConceptDirection) -> ConceptDirection:
        self._compatible(other, "-")
        return ConceptDirection(self.vector - other.vector, self.hook, name=f"({self.name} - {other.name})")

    def __mul__(self, scale: float) -> ConceptDirection:
        if not isinstance(scale, (int, float)) or isinstance(scale, bool):
            return NotImplemented
        return ConceptDirection(self.vector * float(scale), self.hook, name=f"{scale:g} × {self.name}")

    __rmul__ = __mul__

    def __neg__(self) -> ConceptDirection:
        return ConceptDirection(-self.vector, self.hook, name=f"-{self.name}")

    def _compatible(self, other: Any, op: str) -> None:
        if not isinstance(other, ConceptDirection):
            raise InputError(f"concept algebra combines ConceptDirections, not a {type(other).__name__} ({op})")
        if other.hook != self.hook:
            raise InputError(f"{self.name!r} lives at {self.hook} and {other.name!r} at {other.hook}: combine "
                              "directions of one hook point")
        if other.vector.shape != self.vector.shape:
            raise InputError(f"{self.name!r} is {self.vector.numel()} wide and {other.name!r} "
                              f"{other.vector.numel()}: combine directions of one width")

    def __repr__(self) -> str:
        accuracy = "" if self.accuracy is None else f", CV accuracy {self.accuracy:.3f}"
        return (f"ConceptDirection({self.name!r} at {self.hook or 'no hook'}, {self.vector.numel()} wide, "
                f"norm {float(self.vector.norm()):.3g}{accuracy})")

    def _repr_html_(self) -> str:
        top = self.vector.abs().argsort(descending=True)[:8].tolist()
        rows = [[i, f"{float(self.vector[i]):+.4f}"] for i in top]
        return html_table(f"{repr(self)}: largest components", ["feature", "weight"], rows, numeric=(0, 1))


class TCAVResult(Renders):
    """TCAV scores (`.scores[name]`, one per CAV run) for each concept and `.random_scores` for random CAVs, with
    each concept's two-sided t-test p-value (`.p_values`), Bonferroni-corrected over the concepts
    (`.corrected_p_values`), and whether it is significant at `.alpha`. `.cavs[name]` and `.random_cavs` keep the
    directions."""

    def __init__(self, scores: dict[str, np.ndarray], random_scores: np.ndarray, p_values: dict[str, float], *,
                 cavs: dict[str, list[ConceptDirection]], random_cavs: list[ConceptDirection], alpha: float,
                 hook: str, target: str, targets: int):
        self.scores, self.random_scores, self.p_values = scores, random_scores, p_values
        self.cavs, self.random_cavs, self.alpha, self.hook, self.target = cavs, random_cavs, alpha, hook, target
        self.targets = targets
        self.corrected_p_values = {name: min(1.0, p * len(scores)) for name, p in p_values.items()}
        self.significant = {name: p < alpha for name, p in self.corrected_p_values.items()}

    @property
    def concepts(self) -> list[str]:
        return list(self.scores)

    def score(self, concept: str | None = None) -> float:
        """The mean TCAV score of `concept` (the only one when not named)."""
        return float(self.scores[concept or self.concepts[0]].mean())

    def to_numpy(self) -> np.ndarray:
        """`[concepts, runs]` TCAV scores."""
        return np.stack([self.scores[name] for name in self.concepts])

    def __repr__(self) -> str:
        parts = [f"{name!r} {s.mean():.2f} ± {s.std():.2f} (p {self.corrected_p_values[name]:.2g}, "
                 f"{'significant' if self.significant[name] else 'not significant'})" for name, s in self.scores.items()]
        return (f"TCAVResult({self.target} at {self.hook}, {self.targets} inputs: {'; '.join(parts)}; random "
                f"{self.random_scores.mean():.2f} ± {self.random_scores.std():.2f}, α {self.alpha:g})")

    def _repr_html_(self) -> str:
        rows = []
        for name, s in self.scores.items():
            accuracy = np.mean([c.accuracy for c in self.cavs[name]])
            rows.append([name, f"{s.mean():.3f}", f"{s.std():.3f}", f"{s.min():.2f}–{s.max():.2f}", f"{accuracy:.3f}",
                         f"{self.p_values[name]:.3g}", f"{self.corrected_p_values[name]:.3g}",
                         "yes" if self.significant[name] else "no"])
        r = self.random_scores
        accuracy = np.mean([c.accuracy for c in self.random_cavs])
        rows.append(["(random CAVs)", f"{r.mean():.3f}", f"{r.std():.3f}", f"{r.min():.2f}–{r.max():.2f}",
                     f"{accuracy:.3f}", "", "", ""])
        headers = ["concept", "TCAV score", "std over CAVs", "range", "CAV accuracy", "p (t-test)",
                   "p (Bonferroni)", f"significant at α={self.alpha:g}"]
        return html_table(repr(self), headers, rows, numeric=(1, 2, 3, 4, 5, 6))

    def figure(self) -> Any:
        """A plotly chart of each concept's scores (one point per CAV) beside the random CAVs' scores."""
        import plotly.graph_objects as go

        figure = go.Figure()
        for name, s in [*self.scores.items(), ("random", self.random_scores)]:
            figure.add_trace(go.Box(y=s, name=escape(name), boxpoints="all", jitter=0.3))
        figure.add_hline(y=0.5, line_dash="dot")
        figure.update_layout(title=escape(f"TCAV scores for {self.target} at {self.hook}"), yaxis_title="TCAV score",
                             yaxis_range=[-0.02, 1.02], template="plotly_white", showlegend=False)
        return figure

