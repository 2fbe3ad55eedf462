"""Output-space unlearning baselines on the same data interface, for comparison tables.

- Gradient ascent (GA): minimise −NLL(forget).
- Gradient difference (GradDiff): −NLL(forget) + α · NLL(retain).
- NPO (Zhang et al. 2024) with a retain term: −(2/β) E log σ(−β log(π_θ(y|x) / π_ref(y|x))) + α · NLL(retain),
  log π(y|x) the summed log-probability of a forget sequence's real tokens; π_ref is the model as given.

Like the engine, the model is not written during training: the trained tensors are fp32 copies swapped in
with ``functional_call``, so the model itself is π_ref. Topics alternate and batches are built as for RMU.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from tqdm import tqdm  # text bars: tqdm.auto warns in notebooks without ipywidgets

from ..models import frozen_parameters, model_device
from .common import (
    batch_texts, check_finite, mlp_tensors, prepare_corpora, reference_padding, resolve_layers, runnable_steps,
    select_trained, sequence_lengths, step_batch, tokenize,
)
from .config import GAConfig, GradDiffConfig, NPOConfig
from .engine import finish_result, master_copies
from .result import UnlearnResult


def sequence_logprob(logits: torch.Tensor, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probability of each sequence's real next tokens [B], number of those tokens [B])."""
    ids, mask = inputs["input_ids"][:, 1:], inputs["attention_mask"][:, 1:].to(logits.dtype)
    logp = -F.cross_entropy(logits[:, :-1].float().transpose(1, 2), ids, reduction="none")  # [B, T-1]
    return (logp * mask).sum(dim=1), mask.sum(dim=1)


def mean_nll(logits: torch.Tensor, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token negative log-likelihood over the real tokens of a batch."""
    logp, n = sequence_logprob(logits, inputs)
    return -logp.sum() / n.sum().clamp_min(1)


def unlearn_baseline(
    model: nn.Module, tokenizer, forget, retain, config: GAConfig | GradDiffConfig | NPOConfig, *,
    inplace: bool = False, progress: bool = True,
) -> UnlearnResult:
    """Run GA, GradDiff or NPO; same result type and model-state rules as ``unlearn``."""
    if not isinstance(config, (GAConfig, GradDiffConfig, NPOConfig)):
        raise TypeError(f"unlearn_baseline runs GAConfig, GradDiffConfig or NPOConfig, got {type(config).__name__}")
    data = prepare_corpora(forget, retain)
    n_topics = len(data.topics)
    _, trained_layers = resolve_layers(model, config)
    trained = select_trained(model, trained_layers, config.param_pattern) if config.params == "selected" else mlp_tensors(model)
    max_lengths, retain_length = sequence_lengths(model, config, data.topics)  # cut to the positions
    alphas = config.per_topic("alpha", n_topics, data.topics) if hasattr(config, "alpha") else (0.0,) * n_topics
    steps = runnable_steps(data, config.steps, config.batch_size)
    device = model_device(model)

    named = dict(model.named_parameters())
    model_params = [named[t.full_name] for t in trained]
    masters = master_copies(model, trained)
    optimizer = torch.optim.AdamW(
        masters, lr=config.lr, betas=config.betas, eps=config.adam_eps, weight_decay=config.weight_decay
    )

    def forward(inputs):  # the model with the trained tensors swapped in
        overrides = {t.full_name: m if m.dtype == p.dtype else m.to(p.dtype)
                     for t, m, p in zip(trained, masters, model_params)}
        return functional_call(model, overrides, args=(), kwargs={**inputs, "use_cache": False}).logits

    log: list[dict[str, Any]] = []
    with reference_padding(tokenizer), frozen_parameters(model):
        bar = tqdm(range(steps), disable=not progress, desc=config.method)
        for step in bar:
            topic, batch = step_batch(step, n_topics)
            forget_inputs = tokenize(tokenizer, batch_texts(data.forget[topic], batch, config.batch_size), max_lengths[topic], device)

            logits = forward(forget_inputs)
            if isinstance(config, NPOConfig):
                logp, _ = sequence_logprob(logits, forget_inputs)
                with torch.no_grad():
                    ref_logp, _ = sequence_logprob(model(**forget_inputs, use_cache=False).logits, forget_inputs)
                forget_loss = -(2.0 / config.beta) * F.logsigmoid(-config.beta * (logp - ref_logp)).mean()
            else:
                forget_loss = -mean_nll(logits, forget_inputs)
            forget_nll = float(mean_nll(logits.detach(), forget_inputs))
            forget_loss.backward()
            del logits

            retain_loss = torch.zeros(())
            if not isinstance(config, GAConfig):
                retain_inputs = tokenize(tokenizer, batch_texts(data.retain[topic], batch, config.batch_size), retain_length, device)
                retain_loss = mean_nll(forward(retain_inputs), retain_inputs)
                (alphas[topic] * retain_loss).backward()

            f, r = float(forget_loss.detach()), float(retain_loss.detach())
            check_finite(f + alphas[topic] * r, step, data.topics[topic], {"forget loss": f, "retain loss": r})
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if step % config.log_every == 0 or step == steps - 1:
                bar.set_postfix(forget=f"{f:.4g}", retain=f"{r:.4g}")
                log.append({"step": step, "topic": data.topics[topic], "forget_loss": f, "retain_loss": r,
                            "loss": f + alphas[topic] * r, "forget_nll": forget_nll})

    return finish_result(config, data.topics, trained, masters, model_params, log, steps, inplace, model, tokenizer)
