"""One figure style for every notebook, and a few plotting helpers that more than one notebook needs."""

from __future__ import annotations

from typing import Any, Sequence

import matplotlib

# Headless runs (papermill, CI) have no display; inline backends in JupyterLab are left alone.
if matplotlib.get_backend().lower() in ("", "agg", "tkagg", "qtagg"):
    matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np

__all__ = ["PALETTE", "use_style", "subplots", "band"]

# Colour-blind safe (Okabe-Ito's eight, then brown and grey for figures with more methods); methods keep the same
# colour across figures of a notebook, and no two methods of a figure share one.
PALETTE = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000", "#8C564B",
           "#7F7F7F"]

_STYLE = {
    "figure.figsize": (7.0, 4.0),
    "figure.dpi": 100,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.titlesize": 11,
    "axes.labelsize": 10,
    "legend.fontsize": 9,
    "legend.frameon": False,
    "axes.prop_cycle": matplotlib.cycler(color=PALETTE),
}


def use_style() -> None:
    """Apply the shared style (call once in a notebook's first cell)."""
    plt.rcParams.update(_STYLE)


def subplots(nrows: int = 1, ncols: int = 1, *, width: float = 4.5, height: float = 3.4, **kw: Any):
    """``plt.subplots`` sized per panel (``width`` x ``height`` inches each), with constrained layout."""
    use_style()
    return plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), layout="constrained", **kw)


def band(ax: Any, x: Sequence[float], runs: np.ndarray, *, label: str, color: str | None = None,
         q: tuple[float, float] = (25, 75)) -> None:
    """Plot the median of ``runs`` ([n_runs, len(x)]) with a shaded inter-quantile band (default IQR)."""
    runs = np.asarray(runs, dtype=float)
    med = np.nanmedian(runs, axis=0)
    lo, hi = np.nanpercentile(runs, q, axis=0)
    (line,) = ax.plot(x, med, label=label, color=color)
    ax.fill_between(x, lo, hi, alpha=0.2, color=line.get_color(), linewidth=0)
