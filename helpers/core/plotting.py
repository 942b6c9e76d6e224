"""One figure style for every notebook, and a few plotting helpers that more than one notebook needs."""

from __future__ import annotations

from typing import Any, Sequence

import matplotlib

# Headless runs (papermill, CI) have no display; inline backends in JupyterLab are left alone.
if matplotlib.get_backend().lower() in ("", "agg", "tkagg", "qtagg"):
    matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np

__all__ = ["PALETTE", "LINESTYLES", "use_style", "subplots", "band", "plain_log_ticks", "plain_number"]

# Colour-blind safe (Okabe-Ito's eight, then brown and grey for figures with more methods); methods keep the same
# colour across figures of a notebook, and no two methods of a figure share one.
PALETTE = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000", "#8C564B",
           "#7F7F7F"]

# For lines that may lie on top of each other (two estimators that agree): a distinct dash per method keeps the one
# underneath visible.
LINESTYLES = ["-", "--", ":", "-.", (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1))]

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


def plain_number(value: float, _pos: object = None) -> str:
    """A short tick label: plain digits from 0.001 to 99,999 (``1,000``, ``0.25``), else ``1e5`` / ``3e-5`` (no
    ``x10^`` and no ``e+05``: long labels collide on a log axis)."""
    if value == 0 or not np.isfinite(value):
        return f"{value:g}"
    if 1e-3 <= abs(value) < 1e5:
        return f"{int(value):,}" if float(value).is_integer() else f"{value:g}"
    mantissa, exponent = f"{value:.2e}".split("e")
    return f"{float(mantissa):g}e{int(exponent)}"


def plain_log_ticks(ax: Any, axis: str = "both") -> None:
    """Label the log-scaled ``axis`` (``"x"``, ``"y"`` or ``"both"``) of ``ax`` with plain numbers at the major ticks
    (``100``, ``1,000``) and no minor labels, instead of matplotlib's ``6x10^1``-style labels. Call after
    plotting (once the scale is set); a linear axis is left as it is."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    if axis not in ("x", "y", "both"):
        raise ValueError(f"axis must be 'x', 'y' or 'both', got {axis!r}")
    for name in ("x", "y") if axis == "both" else (axis,):
        target = ax.xaxis if name == "x" else ax.yaxis
        if target.get_scale() != "log":
            continue
        target.set_major_formatter(FuncFormatter(plain_number))
        target.set_minor_formatter(NullFormatter())
