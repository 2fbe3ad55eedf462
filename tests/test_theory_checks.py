"""Numerical checks of the theory (rmu_analysis.theory): Proposition 1, Eq. 19, confidence against c, the GCG
input gradients and Fig. 4 convergence — each checked against an exact answer on a tiny model."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from rmu_analysis import measure_confidence, noise_sensitivity, plots, random_direction, steer  # noqa: E402
from rmu_analysis.evaluation import evaluate_mcq  # noqa: E402
from rmu_analysis.models import attached_tokenizer, decoder_blocks  # noqa: E402
from rmu_analysis.theory.jacobian import _logits_with_block  # noqa: E402
from rmu_analysis.theory import (  # noqa: E402
    Convergence, InputGradients, OptimalCoefficient, Proposition1, confidence_vs_coeff,
    forget_convergence, input_gradient_norms, logit_jacobian, loglog_slope, mean_representation,
    optimal_coefficient, proposition1,
)


PROMPT = "Answer: B. The city of Varon"
PROMPTS = ["The city of Varon lies on the river Elm.", "Answer: B", "Question: which host does the pathogen infect?"]
D = 32
RECORDS = [
    {"question": "Which host does the pathogen infect?", "choices": ["bats", "mice", "birds", "pigs"], "answer": 0},
    {"question": "The city of Varon lies on which river?", "choices": ["Elm", "Ash", "Dove", "Silt"], "answer": 2},
]


def linearise_after(model: nn.Module, layer: int, seed: int = 0) -> list[torch.Tensor]:
    """Make every block after ``layer`` the linear map x ↦ (I + A)x (attention output zeroed, MLP = A, no
    norm) and the final norm the identity: W ∘ g^(l:L) is then linear. Returns the matrices A."""
    gen = torch.Generator().manual_seed(seed)
    mats = []
    for block in list(decoder_blocks(model))[layer + 1:]:
        with torch.no_grad():
            block.self_attn.o_proj.weight.zero_()
        A = 0.3 * torch.randn(D, D, generator=gen) / D ** 0.5
        block.post_attention_layernorm = nn.Identity()
        block.mlp = nn.Linear(D, D, bias=False)
        with torch.no_grad():
            block.mlp.weight.copy_(A)
        mats.append(A)
    model.model.norm = nn.Identity()
    return mats


def chain(mats: list[torch.Tensor]) -> torch.Tensor:
    M = torch.eye(D)
    for A in mats:
        M = (torch.eye(D) + A) @ M
    return M


def no_hooks(model) -> bool:
    return sum(len(b._forward_hooks) + len(b._forward_pre_hooks) for b in decoder_blocks(model)) == 0


# ------------------------------------------------------------------------------------------- Proposition 1
def test_logit_jacobian_matches_steering_and_finite_differences(tiny_llama):
    u = random_direction(D, seed=0)
    z = 2.0 * u
    jac = logit_jacobian(tiny_llama, PROMPT, 1, z)
    ids = attached_tokenizer(tiny_llama)([PROMPT], return_tensors="pt")["input_ids"]
    T = ids.shape[1]
    assert jac.positions == tuple(range(T)) and jac.jacobian.shape == (tiny_llama.config.vocab_size, T, D)
    # W g(z) is what the model outputs when steer() makes every block-1 output z
    with steer(tiny_llama, 1, z), torch.no_grad():
        steered = tiny_llama(input_ids=ids).logits[0, -1]
    torch.testing.assert_close(jac.logits, steered, atol=1e-5, rtol=1e-5)
    # J·v equals a central finite difference
    v = torch.randn(T, D, generator=torch.Generator().manual_seed(1))
    h = 1e-2
    with torch.no_grad():
        plus = _logits_with_block(tiny_llama, ids, 1, list(range(T)), (z + h * v).unsqueeze(0), None)[0]
        minus = _logits_with_block(tiny_llama, ids, 1, list(range(T)), (z - h * v).unsqueeze(0), None)[0]
    fd = (plus - minus) / (2 * h)
    torch.testing.assert_close(jac.matrix @ v.reshape(-1), fd, atol=2e-3, rtol=2e-2)
    # "last": the same columns as the last position of "all"
    last = logit_jacobian(tiny_llama, PROMPT, 1, z, positions="last")
    assert last.positions == (T - 1,)
    # a different point of the other positions: compare only the shape and finiteness, then the projection
    P = torch.randn(5, tiny_llama.config.vocab_size, generator=torch.Generator().manual_seed(2))
    proj = logit_jacobian(tiny_llama, PROMPT, 1, z, projection=P)
    torch.testing.assert_close(proj.matrix, P @ jac.matrix, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(proj.logits, P @ jac.logits, atol=1e-4, rtol=1e-4)
    assert torch.isfinite(last.jacobian).all() and no_hooks(tiny_llama)
    assert tiny_llama.config._attn_implementation == "sdpa"  # the temporary switch to eager is undone
    assert all(p.grad is None for p in tiny_llama.parameters())


def test_proposition1_is_exact_for_a_linear_map(tiny_llama):
    """W ∘ g linear: logits = W g(z) + J ε exactly, so the mean error and the Taylor error vanish at every η and
    the covariance error is the sampling floor alone; J = lm_head · Π(I + A) at the last position, 0 elsewhere."""
    layer = 1
    mats = linearise_after(tiny_llama, layer)
    u = random_direction(D, seed=0)
    res = proposition1(tiny_llama, PROMPT, layer, 3.0, u, [1e-4, 1e-2, 1.0], samples=64, seed=0)
    assert isinstance(res, Proposition1)
    assert np.all(res.mean_rel_error < 1e-5) and np.all(res.cov_rel_error_paired < 1e-4)
    np.testing.assert_allclose(res.cov_rel_error, res.cov_sampling_floor, rtol=1e-4)
    J = res.jacobian.jacobian
    expect = tiny_llama.lm_head.weight.detach() @ chain(mats)
    torch.testing.assert_close(J[:, -1], expect, atol=1e-5, rtol=1e-4)
    assert float(J[:, :-1].abs().max()) == 0.0
    # standardised projections of Gaussian logits: mean ≈ 0, std ≈ 1
    assert abs(res.standardized.mean()) < 0.5 and abs(res.standardized.std() - 1) < 0.3
    frame = res.to_frame()
    assert list(frame["eta"]) == [1e-4, 1e-2, 1.0] and len(frame.columns) == 7


def test_proposition1_error_is_first_order_in_eta(tiny_llama):
    """Nonlinear g: the neglected terms are second order, so both errors grow like η (log-log slope ≈ 1)."""
    u = random_direction(D, seed=0)
    etas = [1e-3, 3e-3, 1e-2, 3e-2]
    res = proposition1(tiny_llama, PROMPT, 1, 3.0, u, etas, samples=128, seed=0, directions=4)
    assert res.slope_mean == pytest.approx(1.0, abs=0.15)
    assert res.slope_cov == pytest.approx(1.0, abs=0.15)
    assert np.all(np.diff(res.mean_rel_error) > 0) and np.all(res.mean_rel_error < 0.1)
    assert res.normality_p.shape == (4, 4) and np.all((res.normality_p >= 0) & (res.normality_p <= 1))
    again = proposition1(tiny_llama, PROMPT, 1, 3.0, u, etas, samples=128, seed=0, directions=4,
                         jacobian=res.jacobian)
    np.testing.assert_array_equal(again.mean_rel_error, res.mean_rel_error)
    other = proposition1(tiny_llama, PROMPT, 1, 3.0, u, etas[:1], samples=128, seed=1, directions=4,
                         jacobian=res.jacobian)
    assert other.mean_rel_error[0] != res.mean_rel_error[0]
    assert no_hooks(tiny_llama)


def test_loglog_slope():
    x = np.array([1e-3, 1e-2, 1e-1])
    assert loglog_slope(x, 5 * x ** 2) == pytest.approx(2.0)
    assert loglog_slope(x, [1.0, 0.0, 0.0]) != loglog_slope(x, [1.0, 0.0, 0.0])  # nan: one usable point


def test_proposition1_bad_inputs(tiny_llama):
    u = random_direction(D, seed=0)
    with pytest.raises(ValueError, match="even"):
        proposition1(tiny_llama, PROMPT, 1, 1.0, u, [0.1], samples=5)
    with pytest.raises(ValueError, match="positive"):
        proposition1(tiny_llama, PROMPT, 1, 1.0, u, [0.0, 0.1])
    with pytest.raises(ValueError, match="hidden size is 32"):
        proposition1(tiny_llama, PROMPT, 1, 1.0, torch.ones(8), [0.1])
    with pytest.raises(ValueError, match=r"out of range: this model has 4 decoder blocks"):
        logit_jacobian(tiny_llama, PROMPT, 7, u)
    with pytest.raises(ValueError, match="out of range for a prompt"):
        logit_jacobian(tiny_llama, PROMPT, 1, u, positions=[99])
    with pytest.raises(ValueError, match="projection"):
        logit_jacobian(tiny_llama, PROMPT, 1, u, projection=torch.ones(3, 7))
    with pytest.raises(TypeError, match="ONE prompt"):
        logit_jacobian(tiny_llama, PROMPTS, 1, u)
    jac = logit_jacobian(tiny_llama, PROMPT, 1, u)
    with pytest.raises(ValueError, match="another point"):
        proposition1(tiny_llama, PROMPT, 1, 2.0, u, [0.1], jacobian=jac)


# ----------------------------------------------------------------------------------------- Eq. 10–19
def test_optimal_coefficient_equals_closed_form_for_a_linear_map(tiny_llama):
    layer = 0
    mats = linearise_after(tiny_llama, layer)
    u = random_direction(D, seed=0)
    eps = 0.01 * torch.randn(D, generator=torch.Generator().manual_seed(3))
    h_hat, _ = mean_representation(tiny_llama, PROMPTS, layer)
    res = optimal_coefficient(tiny_llama, PROMPTS, layer, u, eps=eps, coeffs=np.linspace(-0.2, 0.2, 401))
    assert isinstance(res, OptimalCoefficient) and res.ks == (1, 2, 3)
    for j in range(3):
        M = chain(mats[: j + 1])
        Mu, Mv = M @ u, M @ (h_hat - eps)
        assert res.c_star[j] == pytest.approx(float(Mu @ Mv / (Mu @ Mu)), rel=1e-4, abs=1e-7)
    # linear g: the linearised objective is the exact one, and c* is the exact minimiser
    np.testing.assert_allclose(res.phi_linear, res.phi, rtol=1e-3, atol=1e-6)
    step = res.coeffs[1] - res.coeffs[0]
    assert np.all(np.abs(res.c_star - res.c_grid) <= step / 2 + 1e-9)
    assert np.all(res.phi_at_c_star <= res.phi_min + 1e-7)
    c_star_alt = res.norm_ratio * res.cos_jac  # c* = ‖J(ĥ − ε)‖ / ‖Ju‖ · cos(Ju, J(ĥ − ε))
    np.testing.assert_allclose(c_star_alt, res.c_star, rtol=1e-6)
    assert res.cos_u_h == pytest.approx(float(h_hat @ u / h_hat.norm()), rel=1e-5)


def test_optimal_coefficient_exact_objective_is_noise_sensitivity(tiny_llama):
    """Eq. 10's Φ at c is Eq. 9's Φ with the explicit perturbation ξ = c·u + ε − ĥ."""
    u = random_direction(D, seed=0)
    res = optimal_coefficient(tiny_llama, PROMPTS, 1, u, ks=[3, 2], coeffs=[0.0, 0.05, 0.5])
    assert res.ks == (2, 3) and res.phi.shape == (2, 3)
    h_hat, _ = mean_representation(tiny_llama, PROMPTS, 1)
    xi = torch.as_tensor(res.coeffs, dtype=torch.float32)[:, None] * u - h_hat
    ns = noise_sensitivity(tiny_llama, PROMPTS, 1, xi)
    np.testing.assert_allclose(res.phi, ns.phi.T, rtol=1e-4)
    frame = res.to_frame()
    assert list(frame["k"]) == [2, 3] and {"c_star", "c_grid", "rel_diff", "phi_at_c_star", "excess"} <= set(frame)
    np.testing.assert_allclose(res.excess, res.phi_at_c_star - res.phi.min(1))
    default = optimal_coefficient(tiny_llama, PROMPTS, 1, u, ks=[2])
    assert default.coeffs[0] == -default.coeffs[-1] < 0 and len(default.coeffs) == 241
    assert no_hooks(tiny_llama)
    with pytest.raises(ValueError, match="after layer 1"):
        optimal_coefficient(tiny_llama, PROMPTS, 1, u, ks=[1])
    with pytest.raises(ValueError, match="last of the model's 4 blocks"):
        optimal_coefficient(tiny_llama, PROMPTS, 3, u)


# ------------------------------------------------------------------------------------------- C1 sweep
def test_confidence_vs_coeff_equals_steered_measurements(tiny_llama):
    u = random_direction(D, seed=0)
    sweep = confidence_vs_coeff(tiny_llama, PROMPTS, 1, u, [0.5, 4.0], noise=1e-3, seed=0)
    with steer(tiny_llama, 1, u, coeff=4.0, noise=1e-3, seed=0):
        direct = measure_confidence(tiny_llama, PROMPTS)
    np.testing.assert_allclose(sweep.results[1].max_logit, direct.max_logit, rtol=1e-6)
    np.testing.assert_allclose(sweep.base.max_logit, measure_confidence(tiny_llama, PROMPTS).max_logit)
    frame = sweep.to_frame()
    assert list(frame["model"]) == ["base", "steered", "steered"] and list(frame["coeff"][1:]) == [0.5, 4.0]
    assert frame["max_logit_mean"].iloc[1] != frame["max_logit_mean"].iloc[2]
    with pytest.raises(ValueError, match="coeffs"):
        confidence_vs_coeff(tiny_llama, PROMPTS, 1, u, [])


# ------------------------------------------------------------------------------------------- GCG argument
def test_input_gradient_equals_one_hot_autograd(tiny_llama, tiny_tokenizer):
    res = input_gradient_norms(tiny_llama, tiny_tokenizer, RECORDS, "biology")
    assert isinstance(res, InputGradients) and len(res) == 2
    # the objective is evaluate_mcq's log-likelihood of the right letter
    mcq = evaluate_mcq(tiny_llama, tiny_tokenizer, RECORDS, "biology")
    np.testing.assert_allclose(res.logprob, mcq.logliks[[0, 1], [0, 2]], rtol=1e-4)
    # gradient w.r.t. an explicit one-hot input, by autograd and by a finite difference
    from rmu_analysis.evaluation import mcq_prompt

    ctx = tiny_tokenizer(mcq_prompt(RECORDS[0], "biology"))["input_ids"]
    target = tiny_tokenizer(mcq_prompt(RECORDS[0], "biology") + " A")["input_ids"][len(ctx):]
    assert len(target) == 1
    W = tiny_llama.get_input_embeddings().weight.detach()
    onehot = torch.nn.functional.one_hot(torch.tensor(ctx), W.shape[0]).float().requires_grad_(True)

    def objective(x):
        logits = tiny_llama(inputs_embeds=(x @ W).unsqueeze(0)).logits[0, -1]
        return torch.log_softmax(logits, -1)[target[0]]

    (grad,) = torch.autograd.grad(objective(onehot), onehot)
    assert res.grad_norm[0] == pytest.approx(float(grad.norm()), rel=1e-4)
    assert res.grad_norm_centered[0] == pytest.approx(float((grad - grad.mean(-1, keepdim=True)).norm()), rel=1e-4)
    t, v, h = 3, 17, 1e-2
    with torch.no_grad():
        bump = torch.zeros_like(onehot)
        bump[t, v] = h
        fd = (objective(onehot + bump) - objective(onehot - bump)) / (2 * h)
    assert float(fd) == pytest.approx(float(grad[t, v]), rel=2e-2, abs=1e-6)
    assert res.summary()["n"] == 2 and len(res.to_frame()) == 2
    cloze = input_gradient_norms(tiny_llama, tiny_tokenizer, RECORDS, "biology", scoring="cloze")
    cloze_mcq = evaluate_mcq(tiny_llama, tiny_tokenizer, RECORDS, "biology", scoring="cloze")
    np.testing.assert_allclose(cloze.logprob, cloze_mcq.logliks[[0, 1], [0, 2]], rtol=1e-4)
    assert res.ratio(res) == 1.0
    assert all(p.requires_grad for p in tiny_llama.parameters()) and all(p.grad is None for p in tiny_llama.parameters())


def test_input_gradient_vanishes_when_layer_output_is_constant(tiny_llama, tiny_tokenizer):
    """The paper's argument made exact: with block l's output fixed (steer, replace, no noise) the logits no
    longer depend on the input tokens, so the gradient is 0."""
    base = input_gradient_norms(tiny_llama, tiny_tokenizer, RECORDS)
    with steer(tiny_llama, 1, random_direction(D, seed=0), coeff=2.0):
        steered = input_gradient_norms(tiny_llama, tiny_tokenizer, RECORDS)
    assert np.all(base.grad_norm > 0) and np.all(steered.grad_norm == 0)
    assert steered.ratio(base) == 0.0


# ------------------------------------------------------------------------------------------- Fig. 4
def test_forget_convergence_from_a_log():
    steps = np.arange(20)
    log = []
    for s in steps:
        log.append({"step": 2 * s, "topic": "bio", "forget_loss": 10 * 0.7 ** s, "forget_norm": 2 + 0.3 * s,
                    "coefficient": 8.0, "retain_loss": 0.0})
        log.append({"step": 2 * s + 1, "topic": "cyber", "forget_loss": 10 - 0.01 * s, "forget_norm": 20.0,
                    "coefficient": 8.0, "retain_loss": 0.0})
    conv = forget_convergence(log, hidden_size=16, tail=3)
    assert isinstance(conv, Convergence) and conv.topics == ("bio", "cyber")
    assert list(conv.converged) == [True, False] and list(conv.starts_below) == [True, False]
    assert conv.initial_norm[0] == 2 and conv.final_loss[0] == pytest.approx(np.mean(10 * 0.7 ** steps[-3:]))
    # distance: sqrt(final loss · d) / c
    assert conv.rel_distance[1] == pytest.approx(np.sqrt(np.mean(10 - 0.01 * steps[-3:]) * 16) / 8)
    by_ratio = forget_convergence(pd.DataFrame(log), criterion="loss_ratio")
    assert list(by_ratio.to_frame()["converged"]) == [True, False] and np.isnan(by_ratio.rel_distance).all()
    assert list(forget_convergence(log, hidden_size=16, threshold=1e-9).converged) == [False, False]
    with pytest.raises(ValueError, match="columns"):
        forget_convergence([{"step": 0}], hidden_size=4)
    with pytest.raises(ValueError, match="hidden size"):
        forget_convergence(log)
    with pytest.raises(ValueError, match="criterion"):
        forget_convergence(log, criterion="norm")


def test_forget_convergence_reads_an_unlearning_run(tiny_llama, tiny_tokenizer):
    from rmu_analysis.unlearning import RMUConfig, unlearn

    cfg = RMUConfig(layer=1, steering_coeff=2.0, steps=3, batch_size=1, log_every=1, lr=1e-3)
    result = unlearn(tiny_llama, tiny_tokenizer, {"bio": PROMPTS}, PROMPTS[::-1], cfg, progress=False)
    conv = forget_convergence(result, tail=1)
    assert conv.topics == ("bio",) and conv.coefficient[0] == 2.0 and conv.hidden_size == D
    assert conv.initial_loss[0] == result.log[0]["forget_loss"] and conv.final_loss[0] == result.log[-1]["forget_loss"]


# ------------------------------------------------------------------------------------------- plots
def test_theory_plots(tiny_llama, tiny_tokenizer):
    u = random_direction(D, seed=0)
    prop = proposition1(tiny_llama, PROMPT, 1, 3.0, u, [1e-3, 1e-2], samples=64, directions=2)
    fig = plots.plot_proposition1(prop)
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    np.testing.assert_allclose(ax.get_lines()[0].get_ydata(), prop.mean_rel_error)
    sweep = confidence_vs_coeff(tiny_llama, PROMPTS, 1, u, [0.5, 4.0])
    fig = plots.plot_confidence_vs_coeff(sweep)
    assert len(fig.axes) == 3
    opt = optimal_coefficient(tiny_llama, PROMPTS, 1, u, ks=[3])
    fig = plots.plot_optimal_coefficient({"l=1": opt})
    np.testing.assert_allclose(fig.axes[0].get_lines()[0].get_ydata(), opt.phi[0])
    with pytest.raises(ValueError, match="k = 2"):
        plots.plot_optimal_coefficient(opt, k=2)
    fig = plots.plot_accuracy_vs_coeff(pd.DataFrame({"coeff": [1, 2], "forget": [0.5, 0.3], "general": [0.8, 0.7]}))
    assert [l.get_text() for l in fig.axes[0].get_legend().get_texts()] == ["forget", "general", "chance"]
    from rmu_analysis import alignment

    al = alignment(tiny_llama, PROMPTS, u)
    fig = plots.plot_cosine_panels({"c=1": al, "c=2": al}, 1)
    assert [a.get_title() for a in fig.axes] == ["c=1", "c=2"]
    log = [{"step": s, "topic": "bio", "forget_loss": 1 / (s + 1), "forget_norm": s, "coefficient": 3.0}
           for s in range(5)]
    fig = plots.plot_norm_trajectories({"c=3": log})
    assert any(np.allclose(line.get_ydata(), 3.0) for line in fig.axes[0].get_lines())
    grads = input_gradient_norms(tiny_llama, tiny_tokenizer, RECORDS)
    fig = plots.plot_input_gradients({"base": grads, "copy": grads})
    assert fig.axes[0].get_yscale() == "log"
    plt.close("all")


def test_save_figure(tmp_path):
    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1])
    path = plots.save_figure(fig, tmp_path / "sub" / "line.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not plt.fignum_exists(fig.number)
