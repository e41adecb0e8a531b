"""The record of an SAE's training: one row per logged step (tokens seen, loss terms, L0, MSE, explained variance,
dead fraction, learning rate), that renders as a table, plots with `.figure()`, and reads and writes JSON."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from typing import Any

from ..display import Renders, html_table

COLUMNS = ("step", "tokens", "loss", "mse_loss", "sparsity_loss", "aux_loss", "l0", "mse", "explained_variance",
           "dead_fraction", "lr", "sparsity_coefficient")
DESCRIPTIONS = {
    "step": "optimiser steps taken",
    "tokens": "training tokens seen",
    "loss": "the loss as optimised (mse_loss + sparsity_loss + aux_loss)",
    "mse_loss": "squared error summed over features, mean over tokens (in the training units: inputs scaled by `input_scale`)",
    "sparsity_loss": "coefficient × L1 (standard) or L0 (JumpReLU)",
    "aux_loss": "auxiliary-k loss on dead latents",
    "l0": "latents active per token",
    "mse": "squared error per feature, in the activations' own units",
    "explained_variance": "1 − squared error / variance of the batch",
    "dead_fraction": "fraction of latents that fired on none of the last `dead_after_tokens` tokens",
    "lr": "learning rate",
    "sparsity_coefficient": "the L1 or L0 coefficient (warmed up)",
}
_SHOWN = 12  # rows of the static table: evenly spread, the last always among them


class TrainingLog(Renders):
    """An SAE's training curves: `log["l0"]` is a column (list), `log.rows` the rows (dicts), `log.last` the final
    row, `log.settings` how the SAE was trained. Renders as a table; `.figure()` plots every curve against tokens;
    `.save(path)` / `TrainingLog.load(path)` write and read JSON."""

    def __init__(self, rows: Sequence[dict[str, float]] = (), settings: dict[str, Any] | None = None):
        self.rows = [dict(row) for row in rows]
        self.settings = dict(settings or {})

    def append(self, row: dict[str, float]) -> None:
        self.rows.append(dict(row))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, column: str) -> list[float]:
        if column not in COLUMNS:
            raise KeyError(f"{column!r} is not a column of the training log; columns: {', '.join(COLUMNS)}")
        return [row[column] for row in self.rows]

    @property
    def last(self) -> dict[str, float]:
        return self.rows[-1] if self.rows else {}

    def to_dict(self) -> dict[str, Any]:
        return {"columns": list(COLUMNS), "rows": [[row[c] for c in COLUMNS] for row in self.rows], "settings": self.settings}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainingLog:
        columns = data["columns"]
        return cls([dict(zip(columns, values)) for values in data["rows"]], data.get("settings"))

    def save(self, path: str | os.PathLike) -> None:
        """Write the log as JSON (NaN as null), replacing `path` whole."""
        data = self.to_dict()
        data["rows"] = [[None if isinstance(v, float) and not math.isfinite(v) else v for v in row] for row in data["rows"]]
        tmp = f"{os.fspath(path)}.partial"
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(data, handle)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> TrainingLog:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
        data["rows"] = [[math.nan if v is None else v for v in row] for row in data["rows"]]
        return cls.from_dict(data)

    def figure(self) -> Any:
        """A plotly figure: the loss terms, L0, MSE, explained variance, dead fraction and learning rate against
        training tokens."""
        from plotly.subplots import make_subplots

        panels = [("loss (as optimised)", ("loss", "mse_loss", "sparsity_loss", "aux_loss")), ("L0", ("l0",)),
                  ("MSE per feature", ("mse",)), ("explained variance", ("explained_variance",)),
                  ("dead fraction", ("dead_fraction",)), ("learning rate", ("lr",))]
        figure = make_subplots(rows=2, cols=3, subplot_titles=[title for title, _ in panels])
        tokens = self["tokens"]
        for i, (_, columns) in enumerate(panels):
            for column in columns:
                if column in ("sparsity_loss", "aux_loss") and not any(self[column]):
                    continue
                figure.add_scatter(x=tokens, y=self[column], name=column, mode="lines", row=i // 3 + 1, col=i % 3 + 1,
                                   showlegend=len(columns) > 1)
        figure.update_xaxes(title_text="tokens")
        figure.update_layout(title=self._title(), height=520)
        return figure

    def __repr__(self) -> str:
        if not self.rows:
            return f"TrainingLog({self._what()}, empty)"
        last = self.last
        return (
            f"TrainingLog({self._what()}, {int(last['step']):,} steps / {int(last['tokens']):,} tokens: "
            f"L0 {last['l0']:.1f}, MSE {last['mse']:.4g}, explained variance {last['explained_variance']:.3f}, "
            f"dead {last['dead_fraction']:.1%})"
        )

    def _repr_html_(self) -> str:
        headers = ("step", "tokens", "loss", "L0", "MSE", "explained variance", "dead", "lr")
        rows = [
            (f"{int(r['step']):,}", f"{int(r['tokens']):,}", f"{r['loss']:.4g}", f"{r['l0']:.1f}", f"{r['mse']:.4g}",
             f"{r['explained_variance']:.3f}", f"{r['dead_fraction']:.1%}", f"{r['lr']:.2e}")
            for r in self._shown()
        ]
        note = f" ({len(rows)} of {len(self.rows)} logged steps shown; .figure() plots them all)" if len(rows) < len(self.rows) else ""
        return html_table(self._title() + note, headers, rows, numeric=range(len(headers)))

    def _shown(self) -> list[dict[str, float]]:
        n = len(self.rows)
        if n <= _SHOWN:
            return self.rows
        picks = sorted({round(i * (n - 1) / (_SHOWN - 1)) for i in range(_SHOWN)})
        return [self.rows[i] for i in picks]

    def _what(self) -> str:
        s = self.settings
        if not s:
            return "SAE"
        k = f", k={s['k']}" if s.get("k") is not None else ""
        hook = f" at {s['hook_name']!r}" if s.get("hook_name") else ""
        return f"{s.get('architecture', '?')} SAE {s.get('d_in', '?')} → {s.get('d_sae', '?')}{k}{hook}"

    def _title(self) -> str:
        model = self.settings.get("model_name")
        return f"Training of the {self._what()}" + (f" of {model}" if model else "")
