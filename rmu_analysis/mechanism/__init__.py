"""The paper's mechanism measured on a trained (unlearned) model, token by token (arXiv 2408.06223, Section 3;
docs/claims.md): does Assumption 1 hold, does Proposition 1 predict the logits the model actually produces, how
u-specific is the alignment with u (C2), and noise sensitivity (Eq. 8–9, C4) and the optimal coefficient
(Eq. 10–19) on real prompts with noise at every token position.

- :func:`assumption1` — forget (and retain) block-l states against c·u: cos²(h, u), ⟨h, u⟩ / c, ‖h − c·u‖² / ‖c·u‖²
  and the input-dependent spread E‖h − E h‖² / ‖c·u‖², per token, with 95% intervals over texts.
- :func:`proposition1_trained` — Proposition 1's N(W g(c·u) + J m, J Σ Jᵀ) from the measured noise (mean m,
  covariance Σ of h − c·u) beside the last-position logits the model produces on the forget prompts.
- :func:`normalized_alignment`, :func:`centered_cosine`, :func:`u_alignment` — C2 with a null that scores c·u 1
  and an unrelated state ≈ 0.
- :func:`token_noise_sensitivity` — Φ(g^(l:k)) (Eq. 8) per prompt, noise ξ at every token of real prompts
  (relative to each token's norm by default: RMSNorm makes a block's update blind to its input's scale);
  :class:`DepthTrend` — does Φ fall with depth (C4, Fig. 1)?
- :func:`token_optimal_coefficient` — Eq. 10's Φ_k(c) with ξ = c·u + ε − h at every token, its grid minimiser,
  the scale-free (direction-only) version, and Eq. 19's linearised c*, with bootstrap intervals over prompts.

Every function takes ``(model, prompts, layer, ...)`` with a tokenizer (or the one attached to the model), works on
any decoder-only HF model the package supports, leaves out padding and (``exclude_bos=True``) BOS, and uses the
one hooks core (:mod:`rmu_analysis.hooks`). Intervals: Student-t over texts/prompts
(:func:`~rmu_analysis.stats.mean_interval`) or a seeded percentile bootstrap over prompts.
"""
from __future__ import annotations

from ._common import bootstrap_interval
from .depth import (
    DepthTrend, TokenNoiseSensitivity, TokenOptimalCoefficient, depth_trend, token_noise_sensitivity,
    token_optimal_coefficient,
)
from .representations import (
    Assumption1, Assumption1Set, Proposition1Trained, UAlignment, assumption1, centered_cosine, normalized_alignment,
    proposition1_trained, u_alignment,
)

__all__ = [
    "Assumption1Set", "Assumption1", "assumption1", "Proposition1Trained", "proposition1_trained",
    "normalized_alignment", "centered_cosine", "UAlignment", "u_alignment", "TokenNoiseSensitivity",
    "token_noise_sensitivity", "DepthTrend", "depth_trend", "TokenOptimalCoefficient", "token_optimal_coefficient",
    "bootstrap_interval",
]
