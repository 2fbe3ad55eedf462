"""Random noise augmentation (``retain_noise``, arXiv 2501.19202) on the model organism: forgetting, general accuracy
and forget-token fragility of Adaptive RMU with and without noise on the retain representations.

Run: ``nice -n 19 python benchmarks/noise_augmentation.py`` (about 4 minutes on one shared CPU thread). Prints the
tables (Markdown) and writes them to ``figures/noise_augmentation.md``; ``--noise 0 0.1`` picks the levels.

Setting: the organism's Adaptive RMU recipe (``PRESETS["organism-adaptive-rmu"]``: l = 3, β = 5, α = 100, lr 1e-2,
200 steps, seed 42), once per noise level σ (relative to each token's norm, see ``AdaptiveRMUConfig``). Accuracy on
the held-out question sets, cloze scoring (``organism.SCORING``). Fragility (``attacks.fragility``): every general
question again with one forget-topic entity (drawn with seed 0 from the entities of the bio and cyber questions)
inserted before it ("prefix": "Krurnoux virus is mentioned here. …") or inside it ("inside": "… (Krurnoux
virus)?"); the drop is clean − perturbed on the same questions. Intervals: 95% cluster bootstrap over the
questions' entities (several questions ask about one entity; ``cluster_key="entity"``), 2,000 resamples, seeded.
"""
from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np
import torch

from rmu_analysis.attacks.fragility import FragilityConfig, fragility
from rmu_analysis.evaluation import evaluate_mcq
from rmu_analysis.organism import SCORING, SUBJECTS, load_organism, organism_corpora, organism_mcq
from rmu_analysis.recipes import preset
from rmu_analysis.stats import N_BOOT, format_interval
from rmu_analysis.unlearning import unlearn

ROOT = Path(__file__).resolve().parents[1]
RECIPE = "organism-adaptive-rmu"
WHERE = ("prefix", "inside")
CLUSTER = "entity"


def drop_difference(a, b, *, seed: int = 0, n_boot: int = N_BOOT) -> tuple[float, float, float]:
    """(drop_a − drop_b, low, high): two models' fragility drops compared on the same questions, a cluster bootstrap
    over the entities (each resample scores both models' clean and perturbed answers on the same questions)."""
    da = a.clean.correct.astype(float) - a.perturbed.correct.astype(float)
    db = b.clean.correct.astype(float) - b.perturbed.correct.astype(float)
    clusters = np.asarray([str(c) for c in a.clean.clusters])
    names = np.unique(clusters)
    members = [np.flatnonzero(clusters == n) for n in names]
    rng = np.random.default_rng(seed)
    boot = np.empty(n_boot)
    for i in range(n_boot):
        idx = np.concatenate([members[j] for j in rng.integers(0, len(names), size=len(names))])
        boot[i] = (da[idx] - db[idx]).mean()
    low, high = np.percentile(boot, [2.5, 97.5])
    return float((da - db).mean()), float(low), float(high)


def measure(model, tok, mcq, terms, label: str) -> dict:
    """Accuracy per question set and the fragility result per insertion place, for the model as it is now."""
    acc = {d: evaluate_mcq(model, tok, mcq[d], SUBJECTS[d], scoring=SCORING, batch_size=32, cluster_key=CLUSTER)
           for d in ("bio", "cyber", "general")}
    frag = {w: fragility(model, tok, mcq["general"], terms, FragilityConfig(where=w, scoring=SCORING, seed=0),
                         subject=SUBJECTS["general"], method=label, cluster_key=CLUSTER) for w in WHERE}
    return {"acc": acc, "frag": frag}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--noise", type=float, nargs="+", default=[0.0, 0.1, 0.3, 1.0], help="retain_noise levels σ")
    parser.add_argument("--out", type=Path, default=ROOT / "figures" / "noise_augmentation.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    model, tok = load_organism()
    model = model.float().eval()
    corpora, mcq = organism_corpora(), organism_mcq()
    terms = sorted({str(r["entity"]) for r in mcq["bio"] + mcq["cyber"]})

    rows = {"base": measure(model, tok, mcq, terms, "base")}
    seconds = {}
    for sigma in args.noise:
        cfg = preset(RECIPE, retain_noise=sigma)
        t = time.perf_counter()
        result = unlearn(model, tok, corpora["forget"], corpora["retain"], cfg, progress=False)
        seconds[sigma] = time.perf_counter() - t
        with result.installed(model):
            rows[sigma] = measure(model, tok, mcq, terms, f"σ={sigma:g}")
        last = result.log[-1]
        print(f"σ = {sigma:g}: {seconds[sigma]:.0f} s, last retain loss {last['retain_loss']:.4g}, "
              f"forget loss {last['forget_loss']:.4g}", flush=True)

    cfg = dataclasses.replace(preset(RECIPE), retain_noise=0.0)
    lines = [f"# Random noise augmentation on the organism ({RECIPE}: l = {cfg.layer}, β = {cfg.beta:g}, "
             f"α = {cfg.alpha:g}, lr {cfg.lr:g}, {cfg.steps} steps, seed {cfg.seed})", "",
             "Accuracy % (95% cluster-bootstrap interval over entities); drop = clean − perturbed general accuracy "
             "on the same questions, pp.", "",
             "| model | bio | cyber | general | drop, term before | drop, term inside |", "|---|---|---|---|---|---|"]
    for key, r in rows.items():
        name = "base" if key == "base" else f"Adaptive RMU, σ = {key:g}"
        acc = " | ".join(format_interval(r["acc"][d].interval()) for d in ("bio", "cyber", "general"))
        drops = " | ".join(format_interval(r["frag"][w].drop) for w in WHERE)
        lines.append(f"| {name} | {acc} | {drops} |")
    ref = rows[args.noise[0]] if args.noise[0] == 0.0 else None
    if ref is not None and len(args.noise) > 1:
        lines += ["", "Noise against no noise (σ = 0), paired on the same questions, pp: a negative forget or drop "
                  "difference is better.", "",
                  "| σ | bio | cyber | general | perturbed general, term before | drop, term before | "
                  "perturbed general, term inside | drop, term inside |", "|---|---|---|---|---|---|---|---|"]
        for sigma in args.noise[1:]:
            r = rows[sigma]
            cells = [format_interval(r["acc"][d].compare(ref["acc"][d])) for d in ("bio", "cyber", "general")]
            for w in WHERE:
                cells.append(format_interval(r["frag"][w].perturbed.compare(ref["frag"][w].perturbed)))
                d, lo, hi = drop_difference(r["frag"][w], ref["frag"][w])
                cells.append(f"{100 * d:+.1f} pp [{100 * lo:.1f}, {100 * hi:.1f}]")
            lines.append(f"| {sigma:g} | " + " | ".join(cells) + " |")
    lines += ["", f"Training seconds per run: {', '.join(f'σ = {s:g}: {v:.0f}' for s, v in seconds.items())}; "
              f"total {time.perf_counter() - t0:.0f} s (one CPU thread)."]
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
