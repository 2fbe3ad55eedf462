"""RMU and Adaptive RMU the way the reference code does them: deliberately plain, kept as the baseline.

Two full models (the caller's, read-only, as the frozen model, and a deep copy that is trained), a full forward
pass with a hook on block l for every activation, every parameter of the copy requiring grad, one loss and one
backward per step. Both models run in eval mode (the reference calls ``.train()`` on the trained copy, which
only matters for models with dropout; Llama / Mistral / Zephyr have none). ``engine.py`` must produce the same trained tensors (tests) and beat it (benchmarks).
The caller's model is never changed unless ``inplace=True``.
"""
from __future__ import annotations

import copy

import torch
from tqdm import tqdm  # text bars: tqdm.auto warns in notebooks without ipywidgets

from .. import hooks
from ..activations import mean_token_norm
from ..models import frozen_parameters, hidden_size, model_device, resolve_tokenizer
from .common import (
    add_retain_noise, check_finite, batch_texts, log_row, loss_masks, mse, noise_generator, prepare_control_vectors,
    prepare_corpora, reference_padding, resolve_layers, runnable_steps, select_trained, sequence_lengths, step_batch,
    tokenize,
)
from .config import AdaptiveRMUConfig, RMUConfig
from .result import UnlearnResult


def forward_with_cache(model, inputs, layer: int, no_grad: bool) -> torch.Tensor:
    """Full forward pass of ``model`` (as the reference calls it); return block ``layer``'s output."""
    with torch.set_grad_enabled(not no_grad), hooks.record(model, [layer], detach=False) as rec:
        model(**inputs)
    return rec.outputs[layer]


def unlearn_reference(
    model, tokenizer, forget, retain, config: RMUConfig | AdaptiveRMUConfig, *, control_vectors=None,
    inplace: bool = False, progress: bool = True,
) -> UnlearnResult:
    """Plain RMU (Eq. 1) / Adaptive RMU (Eq. 24), same interface and result as ``unlearn``."""
    if tokenizer is None:
        tokenizer = resolve_tokenizer(model)
    if not isinstance(config, (RMUConfig, AdaptiveRMUConfig)):
        raise TypeError(f"unlearn_reference runs RMUConfig or AdaptiveRMUConfig, got {type(config).__name__}")
    data = prepare_corpora(forget, retain)
    n_topics = len(data.topics)
    layer, trained_layers = resolve_layers(model, config)
    trained = select_trained(model, trained_layers, config.param_pattern)
    alphas = config.per_topic("alpha", n_topics, data.topics)
    max_lengths, retain_length = sequence_lengths(model, config, data.topics)  # cut to the positions
    coeffs = list(config.per_topic("steering_coeff" if isinstance(config, RMUConfig) else "beta", n_topics, data.topics))
    steps = runnable_steps(data, config.steps, config.batch_size)
    device = model_device(model)
    dtype = model.get_input_embeddings().weight.dtype
    vectors = prepare_control_vectors(control_vectors, data.topics, hidden_size(model), config.seed, dtype, device)
    adaptive = isinstance(config, AdaptiveRMUConfig)

    frozen_model = model
    updated_model = copy.deepcopy(model).eval()
    for p in updated_model.parameters():  # as the reference: every parameter of the copy requires grad
        p.requires_grad_(True)
    named = dict(updated_model.named_parameters())
    params = [named[t.full_name] for t in trained]
    optimizer = torch.optim.AdamW(
        params, lr=config.lr, betas=config.betas, eps=config.adam_eps, weight_decay=config.weight_decay
    )
    bos = getattr(tokenizer, "bos_token_id", None)
    noise = noise_generator(config.seed) if config.retain_noise > 0 else None
    first = min(trained_layers)
    fixed_coeff: dict[int, float] = {}
    seen_coeffs: list[list[float]] = [[] for _ in range(n_topics)]
    log = []

    # the caller's model is the frozen one: eval mode and no grad while the run lasts (restored after)
    with reference_padding(tokenizer), frozen_parameters(frozen_model):
        bar = tqdm(range(steps), disable=not progress, desc="RMU (reference)")
        for step in bar:
            topic, batch = step_batch(step, n_topics)
            u = vectors[topic]
            unlearn_inputs = tokenize(tokenizer, batch_texts(data.forget[topic], batch, config.batch_size), max_lengths[topic], device)
            retain_inputs = tokenize(tokenizer, batch_texts(data.retain[topic], batch, config.batch_size), retain_length, device)
            forget_mask, _ = loss_masks(unlearn_inputs, config.loss, bos)
            _, retain_mask = loss_masks(retain_inputs, config.loss, bos)

            # forget term: steer block l's output on forget text towards coefficient * u
            updated_forget = forward_with_cache(updated_model, unlearn_inputs, layer, no_grad=False)
            if not adaptive:
                coefficient = torch.tensor(coeffs[topic], dtype=dtype, device=device)
            elif config.coefficient == "first-batch":
                if batch == 0:  # the topic's first batch: the updated model as it is now
                    fixed_coeff[topic] = float(mean_token_norm(updated_forget, forget_mask)) * coeffs[topic]
                coefficient = torch.tensor(fixed_coeff[topic], dtype=dtype, device=device)
            else:  # per-sample: beta * ||h_frozen(x_F)|| for each sequence
                frozen_forget = forward_with_cache(frozen_model, unlearn_inputs, layer, no_grad=True)
                coefficient = (mean_token_norm(frozen_forget, forget_mask, per_sample=True) * coeffs[topic]).to(dtype)
            coefficient = coefficient.to(updated_forget.device)
            seen_coeffs[topic].extend(coefficient.reshape(-1).tolist())
            target = coefficient.reshape(-1, 1, 1) * u.to(updated_forget.device).reshape(1, 1, -1)
            unlearn_loss = mse(updated_forget, target, forget_mask)

            # retain term: keep block l's output on retain text where the frozen model has it; with retain noise,
            # the updated model's input to the first trained block is perturbed (arXiv 2501.19202), the target is not
            if noise is None:
                updated_retain = forward_with_cache(updated_model, retain_inputs, layer, no_grad=False)
            else:
                with hooks.edit_input(updated_model, first, lambda h: add_retain_noise(h, config.retain_noise, noise)):
                    updated_retain = forward_with_cache(updated_model, retain_inputs, layer, no_grad=False)
            frozen_retain = forward_with_cache(frozen_model, retain_inputs, layer, no_grad=True)
            retain_loss = mse(updated_retain, frozen_retain.to(updated_retain.device), retain_mask)

            loss = unlearn_loss + alphas[topic] * retain_loss
            optimizer.zero_grad()
            loss.backward()
            f, r = float(unlearn_loss.detach()), float(retain_loss.detach())
            check_finite(float(loss.detach()), step, data.topics[topic], {"forget loss": f, "retain loss": r})
            optimizer.step()

            if step % config.log_every == 0 or step == steps - 1:
                bar.set_postfix(forget=f"{f:.4g}", retain=f"{r:.4g}")
                log.append(log_row(step, data.topics[topic], f, r, alphas[topic], float(coefficient.float().mean()),
                                   updated_forget, updated_retain, u, forget_mask, retain_mask))

    new = {t.full_name: named[t.full_name].detach().clone() for t in trained}
    result = UnlearnResult(
        config=config, topics=data.topics, trained=new, log=log,
        coefficients={t: sum(c) / len(c) for t, c in zip(data.topics, seen_coeffs) if c},
        control_vectors={t: v.detach().clone() for t, v in zip(data.topics, vectors)},
        steps=steps, applied=inplace, model=model, tokenizer=tokenizer,
    )
    del updated_model, optimizer
    if inplace:
        result.apply_to(model)
    return result
