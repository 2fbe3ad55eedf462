"""Linear probes: is the answer still linearly decodable from an unlearned model's hidden states?

Probing hidden states is one of the attacks reported against RMU models (Łucki et al. 2024, arXiv 2409.18025). Per
block l, a multinomial logistic regression reads the answer from block l's output at the last token of the prompt
(the lettered prompt ending in ``"Answer:"``, or the cloze prompt ``"{question}\\nAnswer:"``). It is trained on the
**base** model's states for dev questions and applied to the unlearned model's states for test questions (the
same read-out: did unlearning erase it or only move it?); a probe refitted on the unlearned model's dev states
asks whether the answer is decodable at all.

Labels (``target``): ``"index"`` — the answer's position 0..3 (meaningful for the lettered prompt, which lists the
choices; chance 25%); ``"value"`` — the answer's text, one class per distinct answer in the dev questions,
predicted on a test question as the best-scoring of those of its four choices that are classes. A test question
whose answer was never a dev answer cannot be answered by such a probe: it is left out (``n_unscorable``), and
chance is the mean of 1 / (choices that are classes) over the questions kept (``chance``, a row of the table).
``"auto"``: index for letter prompts, value for cloze prompts.

The regression (L2-penalised, standardised features, full-batch L-BFGS) is plain torch, fp64; no scikit-learn.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ..activations import capture
from ..evaluation import mcq_prompt, subject_list
from ..models import check_layers, resolve_tokenizer
from .common import (
    AttackRow, accuracy_ci, check_choice, check_positive_int, check_records, interval_row, record_clusters, rows_frame,
)

__all__ = ["ProbeConfig", "ProbeResult", "LinearProbe", "fit_probe", "last_token_states", "probe_attack"]


@dataclass(frozen=True)
class ProbeConfig:
    """Probe options. ``layers``: blocks to probe (``"all"``, an int or a list). ``l2``: penalty on the weights
    (on standardised features, per dev question). ``shuffle_labels``: train on permuted dev labels (the control:
    accuracy should fall to chance)."""

    layers: Any = "all"
    prompt: str = "letter"
    target: str = "auto"
    l2: float = 1e-2
    max_iter: int = 200
    batch_size: int = 32
    shuffle_labels: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        check_choice(self.prompt, "prompt", ("letter", "cloze"))
        check_choice(self.target, "target", ("auto", "index", "value"))
        if not (isinstance(self.l2, (int, float)) and self.l2 >= 0):
            raise ValueError(f"l2 must be a number ≥ 0, got {self.l2!r}")
        check_positive_int(self.max_iter, "max_iter")
        check_positive_int(self.batch_size, "batch_size")

    @property
    def resolved_target(self) -> str:
        if self.target != "auto":
            return self.target
        return "index" if self.prompt == "letter" else "value"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True, eq=False)
class LinearProbe:
    """A fitted multinomial logistic regression: ``logits = ((x − mean) / std) @ weight + bias``."""

    weight: torch.Tensor  # [d, K] fp64
    bias: torch.Tensor  # [K]
    mean: torch.Tensor  # [d]
    std: torch.Tensor  # [d]

    def logits(self, x: Any) -> torch.Tensor:
        x = torch.as_tensor(np.asarray(x), dtype=torch.float64)
        return ((x - self.mean) / self.std) @ self.weight + self.bias

    def predict(self, x: Any, allowed: Any = None) -> np.ndarray:
        """Class per row; ``allowed`` ``[n, K]`` booleans restrict each row's choice (rows with none → -1)."""
        z = self.logits(x)
        if allowed is not None:
            allowed = torch.as_tensor(np.asarray(allowed), dtype=torch.bool)
            z = z.masked_fill(~allowed, float("-inf"))
            pred = z.argmax(1).numpy()
            pred[~allowed.any(1).numpy()] = -1
            return pred
        return z.argmax(1).numpy()


def fit_probe(x: Any, y: Any, n_classes: int | None = None, *, l2: float = 1e-2, max_iter: int = 200) -> LinearProbe:
    """Fit an L2-penalised multinomial logistic regression of labels ``y`` ``[n]`` on features ``x`` ``[n, d]``
    (standardised with the training mean and std; full-batch L-BFGS; deterministic)."""
    X = torch.as_tensor(np.asarray(x), dtype=torch.float64)
    Y = torch.as_tensor(np.asarray(y), dtype=torch.long)
    if X.dim() != 2 or Y.dim() != 1 or X.shape[0] != Y.shape[0]:
        raise ValueError(f"x must be [n, d] and y [n] with the same n, got {tuple(X.shape)} and {tuple(Y.shape)}")
    if X.shape[0] < 2:
        raise ValueError("a probe needs at least 2 training examples")
    K = int(n_classes) if n_classes is not None else int(Y.max()) + 1
    if int(Y.min()) < 0 or int(Y.max()) >= K:
        raise ValueError(f"labels must be in 0..{K - 1}, got {int(Y.min())}..{int(Y.max())}")
    mean = X.mean(0)
    std = X.std(0).clamp_min(1e-8)
    Z = (X - mean) / std
    W = torch.zeros(X.shape[1], K, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(K, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(Z @ W + b, Y) + l2 * (W * W).sum() / 2
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return LinearProbe(weight=W.detach(), bias=b.detach(), mean=mean, std=std)


def last_token_states(model: nn.Module, tokenizer: Any, prompts: Sequence[str], layers: Any = "all", *,
                      batch_size: int = 32) -> dict[int, np.ndarray]:
    """Block outputs at each prompt's last token: ``{layer: [n, d]}`` fp32 (one capture per chunk of prompts)."""
    idx = check_layers(model, layers)
    out: dict[int, list[np.ndarray]] = {l: [] for l in idx}
    for s in range(0, len(prompts), batch_size):
        cap = capture(model, list(prompts[s: s + batch_size]), idx, tokenizer=tokenizer, padding_side="left")
        for l in idx:
            out[l].append(cap[l][:, -1].float().cpu().numpy())
    return {l: np.concatenate(v) for l, v in out.items()}


def _prompts(records: list[dict], subject: Any, prompt: str) -> list[str]:
    return [mcq_prompt(r, s, scoring=prompt) for r, s in zip(records, subject_list(subject, len(records)))]


@dataclass(frozen=True)
class ProbeResult:
    """Per block: probe accuracy on the test questions in three settings — ``"base probe → base"`` (the
    ceiling), ``"base probe → unlearned"`` (the same read-out on the unlearned model) and ``"refit → unlearned"``
    (a probe fitted on the unlearned model's dev states). ``correct[(setting, layer)]``: per-question booleans
    over the scored test questions (``n_unscorable`` left out, see the module docstring); ``chance``: the accuracy
    of guessing uniformly among the choices the probe can name."""

    config: ProbeConfig
    method: str
    layers: tuple[int, ...]
    correct: dict[tuple[str, int], np.ndarray]
    train_accuracy: dict[int, float]
    clusters: tuple | None
    n_classes: int
    n_unscorable: int
    chance: float
    seconds: float

    def rows(self) -> tuple[AttackRow, ...]:
        control = " (shuffled labels)" if self.config.shuffle_labels else ""
        n = len(next(iter(self.correct.values())))
        rows = [AttackRow(self.method, "probe", "chance", "all blocks", self.chance, self.chance, self.chance, n, 0,
                          0.0)]
        rows += [interval_row(self.method, "probe", f"{setting}{control}", f"block {layer}",
                              accuracy_ci(c, self.clusters), seconds=self.seconds)
                 for (setting, layer), c in self.correct.items()]
        return tuple(rows)

    def to_frame(self):
        frame = rows_frame(self.rows())
        frame.insert(4, "layer", [-1] + [layer for (_, layer) in self.correct])
        return frame


def probe_attack(base: nn.Module, unlearned: nn.Module | None, tokenizer: Any, dev_records: Sequence[dict],
                 test_records: Sequence[dict], config: ProbeConfig | None = None, *, subject: Any = None,
                 test_subject: Any = None, method: str = "model", cluster_key: Any = None) -> ProbeResult:
    """Fit a probe per block on ``base``'s states for ``dev_records`` and score it on ``test_records`` with the
    base model's and ``unlearned``'s states (``unlearned=None``: base only). See the module docstring."""
    config = ProbeConfig() if config is None else config
    if not isinstance(config, ProbeConfig):
        raise TypeError(f"config must be a ProbeConfig, got {type(config).__name__}")
    t0 = time.perf_counter()
    dev = check_records(dev_records, "dev_records")
    test = check_records(test_records, "test_records")
    tok = resolve_tokenizer(base, tokenizer)
    layers = check_layers(base, config.layers)
    dev_prompts = _prompts(dev, subject, config.prompt)
    test_prompts = _prompts(test, subject if test_subject is None else test_subject, config.prompt)
    keep = np.ones(len(test), dtype=bool)
    if config.resolved_target == "index":
        y_dev = np.array([r["answer"] for r in dev])
        y_test = np.array([r["answer"] for r in test])
        allowed = None
        K = 4
        chance = 0.25
    else:
        classes = sorted({r["choices"][r["answer"]] for r in dev})
        index = {c: i for i, c in enumerate(classes)}
        K = len(classes)
        if K < 2:
            raise ValueError("the dev questions have fewer than 2 distinct answers: a value probe needs at least 2")
        y_dev = np.array([index[r["choices"][r["answer"]]] for r in dev])
        keep = np.array([r["choices"][r["answer"]] in index for r in test])
        if not keep.any():
            raise ValueError("no test question's answer is among the dev questions' answers: a value probe cannot "
                             "name any of them; use more dev questions, or target='index' with letter prompts")
        test = [r for r, k in zip(test, keep) if k]
        test_prompts = [p for p, k in zip(test_prompts, keep) if k]
        y_test = np.array([index[r["choices"][r["answer"]]] for r in test])
        allowed = np.zeros((len(test), K), dtype=bool)
        for i, r in enumerate(test):
            for c in r["choices"]:
                if c in index:
                    allowed[i, index[c]] = True
        chance = float((1.0 / allowed.sum(1)).mean())
    if config.shuffle_labels:
        y_dev = np.random.default_rng(config.seed).permutation(y_dev)
    models = {"base": base} if unlearned is None else {"base": base, "unlearned": unlearned}
    feats = {name: (last_token_states(m, tok, dev_prompts, layers, batch_size=config.batch_size),
                    last_token_states(m, tok, test_prompts, layers, batch_size=config.batch_size))
             for name, m in models.items()}
    correct: dict[tuple[str, int], np.ndarray] = {}
    train_acc: dict[int, float] = {}
    for l in layers:
        probe = fit_probe(feats["base"][0][l], y_dev, K, l2=config.l2, max_iter=config.max_iter)
        train_acc[l] = float((probe.predict(feats["base"][0][l]) == y_dev).mean())
        correct[("base probe → base", l)] = probe.predict(feats["base"][1][l], allowed) == y_test
        if unlearned is not None:
            correct[("base probe → unlearned", l)] = probe.predict(feats["unlearned"][1][l], allowed) == y_test
            refit = fit_probe(feats["unlearned"][0][l], y_dev, K, l2=config.l2, max_iter=config.max_iter)
            correct[("refit → unlearned", l)] = refit.predict(feats["unlearned"][1][l], allowed) == y_test
    return ProbeResult(config=config, method=method, layers=tuple(layers), correct=correct, train_accuracy=train_acc,
                       clusters=record_clusters(test, cluster_key), n_classes=K, n_unscorable=int((~keep).sum()),
                       chance=chance, seconds=time.perf_counter() - t0)
