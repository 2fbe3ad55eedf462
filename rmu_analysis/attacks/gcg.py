"""Greedy Coordinate Gradient (Zou et al. 2023, arXiv 2307.15043) on multiple-choice questions.

The white-box attack the paper's robustness argument is about (arXiv 2408.06223 §3.3, Eq. 20–22): if unlearning
maps every forget prompt's layer-l state to c·u + ε whatever the tokens, the gradient of the loss w.r.t. one-hot
input tokens carries no signal and GCG's search degrades. Here the attack is run, and the signal it sees is
measured beside its success.

The prompt and the answers are those of :func:`~rmu_analysis.evaluation.evaluate_mcq` with the model's scoring
(``GCGConfig.scoring``): the lettered lm-eval template (answers ``" A"``..``" D"``) or the cloze one
(``"{question}\nAnswer:"``, answers the choices' texts). ``n_tokens`` adversarial tokens go **right before**
``"\nAnswer:"`` (``position="suffix"``: after the choices, or after the question in cloze — the end of the request,
where Zou et al. put theirs), or right before the question text (``"prefix"``: after the lettered header); either
way the prompt still ends with ``"Answer:"`` and every answer's score is its summed log-likelihood after it, as
the evaluation scores it, so "accuracy" means what it means in the evaluation. Loss = −(summed log-likelihood of
the target answer) (summed over prompts for a universal string); an answer of several tokens is scored on its own
row (prompt + answer but its last token), one-token answers of a question share one row. Everything before the
adversarial tokens is run once (its keys and values are cached), so a candidate costs only its own tokens,
``"\nAnswer:"`` and the answer's tokens.

Each step (Zou et al., Alg. 1/2): the gradient of the loss w.r.t. the one-hot matrix of every adversarial
position (a product with the embedding matrix); the ``top_k`` most negative-gradient tokens per position (special
tokens and tokens that do not survive decode → encode are never used); ``candidates`` strings, each with one random
position replaced by one random top-k token, scored **batched** (one forward pass per chunk of ``batch_size``
sequences); the best candidate replaces the current string when it lowers the loss (so the recorded loss never
increases). Recorded per step: loss, accuracy and target success of the attacked prompts, the norm of the
gradient the attacker sees (w.r.t. the one-hot tokens and w.r.t. the adversarial embeddings) and how well that
gradient predicts the candidates' actual loss changes (Spearman correlation, ``grad_corr``).

The prompts and their batched scoring are in :mod:`.gcg_scoring`; this module holds the attack and its reports.

Targets: ``"correct"`` (the right answer) or ``"wrong"`` (one fixed, seeded random wrong answer per question);
success = the target answer scores highest of the four. An attack that knows the answer can teach it, so
knowledge *recovered* is success toward the correct answer minus
success toward a wrong one (:func:`gcg_attack`), and :func:`gcg_transfer` optimises one string on dev questions
and applies it to held-out test questions.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ..evaluation import evaluate_mcq
from ..models import ensure_pad_token, model_device, resolve_tokenizer
from .common import (
    AttackRow, accuracy_ci, check_choice, check_positive_int, check_records, difference_row, interval_row, paired_ci,
    record_clusters, rows_frame,
)
from .gcg_scoring import (  # the prompts and scoring; re-exported here, where they were first defined
    POSITIONS, SCORINGS, TARGETS, AdversarialPrompts, _spearman, adversarial_prompts, allowed_tokens, prefix_cache,
    suffix_choice_logprobs, text_choice_logprobs, token_gradients, wrong_targets,
)

__all__ = ["GCGConfig", "GCGResult", "GCGReport", "GCGTransferResult", "AdversarialPrompts", "gcg", "gcg_attack",
           "gcg_transfer", "adversarial_prompts", "allowed_tokens", "prefix_cache", "suffix_choice_logprobs",
           "text_choice_logprobs", "token_gradients", "wrong_targets"]



@dataclass(frozen=True)
class GCGConfig:
    """GCG's budget and options. Defaults are sized for the CPU organism (Zou et al. use 20 tokens, top-k 256 and
    512 candidates per step). ``universal``: one string for all prompts (loss summed) instead of one per question.
    ``init``: the text of the token every adversarial position starts from (``"!"`` as in Zou et al.).
    ``batch_size``: sequences per forward pass when scoring candidates (and prompts per gradient pass).
    ``guidance``: ``"gradient"`` (GCG: replacement tokens from the top-k of the one-hot gradient) or ``"random"``
    (the same search with tokens drawn uniformly from the usable vocabulary: the baseline that shows what the
    gradient adds — what arXiv 2408.06223 §3.3 argues unlearning takes away; gradients are still computed and
    recorded).
    ``use_cache``: compute the keys and values of the tokens before the slots once and run only the slots and
    what follows them (same numbers up to float rounding; False runs whole prompts).
    ``scoring``: the prompt and answers of :func:`~rmu_analysis.evaluation.evaluate_mcq` the attack works on —
    ``"letter"`` (the answer is ``" A"``..``" D"``) or ``"cloze"`` (the answer is the choice's text): use the
    scoring the model is evaluated with (``rmu_analysis.organism.SCORING`` for the organism)."""

    n_tokens: int = 5
    top_k: int = 64
    candidates: int = 64
    steps: int = 100
    position: str = "suffix"
    target: str = "correct"
    universal: bool = False
    init: str = "!"
    guidance: str = "gradient"
    batch_size: int = 128
    use_cache: bool = True
    scoring: str = "letter"
    seed: int = 0

    def __post_init__(self) -> None:
        check_positive_int(self.n_tokens, "n_tokens")
        check_positive_int(self.top_k, "top_k")
        check_positive_int(self.candidates, "candidates")
        check_positive_int(self.steps, "steps", minimum=0)
        check_positive_int(self.batch_size, "batch_size")
        check_choice(self.position, "position", POSITIONS)
        check_choice(self.target, "target", TARGETS)
        check_choice(self.guidance, "guidance", ("gradient", "random"))
        check_choice(self.scoring, "scoring", SCORINGS)
        if not isinstance(self.init, str) or not self.init:
            raise ValueError(f"init must be a non-empty string (the text of one token), got {self.init!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int, got {self.seed!r}")

    def to_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------------------------------ the attack


@dataclass(frozen=True)
class GCGResult:
    """One GCG run toward one target (:func:`gcg`).

    ``history``: one dict per step (step 0 = the initial string): ``loss`` (mean −log p(target) per prompt),
    ``accuracy`` (prediction = right answer), ``target_success`` (prediction = target answer), ``grad_norm``
    (mean over strings of ‖∂loss/∂one-hot‖), ``grad_norm_embed`` (‖∂loss/∂adversarial embeddings‖),
    ``grad_corr`` (Spearman correlation, over the step's candidates, of the gradient's first-order prediction of
    the loss change, ∂loss/∂onehot[new] − ∂loss/∂onehot[old], with the actual change; NaN at the last recorded
    step. With gradient guidance the candidates are the top-k tokens only, so compare it across models, not with 0),
    ``accepted`` (strings improved this step), ``seconds``. Per-question arrays: ``clean_correct`` /
    ``clean_target`` (the evaluation's scorer, no attack), ``attacked_correct`` / ``attacked_target`` (token ids as
    optimised), ``text_correct`` (the prompt with the attack's string decoded to text and tokenised afresh,
    :func:`text_choice_logprobs`).
    """

    config: GCGConfig
    method: str
    answers: np.ndarray
    targets: np.ndarray
    adv_ids: tuple[tuple[int, ...], ...]
    adv_text: tuple[str, ...]
    history: tuple[dict, ...]
    clean_correct: np.ndarray
    clean_target: np.ndarray
    attacked_correct: np.ndarray
    attacked_target: np.ndarray
    text_correct: np.ndarray
    clusters: tuple | None
    seconds: float

    @property
    def n(self) -> int:
        return int(self.answers.shape[0])

    @property
    def setting(self) -> str:
        kind = "universal" if self.config.universal else "per-question"
        if self.config.guidance != "gradient":
            kind += f", {self.config.guidance} search"
        return f"{kind}, target {self.config.target}"

    def curve_frame(self):
        """The per-step history as a DataFrame (with ``method`` and ``target`` columns)."""
        import pandas as pd

        frame = pd.DataFrame(list(self.history))
        frame.insert(0, "target", self.config.target)
        frame.insert(0, "method", self.method)
        return frame

    def rows(self) -> tuple[AttackRow, ...]:
        steps, secs = self.config.steps, self.seconds
        rows = [
            interval_row(self.method, "gcg", self.setting, "clean accuracy",
                         accuracy_ci(self.clean_correct, self.clusters)),
            interval_row(self.method, "gcg", self.setting, "attacked accuracy",
                         accuracy_ci(self.attacked_correct, self.clusters), steps=steps, seconds=secs),
            interval_row(self.method, "gcg", self.setting, "attacked accuracy (text)",
                         accuracy_ci(self.text_correct, self.clusters), steps=steps, seconds=secs),
        ]
        if self.config.target != "correct":
            rows.append(interval_row(self.method, "gcg", self.setting, "clean target success",
                                     accuracy_ci(self.clean_target, self.clusters)))
            rows.append(interval_row(self.method, "gcg", self.setting, "target success",
                                     accuracy_ci(self.attacked_target, self.clusters), steps=steps, seconds=secs))
        return tuple(rows)

    def to_frame(self):
        return rows_frame(self.rows())


def _device_and_tokenizer(model: nn.Module, tokenizer):
    tokenizer = resolve_tokenizer(model, tokenizer)
    ensure_pad_token(tokenizer)
    return tokenizer


def _init_id(tokenizer, init: str, allowed: torch.Tensor) -> int:
    ids = tokenizer(init, add_special_tokens=False)["input_ids"]
    if len(ids) != 1 or not bool(allowed[ids[0]]):
        raise ValueError(
            f"init={init!r} must be the text of one usable token (it encodes to {ids}); try init='x' or another "
            "single character the tokenizer has"
        )
    return int(ids[0])


def gcg(
    model: nn.Module,
    tokenizer: Any,
    records: Sequence[dict],
    config: GCGConfig | None = None,
    *,
    subject: Any = None,
    method: str = "model",
    cluster_key: Any = None,
    progress: bool = False,
) -> GCGResult:
    """Run GCG (Zou et al. 2023) toward ``config.target`` on lettered ``records`` (see the module docstring).

    ``subject``: the "about {subject}" of the prompt (a str, None or one per record, as in ``evaluate_mcq``).
    ``method``: the label of this model in the result table. The model is not changed (eval mode; no parameter
    gradients are kept; its training flag is restored).
    """
    config = GCGConfig() if config is None else config
    if not isinstance(config, GCGConfig):
        raise TypeError(f"config must be a GCGConfig, got {type(config).__name__}")
    t_start = time.perf_counter()
    tokenizer = _device_and_tokenizer(model, tokenizer)
    recs = check_records(records)
    clusters = record_clusters(recs, cluster_key)
    vocab = int(model.get_input_embeddings().weight.shape[0])
    allowed = allowed_tokens(tokenizer, vocab)
    if int(allowed.sum()) < config.top_k:
        raise ValueError(f"top_k={config.top_k} but only {int(allowed.sum())} tokens are usable: lower top_k")
    init_id = _init_id(tokenizer, config.init, allowed)
    answers = np.array([r["answer"] for r in recs], dtype=np.int64)
    targets = answers.copy() if config.target == "correct" else wrong_targets(answers, config.seed)
    prompts = adversarial_prompts(tokenizer, recs, subject, n_tokens=config.n_tokens, position=config.position,
                                  init_id=init_id, targets=targets, scoring=config.scoring)
    N, P, B = prompts.n, config.n_tokens, config.candidates
    S = 1 if config.universal else N
    gen = torch.Generator(device="cpu").manual_seed(config.seed)
    device = model_device(model)
    blocked = (~allowed).to(device)
    usable = torch.nonzero(allowed)[:, 0]
    tgt = prompts.targets
    ans = prompts.answers

    def score(suffix_rows: torch.Tensor, prompt_rows: torch.Tensor) -> torch.Tensor:
        return suffix_choice_logprobs(model, prompts, suffix_rows, prompt_rows, batch_size=config.batch_size,
                                      cache=cache)

    was_training = model.training
    model.eval()
    history: list[dict] = []
    try:
        cache = prefix_cache(model, prompts) if config.use_cache else None
        adv = torch.full((S, P), init_id, dtype=torch.long)
        rows = torch.arange(N)
        cur_logp = score(adv[0].expand(N, P) if S == 1 else adv, rows)  # [N, 4]
        cur_nll = -cur_logp.gather(1, tgt[:, None])[:, 0]  # [N]
        cur_loss = cur_nll.sum()[None] if S == 1 else cur_nll.clone()  # [S]
        grads = None
        steps = range(config.steps + 1)
        if progress:
            from tqdm import tqdm

            steps = tqdm(steps, desc=f"gcg ({config.target})", unit="step")
        for step in steps:
            pred = cur_logp.argmax(1)
            row = {"step": step, "loss": float(cur_loss.sum() / N), "accuracy": float((pred == ans).float().mean()),
                   "target_success": float((pred == tgt).float().mean()), "seconds": time.perf_counter() - t_start}
            if grads is None:  # the string changed (or first step): new gradients; else the same as last step
                grads = token_gradients(model, prompts, adv, batch_size=config.batch_size, cache=cache)
            g_onehot, g_embed = grads
            row["grad_norm"] = float(g_onehot.flatten(1).norm(dim=1).mean())
            row["grad_norm_embed"] = float(g_embed.flatten(1).norm(dim=1).mean())
            if step == config.steps:
                row.update(grad_corr=float("nan"), accepted=0)
                history.append(row)
                break
            pos = torch.randint(0, P, (S, B), generator=gen)
            if config.guidance == "gradient":
                g = g_onehot.masked_fill(blocked, float("inf"))
                top = (-g).topk(config.top_k, dim=-1).indices.cpu()  # [S, P, k]
                pick = torch.randint(0, config.top_k, (S, B), generator=gen)
                new_tok = top[torch.arange(S)[:, None], pos, pick]  # [S, B]
            else:
                new_tok = usable[torch.randint(0, usable.shape[0], (S, B), generator=gen)]
            cand = adv[:, None, :].repeat(1, B, 1)  # [S, B, P]
            cand.scatter_(2, pos[..., None], new_tok[..., None])
            if S == 1:  # every candidate on every prompt: rows (b, i)
                logp = score(cand[0].repeat_interleave(N, 0), rows.repeat(B)).view(B, N, 4)
                nll = -logp.gather(2, tgt[None, :, None].expand(B, N, 1))[..., 0]  # [B, N]
                cand_loss = nll.sum(1)[None]  # [1, B]
            else:  # candidate b of question i on question i: rows (i, b)
                logp = score(cand.reshape(S * B, P), rows.repeat_interleave(B)).view(N, B, 4)
                cand_loss = -logp.gather(2, tgt[:, None, None].expand(N, B, 1))[..., 0]  # [N, B]
            # how well the attacker's gradient predicts the actual change of each candidate's loss
            g_cpu = g_onehot.cpu()
            sidx = torch.arange(S)[:, None].expand(S, B)
            predicted = g_cpu[sidx, pos, new_tok] - g_cpu[sidx, pos, adv.gather(1, pos)]
            actual = cand_loss - cur_loss[:, None]
            row["grad_corr"] = float(np.nanmean([_spearman(predicted[s], actual[s]) for s in range(S)]))
            best = cand_loss.argmin(1)  # [S]
            best_loss = cand_loss[torch.arange(S), best]
            accept = best_loss < cur_loss
            row["accepted"] = int(accept.sum())
            history.append(row)
            if bool(accept.any()):
                grads = None
            for s in torch.nonzero(accept)[:, 0].tolist():
                adv[s] = cand[s, best[s]]
                cur_loss[s] = best_loss[s]
                if S == 1:
                    cur_logp = logp[best[s]].clone()
                else:
                    cur_logp[s] = logp[s, best[s]]
        adv_ids = tuple(tuple(int(t) for t in a) for a in adv)
        adv_text = tuple(tokenizer.decode(list(a), clean_up_tokenization_spaces=False) for a in adv_ids)
        texts = [before + adv_text[0 if S == 1 else i] + after for i, (before, after) in enumerate(prompts.texts)]
        text_pred = text_choice_logprobs(model, tokenizer, texts, recs, scoring=config.scoring,
                                         batch_size=min(config.batch_size, 64)).argmax(1).numpy()
    finally:
        model.train(was_training)
    pred = cur_logp.argmax(1).numpy()
    clean = evaluate_mcq(model, tokenizer, recs, subject, scoring=config.scoring, batch_size=min(config.batch_size, 64),
                         cluster_key=())
    return GCGResult(
        config=config, method=method, answers=answers, targets=targets, adv_ids=adv_ids, adv_text=adv_text,
        history=tuple(history), clean_correct=clean.predictions == answers, clean_target=clean.predictions == targets,
        attacked_correct=pred == answers, attacked_target=pred == targets, text_correct=text_pred == answers,
        clusters=clusters, seconds=time.perf_counter() - t_start,
    )


# ------------------------------------------------------------------------------------------------ reports


@dataclass(frozen=True)
class GCGReport:
    """GCG toward the correct answer and toward a fixed wrong answer on the same questions (:func:`gcg_attack`).

    ``recovered``: success toward the correct answer minus success toward the wrong one, paired over questions —
    the knowledge the attack recovers beyond what any target can be taught."""

    correct: GCGResult
    wrong: GCGResult
    recovered: Any  # stats.PairedDifference

    def rows(self) -> tuple[AttackRow, ...]:
        c = self.correct
        extra = difference_row(c.method, "gcg", c.setting.replace(", target correct", ""),
                               "recovered (correct − wrong)", self.recovered, steps=c.config.steps,
                               seconds=c.seconds + self.wrong.seconds)
        return c.rows() + self.wrong.rows() + (extra,)

    def to_frame(self):
        return rows_frame(self.rows())

    def curve_frame(self):
        import pandas as pd

        return pd.concat([self.correct.curve_frame(), self.wrong.curve_frame()], ignore_index=True)


def gcg_attack(model: nn.Module, tokenizer: Any, records: Sequence[dict], config: GCGConfig | None = None, **kwargs
               ) -> GCGReport:
    """:func:`gcg` toward the correct answer and toward a wrong one (the control), with the paired difference of
    their success rates. ``config.target`` is ignored; keyword arguments go to :func:`gcg`."""
    config = GCGConfig() if config is None else config
    right = gcg(model, tokenizer, records, replace(config, target="correct"), **kwargs)
    wrong = gcg(model, tokenizer, records, replace(config, target="wrong"), **kwargs)
    recovered = paired_ci(right.attacked_target, wrong.attacked_target, right.clusters)
    return GCGReport(correct=right, wrong=wrong, recovered=recovered)


@dataclass(frozen=True)
class GCGTransferResult:
    """A universal string optimised toward the correct answers of ``dev`` questions, applied to ``test`` ones.

    ``test_clean`` / ``test_attacked``: per-question correctness on the test questions without and with the
    string (token ids as optimised, inserted where the attack put them); ``gain`` their paired difference."""

    dev: GCGResult
    test_clean: np.ndarray
    test_attacked: np.ndarray
    test_clusters: tuple | None
    gain: Any  # stats.PairedDifference
    seconds: float

    def rows(self) -> tuple[AttackRow, ...]:
        d = self.dev
        steps = d.config.steps
        return (
            interval_row(d.method, "gcg", "transfer", "dev attacked accuracy",
                         accuracy_ci(d.attacked_correct, d.clusters), steps=steps, seconds=d.seconds),
            interval_row(d.method, "gcg", "transfer", "test clean accuracy",
                         accuracy_ci(self.test_clean, self.test_clusters)),
            interval_row(d.method, "gcg", "transfer", "test attacked accuracy",
                         accuracy_ci(self.test_attacked, self.test_clusters), steps=steps, seconds=self.seconds),
            difference_row(d.method, "gcg", "transfer", "test gain", self.gain, steps=steps, seconds=self.seconds),
        )

    def to_frame(self):
        return rows_frame(self.rows())

    def curve_frame(self):
        return self.dev.curve_frame()


def gcg_transfer(model: nn.Module, tokenizer: Any, dev_records: Sequence[dict], test_records: Sequence[dict],
                 config: GCGConfig | None = None, *, subject: Any = None, test_subject: Any = None,
                 method: str = "model", cluster_key: Any = None, progress: bool = False) -> GCGTransferResult:
    """Optimise one universal string toward the correct answers of ``dev_records`` and measure it on
    ``test_records`` (whose answers it never saw). ``test_subject`` defaults to ``subject``."""
    config = GCGConfig() if config is None else config
    t0 = time.perf_counter()
    dev = gcg(model, tokenizer, dev_records, replace(config, universal=True, target="correct"), subject=subject,
              method=method, cluster_key=cluster_key, progress=progress)
    tokenizer = _device_and_tokenizer(model, tokenizer)
    test = check_records(test_records, "test_records")
    test_clusters = record_clusters(test, cluster_key)
    subj = subject if test_subject is None else test_subject
    if not isinstance(subj, (str, type(None))) and test_subject is None:
        raise ValueError("subject is one per dev record: pass test_subject for the test records")
    prompts = adversarial_prompts(tokenizer, test, subj, n_tokens=config.n_tokens, position=config.position,
                                  init_id=dev.adv_ids[0][0], scoring=config.scoring)
    suffix = torch.tensor(dev.adv_ids[0], dtype=torch.long).expand(prompts.n, -1)
    was_training = model.training
    model.eval()
    try:
        logp = suffix_choice_logprobs(model, prompts, suffix, torch.arange(prompts.n), batch_size=config.batch_size)
        clean = evaluate_mcq(model, tokenizer, test, subj, scoring=config.scoring,
                             batch_size=min(config.batch_size, 64), cluster_key=())
    finally:
        model.train(was_training)
    answers = prompts.answers.numpy()
    attacked = logp.argmax(1).numpy() == answers
    clean_correct = clean.predictions == answers
    gain = paired_ci(attacked, clean_correct, test_clusters)
    return GCGTransferResult(dev=dev, test_clean=clean_correct, test_attacked=attacked, test_clusters=test_clusters,
                             gain=gain, seconds=time.perf_counter() - t0)
