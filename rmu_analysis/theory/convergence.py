"""Fig. 4: does the forget loss converge, and did the norm start below or above c? (training logs) (:mod:`rmu_analysis.theory`)"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd



# ------------------------------------------------------------------------------------------------------------
# Fig. 4: convergence of the forget loss
# ------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class Convergence:
    """Fig. 4 per topic, from an unlearning log: the block-l forget norm at the first logged step
    (``initial_norm``) and at the end (``final_norm``, mean of the last ``tail`` logged steps), the coefficient
    c, and the forget loss at the start and at the end.

    Two readings of "the forget loss converges": ``rel_distance`` = sqrt(final loss · d) / c, the RMS distance
    of the forget representations from their target c·u relative to its size (the forget loss is a mean over
    the d hidden dimensions), and ``loss_ratio`` = final / initial loss. ``converged`` applies ``criterion``
    (``"distance"`` or ``"loss_ratio"``) against ``threshold``. ``starts_below`` = initial norm < c (Fig. 4:
    the paper expects converged == starts_below).
    """

    topics: tuple[str, ...]
    initial_norm: np.ndarray
    final_norm: np.ndarray
    coefficient: np.ndarray
    initial_loss: np.ndarray
    final_loss: np.ndarray
    hidden_size: int | None
    criterion: str
    threshold: float

    @property
    def loss_ratio(self) -> np.ndarray:
        return self.final_loss / self.initial_loss

    @property
    def rel_distance(self) -> np.ndarray:
        if self.hidden_size is None:
            return np.full(len(self.topics), np.nan)
        return np.sqrt(self.final_loss * self.hidden_size) / self.coefficient

    @property
    def converged(self) -> np.ndarray:
        value = self.rel_distance if self.criterion == "distance" else self.loss_ratio
        return value < self.threshold

    @property
    def starts_below(self) -> np.ndarray:
        return self.initial_norm < self.coefficient

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame({"topic": list(self.topics), "coefficient": self.coefficient,
                             "initial_norm": self.initial_norm, "final_norm": self.final_norm,
                             "starts_below": self.starts_below, "initial_loss": self.initial_loss,
                             "final_loss": self.final_loss, "loss_ratio": self.loss_ratio,
                             "rel_distance": self.rel_distance, "converged": self.converged})


_THRESHOLDS = {"distance": 0.5, "loss_ratio": 0.1}


def log_hidden_size(log: Any, hidden_size: int | None = None) -> int | None:
    """``hidden_size``, else the size of an ``UnlearnResult``'s control vectors (None when neither is there)."""
    if hidden_size is None and getattr(log, "control_vectors", None):
        hidden_size = int(next(iter(log.control_vectors.values())).numel())
    return hidden_size


def log_frame(log: Any, need: set[str], tail: int) -> pd.DataFrame:
    """An RMU / Adaptive RMU training log (an ``UnlearnResult``, its ``.log`` or ``to_frame()``) as a frame,
    checked to have the columns ``need``; ``tail`` (steps averaged at the end) checked ≥ 1."""
    frame = log.to_frame() if hasattr(log, "to_frame") else pd.DataFrame(log)
    if frame.empty or not need <= set(frame.columns):
        raise ValueError(f"the log must have rows with columns {sorted(need)} (an RMU / Adaptive RMU log)")
    if tail < 1:
        raise ValueError(f"tail must be ≥ 1, got {tail}")
    return frame


def forget_convergence(log: Any, *, hidden_size: int | None = None, tail: int = 5, criterion: str = "distance",
                       threshold: float | None = None) -> Convergence:
    """Fig. 4 from an unlearning run (an ``UnlearnResult``, its ``.log`` or ``to_frame()``; ``log_every=1``
    gives every step): did the forget loss converge, and did the forget norm start below the coefficient?

    ``criterion="distance"`` (default threshold 0.5): the forget representations end within half of ‖c·u‖ of
    c·u (RMS); needs the hidden size d, read from an ``UnlearnResult``'s control vectors or given as
    ``hidden_size``. ``criterion="loss_ratio"`` (default threshold 0.1): the loss fell below a tenth of its
    initial value. Both numbers are always in ``to_frame()``.
    """
    if criterion not in _THRESHOLDS:
        raise ValueError(f'criterion must be "distance" or "loss_ratio", got {criterion!r}')
    hidden_size = log_hidden_size(log, hidden_size)
    if criterion == "distance" and hidden_size is None:
        raise ValueError('criterion="distance" needs the hidden size: pass hidden_size=d or an UnlearnResult')
    frame = log_frame(log, {"step", "topic", "forget_loss", "forget_norm", "coefficient"}, tail)
    rows = []
    for topic, part in frame.sort_values("step").groupby("topic", sort=False):
        rows.append((str(topic), part["forget_norm"].iloc[0], part["forget_norm"].iloc[-tail:].mean(),
                     part["coefficient"].iloc[0], part["forget_loss"].iloc[0], part["forget_loss"].iloc[-tail:].mean()))
    cols = list(zip(*rows))
    return Convergence(topics=tuple(cols[0]), initial_norm=np.array(cols[1], float),
                       final_norm=np.array(cols[2], float), coefficient=np.array(cols[3], float),
                       initial_loss=np.array(cols[4], float), final_loss=np.array(cols[5], float),
                       hidden_size=hidden_size, criterion=criterion,
                       threshold=_THRESHOLDS[criterion] if threshold is None else float(threshold))
