"""Unlearning methods on the model organism: Adaptive RMU (β = 5), RMU with a tuned c, GA, GradDiff and NPO.

Run: ``nice -n 19 python benchmarks/organism_methods.py`` (about 17 minutes on one shared CPU thread). Prints the
tables (Markdown) and writes them to ``figures/organism_methods.md``. ``--only rmu adaptive-rmu`` runs a part.

Setting: the 12-block organism (fp32), unlearn layer l = 3 (a quarter of the depth; trained
tensors: the MLP down-projections of blocks 1–3 for every method), forget = the bio and cyber corpora of
``organism_corpora()`` (400 texts each), retain = its retain corpus, batch 4, seed 42, one pass over the
forget corpora (200 steps = 100 batches per topic) unless a grid says fewer. Accuracy: the organism's *dev*
question sets when it has them (testbed 2: bio 168, cyber 168, general 288 questions on entities disjoint from the
reported test questions; testbed 1 had only its test sets), cloze scoring (``organism.SCORING``; the organism is at
chance in the lettered format). Per method, the setting with the lowest mean forget accuracy among those
keeping general accuracy ≥ 90% of the base model's is chosen (ties: higher general accuracy).

Deviations from the paper's Zephyr-7B recipe (arXiv 2408.06223, Table 1; docs/paper.md), and why:
- lr 1e-2 / 3e-3 instead of 5e-5: Adam moves each weight by about lr per step, so the change of a block's
  output scales with the MLP width (384 here, 14,336 in Zephyr). At 5e-5 (and at 1e-3 with α = 1200) the
  organism's accuracies do not move at all in 200 steps.
- α 30–300 instead of 1200: at α = 1200 the retain term pins blocks 1–3 (forget accuracy stays at the base
  model's even at lr 5e-3); both loss terms are per-dimension means, so α trades ‖h − c·u‖² against the
  retain drift whatever the width, and the organism's forget and retain text share most of their vocabulary.
- 200 steps instead of 500: the corpora hold 100 batches of 4 per topic (the reference stops when the data
  run out); two passes (400 steps) did not forget more in the exploration.
- Forget/retain max length: the reference's 512/768/512, which no organism text reaches (≤ 84 tokens).
"""
from __future__ import annotations

import argparse
import time
from collections import Counter, defaultdict
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from rmu_analysis import steer
from rmu_analysis.evaluation import evaluate_mcq
from rmu_analysis.experiments import WMDP_TARGETS
from rmu_analysis.organism import SCORING, has_dev_split, load_organism, organism_corpora, organism_mcq
from rmu_analysis.recipes import PRESETS
from rmu_analysis.unlearning import AdaptiveRMUConfig, GAConfig, GradDiffConfig, NPOConfig, RMUConfig, unlearn

ROOT = Path(__file__).resolve().parents[1]
LAYER = PRESETS["organism-rmu"].layer  # 3, a quarter of the organism's 12 blocks; trained blocks 1-3
DOMAINS = ("bio", "cyber", "general")
KEEP = WMDP_TARGETS.min_general_ratio  # general accuracy must stay >= KEEP x base (0.9)
TARGET_FORGET = WMDP_TARGETS.max_forget  # 0.30 for Adaptive RMU, each forget topic (docs/targets.md)

#: The grids (one run each). Adaptive RMU keeps β = 5 and tunes (lr, α); RMU tunes c at Adaptive RMU's
#: lr / α; the baselines tune lr and steps with their defaults otherwise (GradDiff / NPO: α = 1, NPO β = 0.1).
#: GA and GradDiff fall off a cliff (general accuracy to ~0.45) within a few dozen steps, so their step grids
#: bracket it (a first pass with lr 3e-4 moved nothing in 200 steps; 1e-3 collapsed by 100 / 200 steps).
GRIDS = {
    "adaptive-rmu": [AdaptiveRMUConfig(layer=LAYER, beta=5.0, lr=lr, alpha=a, steps=200)
                     for lr in (3e-3, 1e-2) for a in (30.0, 100.0, 300.0)],
    "rmu": [RMUConfig(layer=LAYER, steering_coeff=c, lr=1e-2, alpha=100.0, steps=200)
            for c in (6.5, 10.0, 20.0, 40.0, 80.0)],
    "ga": [GAConfig(layer=LAYER, lr=lr, steps=s) for lr in (5e-4, 1e-3) for s in (50, 75, 100)],
    "graddiff": [GradDiffConfig(layer=LAYER, lr=lr, steps=s) for lr in (5e-4, 1e-3) for s in (100, 150, 200)],
    "npo": [NPOConfig(layer=LAYER, lr=lr, steps=s) for lr in (1e-3, 3e-3, 1e-2) for s in (100, 200)],
}
LABELS = {"adaptive-rmu": "Adaptive RMU (β = 5)", "rmu": "RMU", "ga": "GA", "graddiff": "GradDiff", "npo": "NPO"}


@dataclass(frozen=True)
class Row:
    method: str
    setting: str
    acc: dict[str, float]
    seconds: float
    steps: int

    @property
    def forget(self) -> float:
        return (self.acc["bio"] + self.acc["cyber"]) / 2

    def step_ms(self) -> float:
        return 1000 * self.seconds / max(self.steps, 1)


def setting(cfg) -> str:
    parts = ""
    if isinstance(cfg, RMUConfig):
        parts = f"c = {cfg.steering_coeff:g}, "
    elif isinstance(cfg, AdaptiveRMUConfig):
        parts = f"β = {cfg.beta:g}, "
    parts += f"lr {cfg.lr:g}, {cfg.steps} steps"
    if hasattr(cfg, "alpha"):
        parts += f", α = {cfg.alpha:g}"
    return parts


def accuracies(model, tok, questions) -> dict[str, float]:
    return {d: evaluate_mcq(model, tok, questions[d], scoring=SCORING, batch_size=64).accuracy for d in DOMAINS}


def run(model, tok, corpora, questions, cfg) -> tuple[Row, object]:
    t0 = time.perf_counter()
    result = unlearn(model, tok, corpora["forget"], corpora["retain"], cfg, progress=False)
    seconds = time.perf_counter() - t0
    with result.installed(model):
        acc = accuracies(model, tok, questions)
    return Row(cfg.method, setting(cfg), acc, seconds, result.steps), result


def marginal_prior_accuracy(records) -> float:
    """Accuracy of always picking the choice that answers the question's attribute most often in the set
    (ties split): what knowing the value frequencies, and nothing about the entity, is worth."""
    counts: dict[str, Counter] = defaultdict(Counter)
    for r in records:
        counts[r["attribute"]][r["choices"][r["answer"]]] += 1
    total = 0.0
    for r in records:
        freq = [counts[r["attribute"]][c] for c in r["choices"]]
        best = [i for i, f in enumerate(freq) if f == max(freq)]
        total += (r["answer"] in best) / len(best)
    return total / len(records)


def choose(rows: list[Row], base: dict[str, float]) -> Row | None:
    ok = [r for r in rows if r.acc["general"] >= KEEP * base["general"]]
    return min(ok, key=lambda r: (round(r.forget, 6), -r.acc["general"])) if ok else None


def fmt_row(name: str, r: Row | None, base: dict[str, float], extra: str = "") -> str:
    if r is None:
        return f"| {name} | no setting keeps general ≥ {KEEP:.0%} of base | | | | | | |"
    return (f"| {name} | {r.setting}{extra} | {r.acc['bio']:.3f} | {r.acc['cyber']:.3f} | {r.forget:.3f} | "
            f"{r.acc['general']:.3f} | {r.acc['general'] / base['general']:.2f} | {r.step_ms():.0f} |")


HEADER = ("| method | setting | bio | cyber | forget mean | general | general / base | ms / step |\n"
          "|---|---|---|---|---|---|---|---|")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="+", choices=sorted(GRIDS), default=list(GRIDS), help="methods to run")
    parser.add_argument("--out", type=Path, default=ROOT / "figures" / "organism_methods.md")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared CPU)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*pad token.*")

    model, tok = load_organism()
    corpora = organism_corpora()
    questions = organism_mcq(split="dev") if has_dev_split() else organism_mcq()  # choose on dev, never on test
    base = accuracies(model, tok, questions)
    print(f"base: {', '.join(f'{d} {a:.3f}' for d, a in base.items())}", flush=True)

    rows: dict[str, list[Row]] = {}
    results: dict[str, dict[str, object]] = {}
    for method in args.only:
        rows[method], results[method] = [], {}
        for cfg in GRIDS[method]:
            row, result = run(model, tok, corpora, questions, cfg)
            rows[method].append(row)
            results[method][row.setting] = result
            print(fmt_row(LABELS[method], row, base), flush=True)
    chosen = {m: choose(rs, base) for m, rs in rows.items()}

    lines = [
        f"Model organism (12 blocks, width 128), unlearn layer l = {LAYER} (trained: MLP down-projections of blocks "
        f"{LAYER - 2}–{LAYER}), forget bio + cyber, cloze accuracy on the "
        f"{'dev' if has_dev_split() else 'held-out'} questions ({', '.join(f'{d} {len(q)}' for d, q in questions.items())}; "
        f"chance 0.25). Per method: the grid setting with the lowest mean forget accuracy among those "
        f"with general ≥ {KEEP:.0%} of base (`benchmarks/organism_methods.py`; one CPU thread, fp32; ms / step "
        f"is wall time on a shared machine, noisy: RMU and Adaptive RMU do the same work per step).",
        "", HEADER,
        f"| base model | | {base['bio']:.3f} | {base['cyber']:.3f} | {(base['bio'] + base['cyber']) / 2:.3f} | "
        f"{base['general']:.3f} | 1.00 | |",
    ]
    for method in rows:
        extra = ""
        r = chosen[method]
        if method == "adaptive-rmu" and r is not None:
            coeffs = results[method][r.setting].coefficients
            extra = " (c = " + " / ".join(f"{v:.1f}" for v in coeffs.values()) + ")"
        lines.append(fmt_row(LABELS[method], r, base, extra))

    ada = chosen.get("adaptive-rmu")
    if ada is not None:
        # Reference point: Assumption 1 made true at every position (block l's output replaced by c·u, the
        # chosen Adaptive RMU run's u and coefficient): the model's output no longer depends on its input.
        res = results["adaptive-rmu"][ada.setting]
        with steer(model, LAYER, res.coefficients["bio"] * res.control_vectors["bio"]):
            const = accuracies(model, tok, questions)
        lines.append(f"| input-independent model (block {LAYER} output := c·u everywhere) | reference point | "
                     f"{const['bio']:.3f} | {const['cyber']:.3f} | {(const['bio'] + const['cyber']) / 2:.3f} | "
                     f"{const['general']:.3f} | {const['general'] / base['general']:.2f} | |")
        met = max(ada.acc["bio"], ada.acc["cyber"]) <= TARGET_FORGET and ada.acc["general"] >= KEEP * base["general"]
        prior = {d: marginal_prior_accuracy(questions[d]) for d in ("bio", "cyber")}
        lines += ["", f"Adaptive RMU target (each forget topic ≤ {TARGET_FORGET:.2f}, general ≥ {KEEP:.0%} of "
                  f"base): {'met' if met else 'not met'} (bio {ada.acc['bio']:.3f}, cyber {ada.acc['cyber']:.3f}, "
                  f"general {ada.acc['general']:.3f} = {ada.acc['general'] / base['general']:.2f} × base). "
                  f"The question sets hold one question per (entity, attribute) and the values are unevenly "
                  f"spread: knowing only how often each value answers each attribute scores bio "
                  f"{prior['bio']:.3f}, cyber {prior['cyber']:.3f}, and a model whose output ignores its input "
                  f"(the row above) already scores near or above 0.30."]

    lines += ["", "All runs:", "", HEADER]
    for method, rs in rows.items():
        lines += [fmt_row(LABELS[method], r, base) for r in rs]
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
