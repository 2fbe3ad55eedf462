"""Alignment of block outputs with the steering direction u (arXiv 2408.06223, Fig. 2e–h) and their norms (Fig. 4).

A raw cos(h, u) means little on its own: a uniform u has all-positive entries, so two independent uniform
directions already have cosine ≈ 0.75, while a Gaussian direction has cosine ≈ 0 ± 1/sqrt(d) with anything
fixed. :func:`alignment` therefore reports every statistic against three directions: ``"u"`` (the one given),
``"uniform_null"`` (an independent uniform draw u′) and ``"gaussian_null"`` (a Gaussian direction g).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from .activations import capture_batches, masked_mean
from .models import check_layers, hidden_size
from .steering import check_vector, random_direction

__all__ = ["Alignment", "alignment", "cosine", "DIRECTIONS"]

DIRECTIONS: tuple[str, ...] = ("u", "uniform_null", "gaussian_null")


def cosine(h: torch.Tensor, v: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """cos(h, v) along the last axis, in fp32 (``h``: ``[..., d]``, ``v``: ``[d]``)."""
    h = h.float()
    v = v.float().to(h.device)
    return (h @ v) / (h.norm(dim=-1) * v.norm()).clamp(min=eps)


@dataclass(frozen=True, eq=False)
class Alignment:
    """cos(h^(l), ·) and ‖h^(l)‖ per block, per token and per prompt, for u and two null directions.

    Token level (``[n_layers, n_tokens]``, counted tokens of all prompts concatenated, prompt index in
    ``token_prompt``, position within the prompt in ``token_position``): ``token_cos[direction]``, ``token_norm``.
    Prompt level (``[n_layers, n_prompts]``): cosine and norm of the token-mean representation h^(l)(x) (the
    paper's definition), ``prompt_cos[direction]``, ``prompt_norm``. ``directions`` holds the unit vectors.
    """

    layers: tuple[int, ...]
    token_cos: dict[str, np.ndarray]
    token_norm: np.ndarray
    token_prompt: np.ndarray
    token_position: np.ndarray
    prompt_cos: dict[str, np.ndarray]
    prompt_norm: np.ndarray
    directions: dict[str, torch.Tensor]
    exclude_bos: bool

    def _row(self, layer: int) -> int:
        if layer not in self.layers:
            raise KeyError(f"block {layer} was not measured: measured blocks are {list(self.layers)}")
        return self.layers.index(layer)

    def cos(self, layer: int, direction: str = "u", level: str = "prompt") -> np.ndarray:
        """Cosines of block ``layer`` with ``direction`` at ``level`` ``"prompt"`` or ``"token"``."""
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
        table = {"prompt": self.prompt_cos, "token": self.token_cos}
        if level not in table:
            raise ValueError(f'level must be "prompt" or "token", got {level!r}')
        return table[level][direction][self._row(layer)]

    def norm(self, layer: int, level: str = "prompt") -> np.ndarray:
        """‖h^(l)‖ of block ``layer`` at ``level`` ``"prompt"`` (norm of the token mean) or ``"token"``."""
        if level not in ("prompt", "token"):
            raise ValueError(f'level must be "prompt" or "token", got {level!r}')
        return (self.prompt_norm if level == "prompt" else self.token_norm)[self._row(layer)]

    def summary(self, level: str = "prompt") -> pd.DataFrame:
        """Per block: mean and std of the cosine with each direction, and mean/std of the norm."""
        rows = []
        for l in self.layers:
            row: dict[str, Any] = {"layer": l}
            for d in DIRECTIONS:
                c = self.cos(l, d, level)
                row[f"cos_{d}_mean"], row[f"cos_{d}_std"] = float(c.mean()), float(c.std())
            n = self.norm(l, level)
            row["norm_mean"], row["norm_std"] = float(n.mean()), float(n.std())
            rows.append(row)
        return pd.DataFrame(rows)

    def to_frame(self, level: str = "prompt") -> pd.DataFrame:
        """Long table: one row per (layer, prompt or token, direction) with ``cos`` and ``norm``."""
        frames = []
        for i, l in enumerate(self.layers):
            for d in DIRECTIONS:
                if level == "token":
                    frame = pd.DataFrame({"prompt": self.token_prompt, "position": self.token_position,
                                          "cos": self.token_cos[d][i], "norm": self.token_norm[i]})
                elif level == "prompt":
                    n = self.prompt_norm.shape[1]
                    frame = pd.DataFrame({"prompt": np.arange(n), "cos": self.prompt_cos[d][i],
                                          "norm": self.prompt_norm[i]})
                else:
                    raise ValueError(f'level must be "prompt" or "token", got {level!r}')
                frame.insert(0, "direction", d)
                frame.insert(0, "layer", l)
                frames.append(frame)
        return pd.concat(frames, ignore_index=True)


def alignment(
    model: nn.Module,
    prompts: Any,
    u: Any,
    layers: Any = "all",
    *,
    tokenizer: Any = None,
    null_seed: int = 12345,
    exclude_bos: bool = False,
    batch_size: int = 32,
    max_length: int | None = None,
) -> Alignment:
    """Distribution of cos(h^(l), u) and ‖h^(l)‖ for every requested block (Fig. 2e–h; Fig. 4),
    per token and per prompt (token-mean representation), beside null baselines from an independent uniform
    direction u′ and a Gaussian direction g (both drawn from ``null_seed``).

    One forward pass per batch of ``batch_size`` prompts serves all blocks (it stops after the deepest).
    ``prompts`` may be strings, a dict/``BatchEncoding`` or a LongTensor of ids.
    """
    idx = check_layers(model, layers)
    d = hidden_size(model)
    u = check_vector(u, d, name="u")
    if float(u.norm()) == 0.0:
        raise ValueError("u is the zero vector: a direction needs a non-zero norm")
    u = u / u.norm()
    u_null = random_direction(d, "uniform", seed=null_seed)
    g_null = random_direction(d, "gaussian", seed=null_seed + 1)
    if float(cosine(u_null, u)) > 1 - 1e-6:
        raise ValueError(f"the uniform null direction drawn from null_seed={null_seed} equals u (u was drawn from "
                         "the same seed): pass a different null_seed")
    dirs = {"u": u, "uniform_null": u_null, "gaussian_null": g_null}
    tok_cos: dict[str, list[list[np.ndarray]]] = {k: [[] for _ in idx] for k in dirs}
    tok_norm: list[list[np.ndarray]] = [[] for _ in idx]
    pr_cos: dict[str, list[list[np.ndarray]]] = {k: [[] for _ in idx] for k in dirs}
    pr_norm: list[list[np.ndarray]] = [[] for _ in idx]
    tok_prompt, tok_pos = [], []
    for rows, cap in capture_batches(model, prompts, idx, tokenizer=tokenizer, exclude_bos=exclude_bos,
                                     batch_size=batch_size, max_length=max_length):
        mask = cap.token_mask
        tok_prompt.append(mask.nonzero().cpu()[:, 0].numpy() + rows.start)
        tok_pos.append(cap.position_ids[mask.to(cap.position_ids.device)].cpu().numpy())
        for i, l in enumerate(idx):
            ht = cap.tokens(l)  # [n_tok, d]
            hm = masked_mean(cap.hidden[l], mask)  # [B, d]
            tok_norm[i].append(ht.norm(dim=-1).cpu().numpy())
            pr_norm[i].append(hm.norm(dim=-1).cpu().numpy())
            for k, v in dirs.items():
                tok_cos[k][i].append(cosine(ht, v).cpu().numpy())
                pr_cos[k][i].append(cosine(hm, v).cpu().numpy())

    def stack(parts: list[list[np.ndarray]]) -> np.ndarray:
        return np.stack([np.concatenate(p) for p in parts]).astype(np.float64)

    return Alignment(
        layers=tuple(idx),
        token_cos={k: stack(v) for k, v in tok_cos.items()},
        token_norm=stack(tok_norm),
        token_prompt=np.concatenate(tok_prompt),
        token_position=np.concatenate(tok_pos),
        prompt_cos={k: stack(v) for k, v in pr_cos.items()},
        prompt_norm=stack(pr_norm),
        directions=dirs,
        exclude_bos=exclude_bos,
    )


