"""The paper's outcome-level claims measured so that they can fail (arXiv 2408.06223; docs/claims.md):

- :func:`norm_trajectories` — Fig. 4 / C3: the BOS- and padding-free forget norm ‖h^(l)‖ of trained models at
  several layers (one fixed c), over seeds, with 95% intervals, beside c; :func:`forget_loss_measures` — the forget
  loss relative to ‖c·u‖² (not dominated by where it started) and relative to step 0, per run and over seeds.
- :func:`matched_forget` / :func:`compare_matched` — forget accuracy interpolated at a target general accuracy on each
  method's trade-off curve (RMU over c, Adaptive RMU over β), with bootstrap intervals over seeds (and questions),
  and a paired comparison of two methods at matched utility (Table 1, Fig. 5).
- :func:`confidence_control` / :func:`misdirection_verdict` — C1 with a control: MaxLogit, max probability and
  entropy on lettered forget prompts for several unlearned models (RMU, Adaptive RMU, GA, NPO ...), each beside its
  forget accuracy, and a paired test of whether misdirection lowers confidence more than output-space unlearning.
- :func:`paired_mean_difference` — a paired bootstrap (and Wilcoxon) test of a per-item continuous measure.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import stats as sps
from torch import nn

from .activations import token_norms
from .confidence import METRICS, Confidence, measure_confidence
from .evaluation import MCQResult, evaluate_mcq, mcq_prompt, question_records, subject_list
from .models import check_layer, resolve_tokenizer
from .stats import N_BOOT, Interval, finite_mean_interval, paired_difference
from .theory import log_frame, log_hidden_size
from .unlearning import UnlearnResult

__all__ = [
    "NormTrajectories", "norm_trajectories", "forget_loss_measures", "loss_summary", "MatchedForget",
    "matched_forget", "compare_matched", "MatchedComparison", "PairedMean", "paired_mean_difference",
    "ConfidenceControl", "confidence_control", "misdirection_verdict",
]


@contextlib.contextmanager
def _as_model(run: Any, base: nn.Module | None) -> Iterator[nn.Module]:
    """A model to measure: the module itself, or an :class:`UnlearnResult` installed in ``base`` for the block."""
    if isinstance(run, UnlearnResult):
        if base is None and run.model is None:
            raise ValueError("an UnlearnResult needs the base model to install its tensors in: pass base=")
        with run.installed(base if base is not None else run.model) as model:
            yield model
    elif isinstance(run, nn.Module):
        yield run
    else:
        raise TypeError(f"expected a model (nn.Module) or an UnlearnResult, got {type(run).__name__}")


# ------------------------------------------------------------------------------------ Fig. 4 / C3: norms
@dataclass(frozen=True, eq=False)
class NormTrajectories:
    """``frame``: one row per (layer, seed, step) with ``norm``, the mean BOS- and padding-free token norm
    ‖h^(l)‖ of the forget texts (step −1: the frozen base model). ``coeff``: the fixed c."""

    frame: pd.DataFrame
    coeff: float

    def summary(self, level: float = 0.95) -> pd.DataFrame:
        """Per (layer, step): mean norm over seeds with a t interval, the number of seeds, ``norm_over_c`` and
        ``starts_below`` (the frozen norm < c, Fig. 4's condition for convergence)."""
        rows = []
        frozen = self.frame[self.frame["step"] == -1].groupby("layer")["norm"].first()
        for (layer, step), part in self.frame.groupby(["layer", "step"]):
            ci = finite_mean_interval(part["norm"], level)
            rows.append({"layer": int(layer), "step": int(step), "norm": ci.estimate, "low": ci.low, "high": ci.high,
                         "n_seeds": len(part), "norm_over_c": ci.estimate / self.coeff,
                         "starts_below": bool(frozen[layer] < self.coeff)})
        return pd.DataFrame(rows)


def norm_trajectories(
    base: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    runs: Mapping[int, Sequence[Any]],
    coeff: float,
    *,
    batch_size: int = 32,
    max_length: int | None = None,
) -> NormTrajectories:
    """Fig. 4 (C3) with one fixed c: the forget norm at block l (mean over the counted tokens of ``texts``: padding
    and BOS left out, :func:`~rmu_analysis.activations.token_norms`) of the base model and of every trained model.

    ``runs``: layer l -> one entry per seed, each a trained model, an :class:`UnlearnResult` (installed in ``base``
    for the measurement) or a mapping step -> model / result (checkpoints: a trajectory). A single model counts as
    its final step (``steps`` of the result, else 0)."""
    c = float(coeff)
    if not np.isfinite(c) or c <= 0:
        raise ValueError(f"coeff must be a positive finite c, got {coeff!r}")
    if not runs:
        raise ValueError("runs is empty: pass {layer: [model or UnlearnResult per seed, ...]}")
    tok = resolve_tokenizer(base, tokenizer)
    texts = list(texts)

    def norm(model: nn.Module, layer: int) -> float:
        return float(token_norms(model, texts, [layer], tokenizer=tok, exclude_bos=True, batch_size=batch_size,
                                 max_length=max_length)[layer].mean())

    rows = []
    for layer, seeds in runs.items():
        l = check_layer(base, int(layer))
        rows.append({"layer": l, "seed": -1, "step": -1, "norm": norm(base, l)})
        for s, run in enumerate(seeds):
            points = run if isinstance(run, Mapping) else {int(getattr(run, "steps", 0)): run}
            for step, item in points.items():
                with _as_model(item, base) as model:
                    rows.append({"layer": l, "seed": s, "step": int(step), "norm": norm(model, l)})
    return NormTrajectories(frame=pd.DataFrame(rows), coeff=c)


def forget_loss_measures(log: Any, hidden_size: int | None = None, *, tail: int = 3) -> pd.DataFrame:
    """Per logged step and topic of one RMU / Adaptive RMU run (an ``UnlearnResult``, its ``.log`` or a frame):
    ``loss_over_target`` = forget loss · d / c² = ‖h − c·u‖² / ‖c·u‖² (the loss is a mean over the d hidden
    dimensions): 1 = as far from c·u as the origin is, 0 = at c·u — comparable across layers and c, unlike
    ``loss_over_start`` = loss / loss at the first logged step, which is small whenever ‖h‖ started far above c
    (shrinking h alone removes most of an initial loss ≈ ‖h‖²/d). ``final`` marks the last ``tail`` logged
    steps of each topic."""
    hidden_size = log_hidden_size(log, hidden_size)
    if hidden_size is None:
        raise ValueError("the hidden size d is needed: pass hidden_size=d or an UnlearnResult")
    frame = log_frame(log, {"step", "topic", "forget_loss", "coefficient"}, tail)
    parts = []
    for topic, part in frame.sort_values("step").groupby("topic", sort=False):
        part = part[["step", "topic", "forget_loss", "coefficient"]].copy()
        part["loss_over_target"] = part["forget_loss"] * hidden_size / part["coefficient"] ** 2
        part["loss_over_start"] = part["forget_loss"] / part["forget_loss"].iloc[0]
        part["final"] = False
        part.iloc[-tail:, part.columns.get_loc("final")] = True
        parts.append(part)
    return pd.concat(parts, ignore_index=True)


def loss_summary(logs: Mapping[int, Sequence[Any]], hidden_size: int | None = None, *, tail: int = 3,
                 level: float = 0.95) -> pd.DataFrame:
    """Per (layer, topic): over seeds (``logs``: layer -> one log per seed), the mean with a t interval of the
    final ``loss_over_target`` (< 1: moved toward c·u) and of the final ``loss_over_start`` and the initial
    ``loss_over_target`` (:func:`forget_loss_measures`)."""
    rows = []
    for layer, seeds in logs.items():
        per_seed = [forget_loss_measures(log, hidden_size, tail=tail) for log in seeds]
        topics = per_seed[0]["topic"].unique()
        for t in topics:
            vals = {"final_over_target": [], "final_over_start": [], "initial_over_target": []}
            for f in per_seed:
                p = f[f["topic"] == t]
                vals["final_over_target"].append(p.loc[p["final"], "loss_over_target"].mean())
                vals["final_over_start"].append(p.loc[p["final"], "loss_over_start"].mean())
                vals["initial_over_target"].append(p["loss_over_target"].iloc[0])
            row: dict[str, Any] = {"layer": int(layer), "topic": t, "n_seeds": len(per_seed)}
            for k, v in vals.items():
                ci = finite_mean_interval(v, level)
                row[k], row[f"{k}_low"], row[f"{k}_high"] = ci.estimate, ci.low, ci.high
            rows.append(row)
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------- matched utility
_POINT_COLS = ("method", "layer", "seed", "setting", "general_acc", "forget_acc")


def _points(points: Any, columns: Mapping[str, str] | None) -> pd.DataFrame:
    frame = pd.DataFrame(points).copy()
    if columns:
        frame = frame.rename(columns={v: k for k, v in columns.items()})
    if "setting" not in frame and "coeff" in frame:
        frame["setting"] = frame["coeff"]
    missing = [c for c in _POINT_COLS if c not in frame]
    if missing:
        raise ValueError(f"trade-off points need columns {list(_POINT_COLS)} (missing {missing}); map other names "
                         "with columns={'general_acc': 'mmlu', ...}")
    return frame


def _interp_at(general: np.ndarray, forget: np.ndarray, target: float) -> float:
    """Forget accuracy at general accuracy ``target`` by linear interpolation along the curve (points ordered by
    general accuracy; equal general accuracies averaged); NaN outside the measured range (no extrapolation)."""
    order = np.argsort(general, kind="stable")
    g, f = general[order], forget[order]
    ug, inv = np.unique(g, return_inverse=True)
    uf = np.bincount(inv, weights=f) / np.bincount(inv)
    if ug.size == 0 or target < ug[0] or target > ug[-1]:
        return float("nan")
    if ug.size == 1:
        return float(uf[0])
    return float(np.interp(target, ug, uf))


@dataclass(frozen=True, eq=False)
class MatchedForget:
    """Forget accuracy at a matched general accuracy ``target`` per (method, layer): ``estimate`` (mean over seeds of
    each seed's interpolated value), its bootstrap interval, ``n_seeds`` (seeds whose curve covers the target) and
    ``boot`` (the replicates, shared draws across groups so that :func:`compare_matched` can pair them)."""

    target: float
    table: pd.DataFrame
    boot: dict[tuple[str, int], np.ndarray]

    def get(self, method: str, layer: int) -> Interval:
        row = self.table[(self.table["method"] == method) & (self.table["layer"] == layer)]
        if row.empty:
            raise KeyError(f"no trade-off curve for method {method!r} at layer {layer}")
        r = row.iloc[0]
        return Interval(float(r["forget_at_target"]), float(r["low"]), float(r["high"]), int(r["n_seeds"]),
                        int(r["n_seeds"]), "bootstrap", float(r["level"]))


def matched_forget(
    points: Any,
    target: float | None = None,
    *,
    base_general: float | None = None,
    fraction: float = 0.95,
    columns: Mapping[str, str] | None = None,
    general_correct: Mapping[Any, np.ndarray] | None = None,
    forget_correct: Mapping[Any, np.ndarray] | None = None,
    n_boot: int = N_BOOT,
    seed: int = 0,
    level: float = 0.95,
) -> MatchedForget:
    """Forget accuracy of each (method, layer) trade-off curve at a matched general accuracy (Table 1 / Fig. 5 at
    equal utility): each seed's curve (its points over c or β, ordered by general accuracy) is interpolated
    linearly at ``target`` (default ``fraction`` × ``base_general``), then averaged over seeds.

    ``points``: a frame or records with ``method, layer, seed, setting (or coeff), general_acc, forget_acc`` (other
    names through ``columns={"general_acc": "mmlu"}``), e.g. a sweep's results frame. Interval: bootstrap over
    seeds (seed ids resampled, the same ids for every group); with ``general_correct`` / ``forget_correct``
    (``point index -> per-question booleans``, the same questions for every point), the questions are resampled
    too (the same draw for every point), so the interval covers question sampling. A curve that does not reach the
    target gives NaN (no extrapolation)."""
    frame = _points(points, columns)
    if target is None:
        if base_general is None:
            raise ValueError("pass target= (a general accuracy) or base_general= (with fraction=, default 0.95)")
        target = float(fraction) * float(base_general)
    target = float(target)
    if (general_correct is None) != (forget_correct is None):
        raise ValueError("pass both general_correct and forget_correct (per-question booleans per point) or neither")
    rng = np.random.default_rng(seed)
    seeds = np.array(sorted(frame["seed"].unique()))
    groups = list(frame.groupby(["method", "layer"]))
    seed_draws = rng.integers(0, len(seeds), size=(n_boot, len(seeds)))
    g_acc = np.repeat(frame["general_acc"].to_numpy(float)[None], n_boot, 0)
    f_acc = np.repeat(frame["forget_acc"].to_numpy(float)[None], n_boot, 0)
    if general_correct is not None:
        for corr, acc in ((general_correct, g_acc), (forget_correct, f_acc)):
            mat = np.stack([np.asarray(corr[i], float) for i in frame.index])  # [n_points, n_q]
            nq = mat.shape[1]
            counts = rng.multinomial(nq, np.full(nq, 1.0 / nq), size=n_boot)
            acc[:] = counts @ mat.T / nq
    pos = {i: p for p, i in enumerate(frame.index)}
    rows, boot = [], {}
    for (method, layer), part in groups:
        per_seed = {}
        for s in seeds:
            sub = part[part["seed"] == s]
            if len(sub):
                per_seed[s] = [pos[i] for i in sub.index]
        est_vals = [_interp_at(frame.loc[frame.index[idx], "general_acc"].to_numpy(float),
                               frame.loc[frame.index[idx], "forget_acc"].to_numpy(float), target)
                    for idx in per_seed.values()]
        estimate = float(np.nanmean(est_vals)) if np.isfinite(est_vals).any() else float("nan")
        reps = np.full(n_boot, np.nan)
        for b in range(n_boot):
            vals = []
            for si in seed_draws[b]:
                idx = per_seed.get(seeds[si])
                if idx is not None:
                    vals.append(_interp_at(g_acc[b, idx], f_acc[b, idx], target))
            vals = [v for v in vals if np.isfinite(v)]
            if vals:
                reps[b] = np.mean(vals)
        finite = reps[np.isfinite(reps)]
        lo, hi = (np.quantile(finite, [(1 - level) / 2, (1 + level) / 2]) if finite.size else (np.nan, np.nan))
        boot[(method, int(layer))] = reps
        rows.append({"method": method, "layer": int(layer), "target": target, "forget_at_target": estimate,
                     "low": float(lo), "high": float(hi), "n_seeds": int(np.isfinite(est_vals).sum()),
                     "covered_share": float(np.isfinite(reps).mean()), "level": level})
    return MatchedForget(target=target, table=pd.DataFrame(rows), boot=boot)


@dataclass(frozen=True)
class MatchedComparison:
    """``diff`` = forget accuracy of ``a`` − of ``b`` at the matched general accuracy, with a paired bootstrap
    interval (the same seed and question draws for both) and a two-sided bootstrap ``p_value``."""

    a: str
    b: str
    layer: int
    target: float
    diff: float
    low: float
    high: float
    p_value: float
    n_boot: int
    layer_b: int | None = None  # b's layer when it differs from a's

    def significant(self) -> bool:
        return bool(np.isfinite(self.low) and not (self.low <= 0 <= self.high))


def compare_matched(matched: MatchedForget, a: str, b: str, layer: int, *, level: float = 0.95,
                    layer_b: int | None = None) -> MatchedComparison:
    """Paired comparison of methods ``a`` and ``b`` at one layer on :func:`matched_forget`'s shared bootstrap draws
    (e.g. Adaptive RMU − RMU < 0: Adaptive RMU forgets more at the same utility). ``layer_b``: ``b`` at another
    layer (e.g. RMU at a late layer − RMU at an early one; ``layer`` is then ``a``'s)."""
    layer_b = layer if layer_b is None else layer_b
    ea, eb = matched.get(a, layer), matched.get(b, layer_b)
    ra, rb = matched.boot[(a, layer)], matched.boot[(b, layer_b)]
    d = ra - rb
    d = d[np.isfinite(d)]
    diff = ea.estimate - eb.estimate
    if d.size == 0 or not np.isfinite(diff):
        return MatchedComparison(a, b, int(layer), matched.target, float(diff), np.nan, np.nan, np.nan, 0,
                                 None if layer_b == layer else int(layer_b))
    lo, hi = np.quantile(d, [(1 - level) / 2, (1 + level) / 2])
    p = min(1.0, 2 * min((np.count_nonzero(d <= 0) + 1) / (d.size + 1), (np.count_nonzero(d >= 0) + 1) / (d.size + 1)))
    return MatchedComparison(a, b, int(layer), matched.target, float(diff), float(lo), float(hi), float(p), int(d.size),
                             None if layer_b == layer else int(layer_b))


# --------------------------------------------------------------------------------- C1 with a control
@dataclass(frozen=True)
class PairedMean:
    """``diff`` = mean(a − b) over paired items, paired bootstrap interval and p-value, Wilcoxon signed-rank p."""

    diff: float
    low: float
    high: float
    p_value: float
    wilcoxon_p: float
    n: int
    level: float = 0.95

    def significant(self) -> bool:
        return not (self.low <= 0.0 <= self.high)


def paired_mean_difference(a: Any, b: Any, *, n_boot: int = N_BOOT, seed: int = 0, level: float = 0.95
                           ) -> PairedMean:
    """mean(a) − mean(b) for a continuous measure on the same items (e.g. MaxLogit of two models on the same
    prompts): percentile bootstrap over items of the mean difference, two-sided bootstrap p-value (+1 corrected,
    as :func:`~rmu_analysis.stats.paired_difference`) and the Wilcoxon signed-rank p-value."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.ndim != 1 or a.shape != b.shape or a.size < 2:
        raise ValueError(f"a and b must be 1-D with the same length ≥ 2 (one value per item), got {a.shape}, {b.shape}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("a and b must be finite")
    d = a - b
    n = d.size
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot)
    boot = counts @ d / n
    lo, hi = np.quantile(boot, [(1 - level) / 2, (1 + level) / 2])
    p = min(1.0, 2 * min((np.count_nonzero(boot <= 0) + 1) / (n_boot + 1), (np.count_nonzero(boot >= 0) + 1) / (n_boot + 1)))
    w = float(sps.wilcoxon(d).pvalue) if np.any(d != 0) else 1.0
    return PairedMean(float(d.mean()), float(lo), float(hi), float(p), w, int(n), level)


@dataclass(frozen=True, eq=False)
class ConfidenceControl:
    """Per model (name -> ...): ``confidence`` (:class:`~rmu_analysis.confidence.Confidence` on the lettered forget
    prompts) and ``accuracy`` (:class:`~rmu_analysis.evaluation.MCQResult` on the same questions)."""

    confidence: dict[str, Confidence]
    accuracy: dict[str, MCQResult]

    def per_question(self, name: str, metric: str = "max_logit") -> np.ndarray:
        """Each question's ``metric`` for model ``name`` (mean over its generated tokens)."""
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        if name not in self.confidence:
            raise KeyError(f"no model {name!r}: models are {list(self.confidence)}")
        return self.confidence[name].per_prompt()[metric].to_numpy(float)

    def to_frame(self, level: float = 0.95) -> pd.DataFrame:
        """One row per model: forget accuracy with its interval, and each metric's mean over questions with a t
        interval — read "at matched forget accuracy" off the accuracy columns."""
        rows = []
        for name in self.confidence:
            ci = self.accuracy[name].interval(level)
            row: dict[str, Any] = {"model": name, "forget_acc": ci.estimate, "acc_low": ci.low, "acc_high": ci.high}
            for m in METRICS:
                mi = finite_mean_interval(self.per_question(name, m), level)
                row[m], row[f"{m}_low"], row[f"{m}_high"] = mi.estimate, mi.low, mi.high
            rows.append(row)
        return pd.DataFrame(rows)

    def compare(self, a: str, b: str, metric: str = "max_logit", *, n_boot: int = N_BOOT, seed: int = 0
                ) -> dict[str, Any]:
        """Paired comparisons of models ``a`` and ``b`` on the same questions: ``metric`` (a − b,
        :func:`paired_mean_difference`) and forget accuracy (a − b, :func:`~rmu_analysis.stats.paired_difference`;
        ``matched``: its interval contains 0)."""
        conf = paired_mean_difference(self.per_question(a, metric), self.per_question(b, metric), n_boot=n_boot,
                                      seed=seed)
        acc = paired_difference(self.accuracy[a].correct, self.accuracy[b].correct, self.accuracy[a].clusters,
                                n_boot=n_boot, seed=seed)
        return {"metric": metric, "confidence": conf, "accuracy": acc, "matched": not acc.significant()}


def confidence_control(
    models: Mapping[str, Any],
    tokenizer: Any,
    records: Any,
    subject: Any = None,
    *,
    base: nn.Module | None = None,
    generate: int = 0,
    batch_size: int = 16,
    cluster_key: Any = None,
    scoring: str = "letter",
) -> ConfidenceControl:
    """C1 with a control (Fig. 2a–d): for each model (name -> model or :class:`UnlearnResult`, installed in
    ``base``; include the base model itself, e.g. ``{"base": base, "rmu": res_rmu, "ga": res_ga, ...}``), MaxLogit,
    max probability and entropy on the forget prompts (the zero-shot "… Answer:" prompt of
    :func:`~rmu_analysis.evaluation.evaluate_mcq`; ``generate=k``: k greedy tokens, else the next token) and the
    forget accuracy on the same questions, so each confidence is read beside its accuracy. ``scoring``: the
    lettered template (``"letter"``, as lm-eval on WMDP) or ``"cloze"`` (question then "Answer:", the next token
    being the answer's first; for a model that answers only in cloze, such as the organism, whose lettered
    accuracy is at chance for every model and so cannot tell matched from unmatched forgetting)."""
    if not models:
        raise ValueError("models is empty: pass {name: model or UnlearnResult}")
    recs = question_records(records)
    subjects = subject_list(subject, len(recs))
    if scoring not in ("letter", "cloze"):
        raise ValueError(f"scoring must be 'letter' or 'cloze', got {scoring!r}")
    prompts = [mcq_prompt(r, s, scoring=scoring) for r, s in zip(recs, subjects)]
    conf, acc = {}, {}
    for name, run in models.items():
        with _as_model(run, base) as model:
            tok = resolve_tokenizer(model, tokenizer)
            conf[name] = measure_confidence(model, prompts, tok, generate=generate, batch_size=batch_size)
            acc[name] = evaluate_mcq(model, tok, recs, subjects, scoring=scoring, batch_size=batch_size,
                                     cluster_key=cluster_key)
    return ConfidenceControl(confidence=conf, accuracy=acc)


def misdirection_verdict(
    control: ConfidenceControl,
    misdirection: Sequence[str] = ("rmu", "adaptive-rmu"),
    output: Sequence[str] = ("ga", "npo"),
    *,
    metric: str = "max_logit",
    n_boot: int = N_BOOT,
    seed: int = 0,
) -> dict[str, Any]:
    """Does misdirection (RMU-type models) lower confidence more than output-space unlearning (GA, NPO)? For every
    pair (m, o) present in ``control``: the paired difference of ``metric`` (m − o, same prompts) and of forget
    accuracy. ``lower``: m's confidence is significantly lower (higher for ``entropy``); a pair counts as
    ``supports`` only when it is also at matched forget accuracy (paired accuracy interval contains 0).
    ``held``: at least one matched pair and every matched pair supports the claim."""
    pairs = []
    for m in misdirection:
        for o in output:
            if m not in control.confidence or o not in control.confidence:
                continue
            cmp = control.compare(m, o, metric, n_boot=n_boot, seed=seed)
            c = cmp["confidence"]
            lower = c.high < 0 if metric != "entropy" else c.low > 0
            pairs.append({"misdirection": m, "output": o, "metric": metric, "diff": c.diff, "low": c.low,
                          "high": c.high, "p_value": c.p_value, "wilcoxon_p": c.wilcoxon_p,
                          "acc_diff": cmp["accuracy"].diff, "acc_low": cmp["accuracy"].low,
                          "acc_high": cmp["accuracy"].high, "matched": cmp["matched"], "lower": bool(lower),
                          "supports": bool(lower and cmp["matched"])})
    if not pairs:
        raise ValueError(f"no (misdirection, output) pair among the models {list(control.confidence)}")
    table = pd.DataFrame(pairs)
    matched = table[table["matched"]]
    return {"held": bool(len(matched) and matched["supports"].all()), "n_matched": int(len(matched)),
            "table": table}
