"""Quantities from the paper's theory (arXiv 2408.06223: Proposition 1, Eq. 8–22), and numerical checks of its first-order arguments.

- :func:`noise_sensitivity` — Φ(g^(l:k)) of Eq. 8–9 (Fig. 1), dataset version: how much a perturbation ξ of the
  block-l representation is amplified (Φ > 1) or damped (Φ < 1) by the sub-network g^(l:k) = blocks l+1 … k.
- :func:`logit_jacobian` — J of W ∘ g^(l:L) with respect to the block-l output (Proposition 1), via torch.func.
- :func:`proposition1` — Proposition 1 checked by sampling: logits of a prompt whose block-l output is c·u + ε
  against the predicted N(W g(c·u), η W J Jᵀ Wᵀ); Taylor error against η (log-log slope) and normality tests.
- :func:`optimal_coefficient` — Eq. 19's c* from the Jacobian next to the argmin of the exact Eq. 10 objective.
- :func:`confidence_vs_coeff` — MaxLogit, max probability and entropy of steered prompts against c (C1).
- :func:`input_gradient_norms` — the GCG argument (Eq. 20–22): gradient of log p(correct letter) with respect to
  the one-hot input tokens.
- :func:`forget_convergence` — Fig. 4: does the forget loss converge, and did the norm start below or above c?

Cost: Jacobians are computed in reverse mode (``torch.func.jacrev``: one vector-Jacobian product per output
row; CPU ``scaled_dot_product_attention`` has no forward-mode derivative, so ``jvp`` / ``jacfwd`` cannot be
used). The organism (width 128, vocabulary ~1k) gets full Jacobians in seconds. For a 7B model pass
``projection=`` (k directions in logit space) to :func:`logit_jacobian` / :func:`proposition1`, keep prompts
short, and give :func:`optimal_coefficient` only the ``ks`` you need (each costs d backward passes of a
one-token sequence; ``chunk_size=`` bounds the memory).
"""
from __future__ import annotations

from .noise import NoiseSensitivity, block_calls, mean_representation, noise_sensitivity, push_blocks
from .jacobian import LogitJacobian, Proposition1, logit_jacobian, loglog_slope, proposition1
from .coefficient import ConfidenceSweep, OptimalCoefficient, confidence_vs_coeff, optimal_coefficient
from .gradients import InputGradients, input_gradient_norms
from .convergence import Convergence, forget_convergence, log_frame, log_hidden_size

__all__ = [
    "NoiseSensitivity", "noise_sensitivity", "mean_representation", "block_calls", "push_blocks",
    "LogitJacobian", "logit_jacobian", "Proposition1", "proposition1", "loglog_slope",
    "OptimalCoefficient", "optimal_coefficient", "ConfidenceSweep", "confidence_vs_coeff",
    "InputGradients", "input_gradient_norms", "Convergence", "forget_convergence", "log_frame", "log_hidden_size",
]
