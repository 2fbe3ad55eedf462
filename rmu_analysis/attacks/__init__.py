"""Knowledge-recovery attacks on unlearned models, one module per attack, each a function with a frozen config:

- :mod:`.gcg` — Greedy Coordinate Gradient over an adversarial suffix/prefix (Zou et al. 2023, arXiv 2307.15043),
  the attack arXiv 2408.06223 §3.3 (Eq. 20–22) argues RMU resists, with a wrong-answer control and transfer;
- :mod:`.relearn` — a few fine-tuning steps on forget-topic text (and on unrelated text, the control)
  (Łucki et al. 2024, arXiv 2409.18025);
- :mod:`.probe` — linear probes on the base model's block outputs applied to the unlearned model;
- :mod:`.ablate` — projecting the direction unlearning adds out of a block's output (Łucki et al. 2024);
- :mod:`.fragility` — a forget-topic term inserted into general questions (arXiv 2501.19202).

Every result has ``to_frame()`` with the columns ``method, attack, setting, metric, accuracy, low, high, n, steps,
seconds`` (:mod:`.common`), so a method × attack table is :func:`attack_table` of the results.
"""
from __future__ import annotations

from .ablate import AblateConfig, AblateResult, ablate_attack, ablate_direction, unlearning_direction
from .common import AttackRow, attack_table, split_records
from .fragility import FragilityConfig, FragilityResult, fragility, insert_term, perturb_records
from .gcg import GCGConfig, GCGReport, GCGResult, GCGTransferResult, gcg, gcg_attack, gcg_transfer
from .probe import LinearProbe, ProbeConfig, ProbeResult, fit_probe, probe_attack
from .relearn import RelearnConfig, RelearnReport, RelearnResult, relearn, relearn_attack

__all__ = [
    "AttackRow", "attack_table", "split_records",
    "GCGConfig", "GCGResult", "GCGReport", "GCGTransferResult", "gcg", "gcg_attack", "gcg_transfer",
    "RelearnConfig", "RelearnResult", "RelearnReport", "relearn", "relearn_attack",
    "ProbeConfig", "ProbeResult", "LinearProbe", "fit_probe", "probe_attack",
    "AblateConfig", "AblateResult", "ablate_direction", "unlearning_direction", "ablate_attack",
    "FragilityConfig", "FragilityResult", "fragility", "insert_term", "perturb_records",
]
