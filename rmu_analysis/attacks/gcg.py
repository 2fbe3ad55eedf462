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

Targets: ``"correct"`` (the right answer) or ``"wrong"`` (one fixed, seeded random wrong answer per question);
success = the target answer scores highest of the four. An attack that knows the answer can teach it, so
knowledge *recovered* is success toward the correct answer minus
success toward a wrong one (:func:`gcg_attack`), and :func:`gcg_transfer` optimises one string on dev questions
and applies it to held-out test questions.
"""
from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, replace
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from .._batching import cache_kwarg, output_cache
from ..evaluation import (
    encode_choices, evaluate_mcq, mcq_continuations, mcq_prompt, score_continuations, subject_list, tokenizer_adds_bos,
)
from ..models import ensure_pad_token, forward_params, model_device, resolve_tokenizer
from .common import (
    AttackRow, accuracy_ci, check_choice, check_positive_int, check_records, difference_row, interval_row,
    paired_ci, record_clusters, rows_frame,
)

__all__ = ["GCGConfig", "GCGResult", "GCGReport", "GCGTransferResult", "AdversarialPrompts", "gcg", "gcg_attack",
           "gcg_transfer", "adversarial_prompts", "allowed_tokens", "prefix_cache", "suffix_choice_logprobs",
           "text_choice_logprobs", "token_gradients", "wrong_targets"]

POSITIONS = ("suffix", "prefix")
_ANSWER = "\nAnswer:"
TARGETS = ("correct", "wrong")
SCORINGS = ("letter", "cloze")


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


# ------------------------------------------------------------------------------------------------ prompts


@dataclass(frozen=True, eq=False)
class AdversarialPrompts:
    """N prompts (:func:`~rmu_analysis.evaluation.mcq_prompt`, lettered or cloze) as token ids around ``n_tokens``
    adversarial slots, in two left-padded parts, with the tokens each answer is read from.

    ``prefix_ids`` ``[N, Tp]``: per question, the tokens before the slots (BOS, header, and the question for a
    suffix); computed once per attack (:func:`prefix_cache`). ``cont_ids`` ``[R, Tc]``: per *row*, the slots
    (holding ``init`` tokens) and everything after them up to ``"Answer:"`` — then, when a question's answers are
    not all one token, one row per choice with that choice's tokens but the last appended (as lm-eval scores it);
    ``rows_per_question`` is 1 or 4 and the rows of question ``i`` are ``i·r … i·r + r − 1`` (``row_question``).
    A prompt is ``cat(prefix, cont)`` with padding in front of each part (masked; position ids count attended
    tokens only), so every row's last token is in the last column. ``adv_columns`` ``[R, P]``: the slots' columns.
    ``read_ids`` / ``read_pos`` / ``read_choice`` ``[R, K]``: the token read, its column counted from the end
    (−1 = the last) and the choice it belongs to (−1: padding) — a choice's score is the sum of its reads' log-probs,
    the summed log-likelihood of :func:`~rmu_analysis.evaluation.evaluate_mcq`. ``answers`` / ``targets`` ``[N]``:
    the right choice and the attack's target choice.
    """

    prefix_ids: torch.Tensor
    prefix_mask: torch.Tensor
    cont_ids: torch.Tensor
    cont_mask: torch.Tensor
    adv_columns: torch.Tensor
    row_question: torch.Tensor
    read_ids: torch.Tensor
    read_pos: torch.Tensor
    read_choice: torch.Tensor
    answers: torch.Tensor
    targets: torch.Tensor
    position: str
    scoring: str
    texts: tuple[tuple[str, str], ...]  # (before, after) the adversarial tokens, per question

    @property
    def n(self) -> int:
        return int(self.prefix_ids.shape[0])

    @property
    def n_tokens(self) -> int:
        return int(self.adv_columns.shape[1])

    @property
    def rows_per_question(self) -> int:
        return int(self.cont_ids.shape[0]) // self.n

    @property
    def keep(self) -> int:
        """How many final positions' logits a row needs (the longest answer read)."""
        return int(-self.read_pos.min())

    def rows_of(self, questions: torch.Tensor) -> torch.Tensor:
        """The rows of ``questions`` ``[M]``: ``[M·r]``, question by question."""
        r = self.rows_per_question
        return (questions[:, None] * r + torch.arange(r)[None]).reshape(-1)

    def cont_with(self, suffixes: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """``cont_ids`` of ``rows`` ``[R]`` with their slots filled by ``suffixes`` ``[R, P]``."""
        ids = self.cont_ids[rows].clone()
        ids.scatter_(1, self.adv_columns[rows], suffixes)
        return ids

    def masks(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention mask of the whole prompts of ``rows`` ``[R, Tp + Tc]`` and the position ids of their cont
        part ``[R, Tc]`` (attended tokens counted from 0)."""
        mask = torch.cat([self.prefix_mask[self.row_question[rows]], self.cont_mask[rows]], dim=1)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, self.prefix_ids.shape[1]:]
        return mask, pos

    def full(self, suffixes: torch.Tensor, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """Model inputs of the whole prompts of ``rows`` with ``suffixes`` (no cache)."""
        q = self.row_question[rows]
        mask = torch.cat([self.prefix_mask[q], self.cont_mask[rows]], dim=1)
        ids = torch.cat([self.prefix_ids[q], self.cont_with(suffixes, rows)], dim=1)
        return {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}


def wrong_targets(answers: Sequence[int], seed: int) -> np.ndarray:
    """One fixed wrong choice per question (uniform over the three wrong ones), drawn from ``seed``."""
    rng = np.random.default_rng(seed)
    answers = np.asarray(answers, dtype=np.int64)
    offsets = rng.integers(1, 4, size=answers.shape)  # 1..3 choices further, cyclically: never the answer
    return (answers + offsets) % 4


def _left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    offsets = []
    for i, s in enumerate(seqs):
        off = width - len(s)
        if s:
            ids[i, off:] = torch.tensor(s, dtype=torch.long)
            mask[i, off:] = 1
        offsets.append(off)
    return ids, mask, offsets


def _split_prompt(full: str, question: str, position: str, scoring: str) -> int:
    """Where the adversarial tokens go in ``full`` (the prompt of ``question``): its character offset."""
    if not full.endswith(_ANSWER):  # pragma: no cover - template change
        raise RuntimeError("mcq_prompt no longer ends with '\\nAnswer:'")
    if position == "suffix":
        return len(full) - len(_ANSWER)
    start = full.index("\n\n") + 2 if scoring == "letter" else 0
    if full[start: start + len(question)] != question:  # pragma: no cover - template change
        raise RuntimeError("mcq_prompt no longer puts the question where the prefix goes")
    return start


def adversarial_prompts(
    tokenizer, records: Sequence[dict], subject: Any = None, *, n_tokens: int = 5, position: str = "suffix",
    init_id: int, targets: Sequence[int] | None = None, scoring: str = "letter",
) -> AdversarialPrompts:
    """Tokenise the ``scoring`` prompts of ``records`` around ``n_tokens`` adversarial slots (the module docstring
    says where) with the answers' tokens as the evaluation reads them (``encode_choices``: the tokens of
    prompt + continuation after the prompt's)."""
    check_choice(position, "position", POSITIONS)
    check_choice(scoring, "scoring", SCORINGS)
    recs = check_records(records)
    subjects = subject_list(subject, len(recs))
    bos = [tokenizer.bos_token_id] if tokenizer_adds_bos(tokenizer) else []
    prefixes, afters, texts, answer_ids = [], [], [], []
    for r, s in zip(recs, subjects):
        full = mcq_prompt(r, s, scoring=scoring)
        cut = _split_prompt(full, r["question"].strip(), position, scoring)
        before, after = full[:cut], full[cut:]
        prefixes.append(bos + tokenizer(before, add_special_tokens=False)["input_ids"])
        afters.append(tokenizer(after, add_special_tokens=False)["input_ids"])
        texts.append((before, after))
        conts = encode_choices(tokenizer, [full], [mcq_continuations(r, scoring=scoring)], [])[0][1]
        if any(not c for c in conts):
            raise ValueError(f"an answer of {r['question']!r} encodes to no tokens after 'Answer:': check the tokenizer")
        answer_ids.append(conts)
    if any(not p for p in prefixes):
        raise ValueError(f"position={position!r} with {scoring} prompts leaves no token before the adversarial slots "
                         "(the tokenizer adds no BOS): use position='suffix'")
    one_pass = all(len(c) == 1 for conts in answer_ids for c in conts)  # each answer one token: one row per question
    conts, reads = [], []
    for after, choice_ids in zip(afters, answer_ids):
        if one_pass:
            conts.append([init_id] * n_tokens + after)
            reads.append([[(c[0], -1, j) for j, c in enumerate(choice_ids)]])
        else:
            for j, c in enumerate(choice_ids):
                conts.append([init_id] * n_tokens + after + c[:-1])
                reads.append([[(tok, m - len(c), j) for m, tok in enumerate(c)]])
    reads = [row for q in reads for row in q]
    k = max(len(row) for row in reads)
    read_ids = torch.zeros((len(reads), k), dtype=torch.long)
    read_pos = torch.full((len(reads), k), -1, dtype=torch.long)
    read_choice = torch.full((len(reads), k), -1, dtype=torch.long)
    for i, row in enumerate(reads):
        for m, (tok, pos, j) in enumerate(row):
            read_ids[i, m], read_pos[i, m], read_choice[i, m] = tok, pos, j
    r = 1 if one_pass else 4
    prefix_ids, prefix_mask, _ = _left_pad(prefixes, tokenizer.pad_token_id)
    cont_ids, cont_mask, offsets = _left_pad(conts, tokenizer.pad_token_id)
    adv = torch.tensor(offsets, dtype=torch.long)[:, None] + torch.arange(n_tokens)[None]
    answers = torch.tensor([rec["answer"] for rec in recs], dtype=torch.long)
    tgt = answers.clone() if targets is None else torch.as_tensor(np.asarray(targets), dtype=torch.long)
    if tgt.shape != answers.shape or not ((tgt >= 0) & (tgt < 4)).all():
        raise ValueError(f"targets must hold one choice index 0..3 per record ({len(recs)}), got {tgt.tolist()}")
    return AdversarialPrompts(
        prefix_ids=prefix_ids, prefix_mask=prefix_mask, cont_ids=cont_ids, cont_mask=cont_mask, adv_columns=adv,
        row_question=torch.arange(len(recs)).repeat_interleave(r), read_ids=read_ids, read_pos=read_pos,
        read_choice=read_choice, answers=answers, targets=tgt, position=position, scoring=scoring,
        texts=tuple(texts),
    )


def allowed_tokens(tokenizer, vocab_size: int) -> torch.Tensor:
    """Boolean ``[vocab_size]``: the tokens GCG may use — not special, and ``encode(decode([t])) == [t]``."""
    n = min(int(vocab_size), len(tokenizer))
    ids = list(range(n))
    decoded = tokenizer.batch_decode([[t] for t in ids], skip_special_tokens=False,
                                     clean_up_tokenization_spaces=False)
    encoded = tokenizer(decoded, add_special_tokens=False)["input_ids"]
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    ok = torch.zeros(int(vocab_size), dtype=torch.bool)
    for t, text, enc in zip(ids, decoded, encoded):
        ok[t] = t not in special and bool(text) and list(enc) == [t]
    return ok


# ------------------------------------------------------------------------------------------------ scoring


def prefix_cache(model: nn.Module, prompts: AdversarialPrompts) -> Any:
    """The KV cache of every question's prefix (the tokens before the slots), computed once without gradients."""
    device = model_device(model)
    with torch.no_grad():
        out = model(input_ids=prompts.prefix_ids.to(device), attention_mask=prompts.prefix_mask.to(device),
                    position_ids=(prompts.prefix_mask.cumsum(-1) - 1).clamp(min=0).to(device), use_cache=True,
                    **({"logits_to_keep": 1} if "logits_to_keep" in forward_params(model) else {}))
    cache = output_cache(out)
    if cache is None or not hasattr(cache, "reorder_cache"):
        raise ValueError(f"{type(model).__name__} returned no reorderable KV cache: pass use_cache=False")
    return cache


def _rows_cache(cache: Any, questions: torch.Tensor) -> Any:
    """A copy of ``cache`` holding the prefixes of ``questions`` (repeats allowed), for one forward pass."""
    c = copy.deepcopy(cache)
    c.reorder_cache(questions)
    return c


def _tail_logits(model: nn.Module, prompts: AdversarialPrompts, rows: torch.Tensor, cache: Any, *,
                 ids: torch.Tensor | None = None, embeds: torch.Tensor | None = None) -> torch.Tensor:
    """Logits at the last ``prompts.keep`` positions ``[R, keep, V]`` of ``rows`` whose cont part is ``ids`` (or
    ``embeds``), through ``cache`` (the prefixes' keys and values) or, when None, over the whole prompt."""
    device = model_device(model)
    keep = prompts.keep
    kw: dict[str, Any] = {}
    if "logits_to_keep" in forward_params(model):
        kw["logits_to_keep"] = keep  # the LM head runs on the read positions only
    if cache is not None:
        mask, pos = prompts.masks(rows)
        kw[cache_kwarg(model)] = _rows_cache(cache, prompts.row_question[rows].to(device))
        kw["use_cache"] = True
    else:
        q = prompts.row_question[rows]
        mask = torch.cat([prompts.prefix_mask[q], prompts.cont_mask[rows]], dim=1)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        emb = model.get_input_embeddings().weight
        prefix = prompts.prefix_ids[q].to(device)
        if embeds is not None:
            embeds = torch.cat([emb.detach()[prefix], embeds], dim=1)
        else:
            ids = torch.cat([prefix, ids.to(device)], dim=1)
    if embeds is not None:
        kw["inputs_embeds"] = embeds
    else:
        kw["input_ids"] = ids.to(device)
    return model(attention_mask=mask.to(device), position_ids=pos.to(device), **kw).logits[:, -keep:]


def _read_logprobs(prompts: AdversarialPrompts, rows: torch.Tensor, tail: torch.Tensor) -> torch.Tensor:
    """log p of each read token of ``rows`` ``[R, K]`` (0 at padding) from their tail logits (fp32, softmax over
    the whole vocabulary, as the evaluation)."""
    device = tail.device
    logp = torch.log_softmax(tail.float(), dim=-1)
    col = (prompts.keep + prompts.read_pos[rows]).to(device)  # [R, K]
    r = torch.arange(rows.shape[0], device=device)[:, None].expand_as(col)
    vals = logp[r, col, prompts.read_ids[rows].to(device)]
    return vals * (prompts.read_choice[rows] >= 0).to(device)


def _choice_scores(prompts: AdversarialPrompts, rows: torch.Tensor, reads: torch.Tensor, owner: torch.Tensor,
                   m: int) -> torch.Tensor:
    """Sum the reads ``[R, K]`` of ``rows`` into ``[m, 4]`` choice scores; ``owner`` ``[R]``: each row's output row."""
    choice = prompts.read_choice[rows].to(reads.device)
    flat = (owner.to(reads.device)[:, None] * 4 + choice.clamp(min=0)).reshape(-1)
    return torch.zeros(m * 4, dtype=reads.dtype, device=reads.device).index_add_(0, flat, reads.reshape(-1)).view(m, 4)


def suffix_choice_logprobs(model: nn.Module, prompts: AdversarialPrompts, suffixes: torch.Tensor,
                           questions: torch.Tensor, *, batch_size: int = 128, cache: Any = None) -> torch.Tensor:
    """Summed log-likelihood of each of the four answers ``[M, 4]`` (fp32; the evaluation's scores: ``" A"``..``" D"``
    or the choices' texts) of ``questions`` ``[M]`` with adversarial tokens ``suffixes`` ``[M, P]``: about
    ``batch_size`` sequences per forward pass, no gradients; ``cache``: :func:`prefix_cache` of ``prompts`` (then
    only the slots and what follows run)."""
    suffixes = torch.as_tensor(suffixes, dtype=torch.long).cpu()
    questions = torch.as_tensor(questions, dtype=torch.long).cpu()
    if suffixes.dim() != 2 or suffixes.shape != (questions.shape[0], prompts.n_tokens):
        raise ValueError(f"suffixes must have shape [{questions.shape[0]}, {prompts.n_tokens}], got "
                         f"{tuple(suffixes.shape)}")
    r = prompts.rows_per_question
    chunk = max(1, batch_size // r)
    out = []
    with torch.no_grad():
        for s in range(0, questions.shape[0], chunk):
            q = questions[s: s + chunk]
            rows = prompts.rows_of(q)
            ids = prompts.cont_with(suffixes[s: s + chunk].repeat_interleave(r, 0), rows)
            reads = _read_logprobs(prompts, rows, _tail_logits(model, prompts, rows, cache, ids=ids))
            owner = torch.arange(q.shape[0]).repeat_interleave(r)
            out.append(_choice_scores(prompts, rows, reads, owner, q.shape[0]).cpu())
    return torch.cat(out)


def text_choice_logprobs(model: nn.Module, tokenizer, texts: Sequence[str], records: Sequence[dict], *,
                         scoring: str = "letter", batch_size: int = 64) -> torch.Tensor:
    """The evaluation's scores ``[n, 4]`` of the four answers of ``records`` after whole prompt ``texts``
    (:func:`~rmu_analysis.evaluation.score_continuations`: tokenised afresh, as the evaluation does): how an
    attack's string reads once it is text."""
    conts = [mcq_continuations(r, scoring=scoring) for r in records]
    logliks, _, _ = score_continuations(model, tokenizer, list(texts), conts, batch_size=batch_size)
    return torch.from_numpy(logliks)


def _target_rows(prompts: AdversarialPrompts, questions: torch.Tensor) -> torch.Tensor:
    """Per question the row that holds its target answer's reads."""
    r = prompts.rows_per_question
    return questions * r + (prompts.targets[questions] if r > 1 else 0)


def token_gradients(model: nn.Module, prompts: AdversarialPrompts, adv: torch.Tensor, *, batch_size: int = 128,
                    cache: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient of ``Σ_i −log p(target answer_i)`` (summed over the answer's tokens) w.r.t. the one-hot adversarial
    tokens ``[S, P, V]`` and w.r.t. their embeddings ``[S, P, d]`` (the one-hot gradient is the embedding gradient
    times the embedding matrixᵀ). ``adv`` ``[S, P]``: one string for all prompts (``S = 1``) or one per prompt
    (``S = N``; then row ``i`` holds the gradient of prompt ``i``'s loss alone). ``cache``: as in
    :func:`suffix_choice_logprobs`."""
    device = model_device(model)
    emb = model.get_input_embeddings().weight
    S, P = adv.shape
    if S not in (1, prompts.n):
        raise ValueError(f"adv must hold 1 string or one per prompt ({prompts.n}), got {S}")
    onehot = torch.zeros(S, P, emb.shape[0], dtype=emb.dtype, device=device)
    onehot.scatter_(2, adv.to(device)[..., None], 1.0)
    onehot.requires_grad_(True)
    grad_onehot = torch.zeros(S, P, emb.shape[0], dtype=torch.float32, device=device)
    grad_embed = torch.zeros(S, P, emb.shape[1], dtype=torch.float32, device=device)
    with torch.enable_grad():
        for s in range(0, prompts.n, batch_size):
            q = torch.arange(s, min(s + batch_size, prompts.n))
            rows = _target_rows(prompts, q)
            sets = torch.zeros_like(q) if S == 1 else q
            adv_embeds = onehot[sets.to(device)] @ emb  # [c, P, d]
            embeds = emb.detach()[prompts.cont_ids[rows].to(device)]
            rr = torch.arange(len(q), device=device)[:, None].expand(-1, P)
            embeds = embeds.index_put((rr, prompts.adv_columns[rows].to(device)), adv_embeds)
            reads = _read_logprobs(prompts, rows, _tail_logits(model, prompts, rows, cache, embeds=embeds))
            is_target = prompts.read_choice[rows] == prompts.targets[q][:, None]
            loss = -(reads * is_target.to(reads.device)).sum()
            g_onehot, g_embed = torch.autograd.grad(loss, [onehot, adv_embeds])
            grad_onehot += g_onehot.float()
            grad_embed.index_add_(0, sets.to(device), g_embed.float())
    return grad_onehot, grad_embed


def _spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman rank correlation of two 1-D tensors (NaN when either is constant)."""
    rx = x.argsort().argsort().double()
    ry = y.argsort().argsort().double()
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = (rx.norm() * ry.norm()).item()
    return float((rx @ ry).item() / den) if den > 0 else float("nan")


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
