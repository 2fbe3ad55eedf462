"""Eq. 20–22: the gradients a GCG attacker sees (input gradients of log p(answer)). (:mod:`rmu_analysis.theory`)"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from .._batching import position_ids_from_mask
from ..evaluation import (
    encode_choices, mcq_continuations, mcq_prompt, question_records, subject_list, tokenizer_adds_bos,
)
from ..models import frozen_parameters, resolve_tokenizer


# ------------------------------------------------------------------------------------------------------------
# Eq. 20–22: gradients a GCG attacker sees
# ------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class InputGradients:
    """Per question: the attacker's objective log p(correct letter | prompt) (``logprob``), and the norm of its
    gradient with respect to the one-hot input tokens ``[T, vocab]`` (``grad_norm``, Frobenius) and of that
    gradient with each position's mean over the vocabulary removed (``grad_norm_centered``: the part that
    changes GCG's ranking of token swaps). ``n_tokens``: prompt length."""

    logprob: np.ndarray
    grad_norm: np.ndarray
    grad_norm_centered: np.ndarray
    n_tokens: np.ndarray

    def __len__(self) -> int:
        return len(self.logprob)

    def summary(self) -> dict[str, float]:
        return {"n": len(self), "grad_norm_median": float(np.median(self.grad_norm)),
                "grad_norm_mean": float(self.grad_norm.mean()),
                "grad_norm_centered_median": float(np.median(self.grad_norm_centered)),
                "logprob_mean": float(self.logprob.mean()), "prob_mean": float(np.exp(self.logprob).mean())}

    def ratio(self, other: "InputGradients", *, centered: bool = False) -> float:
        """Median gradient norm of this model divided by that of ``other`` (e.g. unlearned / base)."""
        a = self.grad_norm_centered if centered else self.grad_norm
        b = other.grad_norm_centered if centered else other.grad_norm
        return float(np.median(a) / np.median(b))

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame({"question": np.arange(len(self)), "logprob": self.logprob, "grad_norm": self.grad_norm,
                             "grad_norm_centered": self.grad_norm_centered, "n_tokens": self.n_tokens})


def input_gradient_norms(
    model: nn.Module,
    tokenizer: Any,
    records: Any,
    subject: Any = None,
    *,
    scoring: str = "letter",
    add_bos: bool | None = None,
) -> InputGradients:
    """The GCG argument (Eq. 20–22): for each multiple-choice question (the zero-shot prompt of
    :func:`~rmu_analysis.evaluation.evaluate_mcq`, same tokenisation), the gradient of log p(correct answer)
    — the letter (``scoring="letter"``) or the choice's text (``"cloze"``, summed over its tokens) — with
    respect to the one-hot input tokens, = ∂/∂(input embeddings) @ W_Eᵀ. The paper predicts ≈ 0 for an
    unlearned model (its layer-l state no longer depends on the input). One question at a time, in eval mode;
    the model's parameters get no gradients (both restored afterwards)."""
    recs = question_records(records)
    subjects = subject_list(subject, len(recs))
    tok = resolve_tokenizer(model, tokenizer)
    if add_bos is None:
        add_bos = tokenizer_adds_bos(tok)
    prefix = [tok.bos_token_id] if add_bos else []
    contexts = [mcq_prompt(r, s, scoring=scoring) for r, s in zip(recs, subjects)]
    pairs = encode_choices(tok, contexts, [mcq_continuations(r, scoring=scoring) for r in recs], prefix)
    emb = model.get_input_embeddings().weight
    device = emb.device
    out = {k: [] for k in ("logprob", "norm", "centered", "n")}
    with frozen_parameters(model):  # gradients flow to the input embeddings only
        for rec, (ctx, conts) in zip(recs, pairs):
            target = conts[rec["answer"]]
            seq = torch.tensor(ctx + target[:-1], device=device)
            x = emb[seq].detach().clone().requires_grad_(True)
            mask = torch.ones(1, len(seq), dtype=torch.long, device=device)
            logits = model(inputs_embeds=x.unsqueeze(0), attention_mask=mask,
                           position_ids=position_ids_from_mask(mask), use_cache=False).logits[0].float()
            k = len(target)
            logp = torch.log_softmax(logits[-k:], -1).gather(-1, torch.tensor(target, device=device)[:, None]).sum()
            (grad,) = torch.autograd.grad(logp, x)
            onehot = grad.float() @ emb.detach().float().T  # [T, vocab]
            out["logprob"].append(float(logp.detach()))
            out["norm"].append(float(onehot.norm()))
            out["centered"].append(float((onehot - onehot.mean(-1, keepdim=True)).norm()))
            out["n"].append(len(ctx))
    return InputGradients(logprob=np.array(out["logprob"]), grad_norm=np.array(out["norm"]),
                          grad_norm_centered=np.array(out["centered"]), n_tokens=np.array(out["n"]))
