"""plots: each helper returns a Figure with the expected series and never shows it."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from rmu_analysis import alignment, measure_confidence, noise_sensitivity, random_direction  # noqa: E402
from rmu_analysis import plots  # noqa: E402


@pytest.fixture(autouse=True)
def no_show(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("plots must not call plt.show()")

    monkeypatch.setattr(plt, "show", fail)
    yield
    plt.close("all")


PROMPTS = ["The city of Varon lies on the river Elm.", "Answer: B", "Question: which host does the pathogen infect?"]


def legend_texts(ax):
    return [t.get_text() for t in ax.get_legend().get_texts()]


def test_confidence_histogram(tiny_llama):
    base = measure_confidence(tiny_llama, PROMPTS, generate=2)
    fig = plots.plot_confidence(base, {"c=6.5": base.max_logit - 1, "c=20": base.max_logit - 2})
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    assert legend_texts(ax) == ["base", "c=6.5", "c=20"]
    assert "MaxLogit" in ax.get_xlabel()
    fig2 = plots.plot_confidence(base, base, metric="entropy", labels=("base", "rmu"))
    assert legend_texts(fig2.axes[0]) == ["base", "rmu"]
    with pytest.raises(ValueError, match="metric"):
        plots.plot_confidence(base, base, metric="logit")


def test_cosines_and_norms(tiny_llama):
    u = random_direction(32, seed=0)
    res = alignment(tiny_llama, PROMPTS, u)
    fig = plots.plot_cosines(res, 2, level="token")
    assert isinstance(fig, Figure)
    assert legend_texts(fig.axes[0]) == ["u", "uniform null u′", "Gaussian null g"]
    fig = plots.plot_norms({"base": res, "copy": res}, coeff=0.5)
    ax = fig.axes[0]
    xs = [line.get_xdata() for line in ax.get_lines() if len(line.get_xdata()) == 4]
    assert len(xs) >= 2 and list(xs[0]) == [0, 1, 2, 3]
    assert any(np.allclose(line.get_ydata(), 0.5) for line in ax.get_lines())  # the c line


def test_noise_sensitivity_curve(tiny_llama):
    res = noise_sensitivity(tiny_llama, PROMPTS, 0, 0.01, samples=3)
    fig, ax = plt.subplots()
    out = plots.plot_noise_sensitivity(res, ax=ax)
    assert out is fig and ax.get_yscale() == "log"
    line = ax.get_lines()[0]
    assert list(line.get_xdata()) == [1, 2, 3]
    np.testing.assert_allclose(line.get_ydata(), res.phi_mean)


def test_intervals_as_error_bars():
    from rmu_analysis.stats import accuracy_interval, paired_difference

    base = accuracy_interval([1] * 70 + [0] * 30)
    rmu = accuracy_interval([1] * 30 + [0] * 70)
    fig = plots.plot_intervals({"base": base, "RMU": rmu})
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["base", "RMU"]
    points = ax.get_lines()[0]
    np.testing.assert_allclose(points.get_xdata(), [0.7, 0.3])
    segments = ax.collections[0].get_segments()  # one horizontal bar per row: low .. high
    np.testing.assert_allclose(sorted((s[0][0], s[1][0]) for s in segments),
                               sorted([(rmu.low, rmu.high), (base.low, base.high)]))
    assert any(np.allclose(line.get_xdata(), 0.25) for line in ax.get_lines())  # chance
    diff = paired_difference([1] * 70 + [0] * 30, [1] * 30 + [0] * 70)
    fig2 = plots.plot_intervals({"base - RMU": diff})
    assert any(np.allclose(line.get_xdata(), 0.0) for line in fig2.axes[0].get_lines())
    assert "difference" in fig2.axes[0].get_xlabel()
