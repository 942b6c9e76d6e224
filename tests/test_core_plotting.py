"""Plotting helpers: plain tick labels on log axes, the shared line styles."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from helpers.core import plotting  # noqa: E402


@pytest.mark.parametrize("value, label", [(1000.0, "1,000"), (60.0, "60"), (0.25, "0.25"), (0.001, "0.001"),
                                          (3e-5, "3e-5"), (1e5, "1e5"), (3e5, "3e5"), (1e6, "1e6"), (2.5e-7, "2.5e-7"),
                                          (0.0, "0"), (-10.0, "-10"), (99_999.0, "99,999")])
def test_plain_number(value, label):
    assert plotting.plain_number(value) == label


def test_plain_log_ticks_replace_scientific_labels():
    fig, ax = plotting.subplots()
    ax.loglog([60, 200, 6000], [1e-4, 1e-3, 2e-2])
    ax.plot([], [])
    plotting.plain_log_ticks(ax)
    fig.canvas.draw()
    xlabels = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
    ylabels = [t.get_text() for t in ax.get_yticklabels() if t.get_text()]
    assert "100" in xlabels and "1,000" in xlabels, xlabels
    assert "0.001" in ylabels, ylabels
    assert not any("10^" in t or "times" in t for t in xlabels + ylabels)
    assert all(t.get_text() == "" for t in ax.xaxis.get_minorticklabels())  # no "6x10^1" minor labels
    plt.close(fig)


def test_plain_log_ticks_leaves_linear_axes_and_checks_axis():
    fig, ax = plotting.subplots()
    ax.plot([1, 2], [3, 4])
    before = type(ax.xaxis.get_major_formatter())
    plotting.plain_log_ticks(ax, "x")
    assert type(ax.xaxis.get_major_formatter()) is before
    with pytest.raises(ValueError, match="axis must be 'x', 'y' or 'both', got 'z'"):
        plotting.plain_log_ticks(ax, "z")
    plt.close(fig)
