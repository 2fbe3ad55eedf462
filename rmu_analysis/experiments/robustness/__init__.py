"""The robustness lab: knowledge-recovery attacks on every method's unlearned models, run by the sweep runner.

arXiv 2408.06223 §3.3 (Eq. 20–22) argues that RMU models resist GCG (Zou et al. 2023, arXiv 2307.15043) because
their input gradients carry no signal. Here each method of Table 1 (and the base model) is trained once per seed
and attacked with GCG (toward the correct answer, toward a fixed wrong one — the control —, and a universal string
tuned on dev questions and applied to test ones), relearning on forget-topic text that states none of the tested
facts (and on retain text, the control; Łucki et al. 2024, arXiv 2409.18025), linear probes, ablation of the
direction unlearning added (Łucki et al.) and a forget term inserted into general questions (arXiv 2501.19202).

One run = one :class:`AttackSpec` (method, seed, attack), one atomic JSON file in the results directory, keyed
like the unlearning runs (a hash of the spec, the unlearning run's resolved config and the identity of the model's
files and the data, :mod:`.inputs`), resumable and shardable by :func:`~.runner.run_sweep`. The attacks of one
(method, seed) share one training (:func:`trained`, kept for the next run of the same spec). A result holds the
per-question correctness of the attacked questions before and after the attack (and of the control), so
:func:`robustness_table` pools seeds and resamples facts for every interval. Accuracy is always the evaluation's
(:func:`~rmu_analysis.evaluation.evaluate_mcq` with the data's scoring). Questions: the dev sets of the data when
it has them (``ExperimentData.dev_mcq``) tune the transfer string and the probes and the test sets are reported;
otherwise each forget set is split by entity (:func:`~rmu_analysis.attacks.split_records`).

The package: :mod:`.spec` (what a run is), :mod:`.run` (running it), :mod:`.table` (reading the results).
"""
from __future__ import annotations

from .run import attack_questions, run_attack, trained
from .spec import (
    ATTACK_NAMES, ATTACKS, RESULT_KIND, AttackBudget, AttackSpec, RobustnessPlan, robustness_grid, run_spec_from_config,
)
from .table import (
    attack_result_problem, curve_frame, format_claim, gcg_claim, is_attack_result, load_attack_results,
    robustness_markdown, robustness_table,
)

__all__ = ["ATTACKS", "ATTACK_NAMES", "RESULT_KIND", "AttackBudget", "AttackSpec", "RobustnessPlan",
           "robustness_grid", "run_spec_from_config", "attack_questions", "trained", "run_attack",
           "attack_result_problem", "is_attack_result", "load_attack_results", "robustness_table", "gcg_claim",
           "format_claim", "robustness_markdown", "curve_frame"]
