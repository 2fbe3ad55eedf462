"""GCG's prompts and scoring (:mod:`rmu_analysis.attacks.gcg`): the attacked prompts with their adversarial slots
(:class:`AdversarialPrompts`), the tokens the attacker may use, the cached prefix, batched log-likelihoods of every
answer after candidate strings, and the gradient w.r.t. the one-hot adversarial tokens."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from .._batching import cache_kwarg, output_cache
from ..evaluation import (
    encode_choices, mcq_continuations, mcq_prompt, score_continuations, subject_list, tokenizer_adds_bos,
)
from ..models import forward_params, model_device
from .common import check_choice, check_records


POSITIONS = ("suffix", "prefix")
_ANSWER = "\nAnswer:"
TARGETS = ("correct", "wrong")
SCORINGS = ("letter", "cloze")


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
