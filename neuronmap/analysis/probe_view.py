"""`ProbeResult` (one probe: cross-validated accuracy, its control task and selectivity) and `ProbeCurve` (a probe
per layer, drawn as accuracy, control accuracy and selectivity by layer with the spread over folds as bands)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..display import Renders, escape, html_table
from ..linechart import line_chart_figure, line_chart_svg


class ProbeResult(Renders):
    """A cross-validated linear probe. `.accuracy` is the mean held-out score over folds (accuracy for a logistic
    probe, R² for a ridge one; `.fold_accuracies` per fold), `.control_accuracy` the same probe's score on the
    control task (None without it), `.selectivity` their difference, `.majority_baseline` the score of always
    answering the commonest class (0 for R²). `.direction` holds the probe's weights refitted on every row, in the
    activations' units (`[features]`, or `[classes, features]` for more than two classes); `.predict(x)` applies
    that probe."""

    def __init__(self, fold_scores: np.ndarray, control_scores: np.ndarray | None, fitted: Any, *, kind: str,
                 classes: list[Any] | None, baseline: float, hook: str | None, rows: int, regularization: float):
        self.fold_accuracies = np.asarray(fold_scores, dtype=np.float64)
        self.control_fold_accuracies = None if control_scores is None else np.asarray(control_scores, np.float64)
        self.kind, self.classes, self.majority_baseline, self.hook = kind, classes, baseline, hook
        self.rows, self.regularization, self._fitted = rows, regularization, fitted

    @property
    def accuracy(self) -> float:
        return float(self.fold_accuracies.mean())

    @property
    def control_accuracy(self) -> float | None:
        return None if self.control_fold_accuracies is None else float(self.control_fold_accuracies.mean())

    @property
    def selectivity(self) -> float | None:
        control = self.control_accuracy
        return None if control is None else self.accuracy - control

    @property
    def measure(self) -> str:
        """What the scores are: "accuracy" or "R²"."""
        return "accuracy" if self.kind == "logistic" else "R²"

    @property
    def direction(self) -> torch.Tensor:
        scaler, linear = self._fitted[0], self._fitted[-1]
        weights = np.asarray(linear.coef_, dtype=np.float64) / scaler.scale_
        return torch.from_numpy(weights[0] if weights.ndim == 2 and len(weights) == 1 else weights)

    def predict(self, x: Any, hook: str | None = None) -> np.ndarray:
        """The refitted probe's class (or value) for each row of `x` (anything `as_matrix` reads, with `hook`)."""
        from .activations import as_matrix

        return self._fitted.predict(as_matrix(x, hook).numpy())

    def to_numpy(self) -> np.ndarray:
        """`.direction` as a numpy array."""
        return self.direction.numpy()

    def __repr__(self) -> str:
        where = f" at {self.hook}" if self.hook else ""
        control = "" if self.selectivity is None else (
            f", control {self.control_accuracy:.3f}, selectivity {self.selectivity:+.3f}")
        return (f"ProbeResult({self.kind}{where}, {self.rows:,} rows, {self.measure} {self.accuracy:.3f} ± "
                f"{self.fold_accuracies.std():.3f} over {len(self.fold_accuracies)} folds{control}, "
                f"baseline {self.majority_baseline:.3f})")

    def _repr_html_(self) -> str:
        folds = len(self.fold_accuracies)
        rows = [[self.measure, *_summary(self.fold_accuracies)]]
        if self.control_fold_accuracies is not None:
            rows.append([f"control task {self.measure}", *_summary(self.control_fold_accuracies)])
            rows.append(["selectivity", f"{self.selectivity:+.3f}", "", "", ""])
        baseline = "majority baseline" if self.kind == "logistic" else "baseline (predict the mean)"
        rows.append([baseline, f"{self.majority_baseline:.3f}", "", "", ""])
        return html_table(repr(self), ["", f"mean over {folds} folds", "std", "min", "max"], rows, numeric=(1, 2, 3, 4))

    def figure(self) -> Any:
        """A plotly bar chart of each fold's score, for the probe and its control task, with the baseline."""
        import plotly.graph_objects as go

        folds = [f"fold {i + 1}" for i in range(len(self.fold_accuracies))]
        figure = go.Figure(go.Bar(x=folds, y=self.fold_accuracies, name=self.measure))
        if self.control_fold_accuracies is not None:
            figure.add_trace(go.Bar(x=folds, y=self.control_fold_accuracies, name=f"control {self.measure}"))
        figure.add_hline(y=self.majority_baseline, line_dash="dash", annotation_text="baseline")
        figure.update_layout(title=escape(repr(self)), yaxis_title=self.measure, barmode="group",
                             template="plotly_white")
        return figure


class ProbeCurve(Renders):
    """A probe per hook point (`.hooks`, `.results`): `.accuracy`, `.control_accuracy` and `.selectivity` by layer,
    drawn with each curve's min-max spread over folds as a band. `.best_layer` is the hook whose probe scores
    highest, `.most_selective_layer` the one with the largest selectivity."""

    def __init__(self, hooks: list[str], results: list[ProbeResult]):
        self.hooks, self.results = list(hooks), list(results)

    def __getitem__(self, hook: str) -> ProbeResult:
        return self.results[self.hooks.index(hook)]

    def __len__(self) -> int:
        return len(self.results)

    @property
    def accuracy(self) -> np.ndarray:
        return np.array([r.accuracy for r in self.results])

    @property
    def control_accuracy(self) -> np.ndarray | None:
        if any(r.control_accuracy is None for r in self.results):
            return None
        return np.array([r.control_accuracy for r in self.results])

    @property
    def selectivity(self) -> np.ndarray | None:
        control = self.control_accuracy
        return None if control is None else self.accuracy - control

    @property
    def best_layer(self) -> str:
        return self.hooks[int(np.argmax(self.accuracy))]

    @property
    def most_selective_layer(self) -> str | None:
        selectivity = self.selectivity
        return None if selectivity is None else self.hooks[int(np.argmax(selectivity))]

    def to_numpy(self) -> np.ndarray:
        """`[hooks, 3]`: accuracy, control accuracy and selectivity per hook (NaN without a control task)."""
        nan = np.full(len(self), np.nan)
        control = self.control_accuracy
        return np.stack([self.accuracy, nan if control is None else control,
                         nan if control is None else self.accuracy - control], 1)

    def __repr__(self) -> str:
        first = self.results[0]
        return (f"ProbeCurve({first.kind}, {len(self)} hooks, best {self.best_layer} with {first.measure} "
                f"{self.accuracy.max():.3f}, baseline {first.majority_baseline:.3f})")

    def _chart(self) -> dict[str, Any]:
        measure = self.results[0].measure
        series = {measure: self.accuracy}
        bands = {measure: _spread([r.fold_accuracies for r in self.results])}
        if self.control_accuracy is not None:
            series[f"control {measure}"] = self.control_accuracy
            series["selectivity"] = self.selectivity
            controls = [r.control_fold_accuracies for r in self.results]
            bands[f"control {measure}"] = _spread(controls)
            bands["selectivity"] = _spread([r.fold_accuracies - c for r, c in zip(self.results, controls)])
        return {"x": self.hooks, "series": series, "bands": bands, "x_label": "hook point", "y_label": measure,
                "marks": {"baseline": self.results[0].majority_baseline}, "title": f"probe {measure} by layer"}

    def figure(self) -> Any:
        """A plotly line chart of the curves by layer, fold spreads as bands."""
        return line_chart_figure(**self._chart())

    def _repr_html_(self) -> str:
        measure = self.results[0].measure
        rows = [[hook, f"{r.accuracy:.3f}", f"{r.fold_accuracies.std():.3f}",
                 "" if r.control_accuracy is None else f"{r.control_accuracy:.3f}",
                 "" if r.selectivity is None else f"{r.selectivity:+.3f}"] for hook, r in zip(self.hooks, self.results)]
        table = html_table("by hook point", ["hook", measure, "std over folds", f"control {measure}", "selectivity"],
                           rows, numeric=(1, 2, 3, 4))
        title = f'<div style="font-weight:600">{escape(repr(self))}</div>'
        return f"<div>{title}{line_chart_svg(**self._chart())}{table}</div>"


def _summary(scores: np.ndarray) -> list[str]:
    return [f"{scores.mean():.3f}", f"{scores.std():.3f}", f"{scores.min():.3f}", f"{scores.max():.3f}"]


def _spread(per_hook: list[np.ndarray]) -> tuple[list[float], list[float]]:
    return [float(s.min()) for s in per_hook], [float(s.max()) for s in per_hook]
