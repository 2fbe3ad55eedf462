"""Sweeps of unlearning runs and the paper's experiments built from them (Fig. 5, Fig. 3, Table 1 analogues), one
concern per module:

- :mod:`.specs` — one run: :class:`RunSpec` (method, block l, coefficient, steps, seed ...) and its key;
- :mod:`.inputs` — what a run reads, by content (the model's files, the data): part of every key;
- :mod:`.workbench` — the data (:class:`ExperimentData`, held-out split) and the shared model (:class:`Workbench`);
- :mod:`.measure` — what a run measures (accuracy, retain loss, MaxLogit, cos(u, h), ‖h^(l)‖);
- :mod:`.runner` — :func:`run_one`, and :func:`run_sweep` (one atomic JSON per run, resumable, shardable,
  several worker processes that end with the sweep);
- :mod:`.results` — :func:`load_results`: a results directory as one row per run; :func:`rekey`;
- :mod:`.plans` — grids and :class:`ExperimentPlan` (the named plans are in :mod:`rmu_analysis.recipes`);
- :mod:`.targets` — :data:`TARGETS`, every success threshold, named once;
- :mod:`.analysis` — the numbers the claims are checked on (layer targets, collapse, Table 1, ...);
- :mod:`.report` — ``table1.md`` and ``summary.md``;
- :mod:`.theory_checks`, :mod:`.figures`, :mod:`.cli` — the reproduction's theory checks, figures and the
  ``rmu-analysis sweep`` command; :mod:`.robustness` / :mod:`.robustness_report` (attacks) and :mod:`.tradeoff`
  (trade-off curves, the layer-wise claims at matched utility) — imported on their own: they pull in plotting
  and the recipes.

What a run measures (all on held-out data: the last ``EvalSettings.eval_texts`` texts of every corpus never train):
per-set multiple-choice accuracy (forget topics and ``general``), retain LM loss, MaxLogit token confidence on
the forget questions (Fig. 2a–d), cos(u, h^(l)) on forget texts beside a uniform and a Gaussian null direction
(Fig. 2e–h), the forget norm ‖h^(l)‖ at block l before and after unlearning (Fig. 4), the coefficient used,
the training log and the wall time.
"""
from __future__ import annotations

from .analysis import (
    METHOD_NAMES, coefficient_sweep, collapse_points, collapse_summary, convergence_check, early_late,
    early_late_split, isotonic_decreasing, layer_table, layer_targets, point_label, spearman, summarize,
    table1_choice, table1_frame, table1_select, question_clusters, pooled_interval, paired_runs, table1_intervals,
    method_comparison, deep_layer, interval_claims, fixed_c_convergence,
)
from .measure import (
    accuracies, accuracy_table, alignment_table, confidence_table, each_installed, forget_norms, lm_loss,
    measure_outputs, measure_representations, question_prompts,
)
from .plans import (
    ExperimentPlan, coefficient_grid, grid_points, layer_sweep_grid, plan_grids, plan_norms, saved_norms, table1_grid,
    valid_layers,
)
from .report import frame_markdown, summary_markdown, table1_markdown, table1_text
from .inputs import data_identity, model_identity, run_inputs
from .results import Rekeyed, finished_runs, flatten_result, load_results, rekey, result_problem, result_topics
from .runner import SweepOutcome, is_finished, parse_shard, rerun_check, run_one, run_sweep, shard_specs
from .specs import COEFF_FIELDS, RESULT_VERSION, STEERING, EvalSettings, RunSpec
from .targets import TARGETS, WMDP_TARGETS, Targets
from .workbench import (
    ExperimentData, LazyWorkbench, Workbench, cycle_texts, data_digest, data_from_files, organism_data,
    training_texts,
)

__all__ = [
    "RESULT_VERSION", "STEERING", "COEFF_FIELDS", "EvalSettings", "RunSpec",
    "model_identity", "data_identity", "run_inputs",
    "ExperimentData", "data_digest", "organism_data", "data_from_files", "cycle_texts", "Workbench", "LazyWorkbench",
    "training_texts", "lm_loss", "question_prompts", "accuracies", "measure_outputs", "measure_representations",
    "forget_norms", "each_installed", "accuracy_table", "confidence_table", "alignment_table", "run_one", "run_sweep",
    "SweepOutcome", "parse_shard", "shard_specs", "is_finished", "rerun_check",
    "flatten_result", "load_results", "result_topics", "finished_runs", "result_problem", "rekey", "Rekeyed",
    "valid_layers", "layer_sweep_grid", "coefficient_grid", "table1_grid", "grid_points", "ExperimentPlan",
    "plan_grids", "plan_norms", "saved_norms", "Targets", "TARGETS", "WMDP_TARGETS",
    "spearman", "isotonic_decreasing", "layer_table", "layer_targets", "early_late", "early_late_split",
    "collapse_points", "collapse_summary", "coefficient_sweep", "convergence_check", "fixed_c_convergence",
    "point_label", "METHOD_NAMES",
    "table1_select", "table1_choice", "table1_frame", "summarize", "question_clusters", "pooled_interval",
    "paired_runs", "table1_intervals", "method_comparison", "deep_layer", "interval_claims", "table1_markdown", "table1_text", "frame_markdown",
    "summary_markdown",
]
