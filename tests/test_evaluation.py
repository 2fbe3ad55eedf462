"""evaluation.py: the lm-eval-style multiple-choice scorer (docs/paper.md), checked against hand computations."""
from __future__ import annotations

import copy
import warnings
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from rmu_analysis.data import DataFormatError
from rmu_analysis.evaluation import MCQResult, evaluate_mcq, mcq_continuations, mcq_prompt

RECORDS = [
    {"question": "Which host does the pathogen infect?", "choices": ["bats", "mice", "birds", "pigs"], "answer": 2},
    {"question": "  Where is Varon?  ", "choices": ["on the river Elm", "in the hills", "by the sea", "nowhere"],
     "answer": 0},
    {"question": "Which chemistry city" + " really" * 6 + "?", "choices": ["A", "B", "C", "D"], "answer": 3},
    {"question": "Pick one.", "choices": ["biology", "cities and people", "x", "encyclopedic text"], "answer": 1},
]


@pytest.fixture()
def tok(tiny_tokenizer):
    return copy.deepcopy(tiny_tokenizer)  # tests change padding side / pad token


class FixedLogits(nn.Module):
    """Every position gets the same logits vector."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.bias = nn.Parameter(logits.clone())
        self.calls: list[dict] = []

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        self.calls.append({"input_ids": input_ids.clone(), "attention_mask": attention_mask})
        b, t = input_ids.shape
        return SimpleNamespace(logits=self.bias.expand(b, t, -1))


class Bigram(nn.Module):
    """Logits depend on the current token only: easy to score by hand, indifferent to positions and padding."""

    def __init__(self, vocab: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.table = nn.Parameter(torch.randn(vocab, vocab, generator=g) * 3)
        self.n_forward = 0

    def forward(self, input_ids, attention_mask=None):
        self.n_forward += 1
        return SimpleNamespace(logits=self.table[input_ids])


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def _hand_loglik(model: Bigram, tok, context: str, continuation: str) -> float:
    """lm-eval: continuation tokens = encode(context + continuation)[len(encode(context)):]; BOS first."""
    ctx = [tok.bos_token_id] + _ids(tok, context)
    cont = _ids(tok, context + continuation)[len(ctx) - 1:]
    logp = torch.log_softmax(model.table.detach().double(), dim=-1)
    prev = [ctx[-1]] + cont[:-1]
    return float(sum(logp[p, c] for p, c in zip(prev, cont)))


# ------------------------------------------------------------------------------------------------ templates


def test_prompt_is_the_lm_eval_template():
    rec = {"question": " What infects bats? ", "choices": ["a", "b b", "c", "d"], "answer": 0}
    assert mcq_prompt(rec, "biology") == (
        "The following are multiple choice questions (with answers) about biology.\n\n"
        "What infects bats?\nA. a\nB. b b\nC. c\nD. d\nAnswer:"
    )
    assert mcq_prompt(rec, None) == (
        "The following are multiple choice questions (with answers).\n\n"
        "What infects bats?\nA. a\nB. b b\nC. c\nD. d\nAnswer:"
    )
    assert mcq_prompt(rec, "high_school_biology").startswith(
        "The following are multiple choice questions (with answers) about high school biology.\n\n"
    )
    assert mcq_prompt(rec, scoring="cloze") == "What infects bats?\nAnswer:"
    assert mcq_continuations(rec) == [" A", " B", " C", " D"]
    assert mcq_continuations(rec, scoring="cloze") == [" a", " b b", " c", " d"]
    with pytest.raises(ValueError, match="scoring must be"):
        mcq_prompt(rec, scoring="generate")


def test_result_prompts_use_subject(tok):
    model = Bigram(len(tok))
    res = evaluate_mcq(model, tok, RECORDS, "biology")
    assert res.prompts[0] == mcq_prompt(RECORDS[0], "biology")
    assert res.subject == "biology" and res.subjects == ("biology",) * 4
    mixed = evaluate_mcq(model, tok, RECORDS, ["biology", "cyber_security", None, "biology"])
    assert "about cyber security.\n\n" in mixed.prompts[1]
    assert mixed.prompts[2].startswith("The following are multiple choice questions (with answers).\n\n")
    assert mixed.subject == "mixed"
    with pytest.raises(ValueError, match="subject has 2 entries but there are 4 records"):
        evaluate_mcq(model, tok, RECORDS, ["a", "b"])


# ------------------------------------------------------------------------------------------------ scoring


def test_letter_scorer_picks_the_most_likely_letter(tok):
    vocab = len(tok)
    ids = [_ids(tok, f" {L}") for L in "ABCD"]
    assert all(len(i) == 1 for i in ids)
    logits = torch.zeros(vocab)
    logits[ids[0][0]], logits[ids[1][0]], logits[ids[2][0]], logits[ids[3][0]] = 1.0, 0.5, 4.0, -1.0
    model = FixedLogits(logits)
    res = evaluate_mcq(model, tok, RECORDS, "biology", batch_size=3)
    assert isinstance(res, MCQResult)
    assert (res.predictions == 2).all()
    expected = torch.log_softmax(logits.double(), dim=-1)[[i[0] for i in ids]].numpy()
    np.testing.assert_allclose(res.logliks, np.tile(expected, (4, 1)), atol=1e-6)
    np.testing.assert_allclose(res.probs[0], torch.softmax(torch.tensor(expected), 0).numpy(), atol=1e-6)
    assert res.accuracy == 0.25  # only record 0 has answer C
    # one forward pass per question (single-token continuations): 4 questions in batches of 3 -> 2 calls
    assert len(model.calls) == 2


def test_bos_and_tokenisation_like_lm_eval(tok):
    model = FixedLogits(torch.zeros(len(tok)))
    evaluate_mcq(model, tok, RECORDS[:1], "biology", batch_size=1)
    sent = model.calls[-1]["input_ids"][0].tolist()
    ctx = _ids(tok, mcq_prompt(RECORDS[0], "biology"))
    assert sent == [tok.bos_token_id] + ctx  # the tokenizer adds BOS, so the scorer does too
    evaluate_mcq(model, tok, RECORDS[:1], "biology", batch_size=1, add_bos=False)
    assert model.calls[-1]["input_ids"][0].tolist() == ctx
    tok.bos_token = None
    with pytest.raises(ValueError, match="no BOS token"):
        evaluate_mcq(model, tok, RECORDS[:1], add_bos=True)


@pytest.mark.parametrize("scoring", ["letter", "cloze"])
def test_logliks_equal_hand_computation(tok, scoring):
    model = Bigram(len(tok))
    res = evaluate_mcq(model, tok, RECORDS, "biology", scoring=scoring, batch_size=5)
    for i, rec in enumerate(RECORDS):
        ctx = mcq_prompt(rec, "biology", scoring=scoring)
        for j, cont in enumerate(mcq_continuations(rec, scoring=scoring)):
            assert res.logliks[i, j] == pytest.approx(_hand_loglik(model, tok, ctx, cont), abs=1e-4)
    np.testing.assert_array_equal(res.predictions, res.logliks.argmax(axis=1))
    assert res.accuracy == pytest.approx(float(np.mean(res.predictions == res.answers)))


def test_cloze_multi_token_uses_one_pass_per_choice(tok):
    model = Bigram(len(tok))
    res = evaluate_mcq(model, tok, RECORDS[:2], scoring="cloze", batch_size=1)
    assert (res.n_tokens[1] > 1).any()
    assert model.n_forward == 8  # 2 questions x 4 choices, batch_size 1
    model.n_forward = 0
    evaluate_mcq(model, tok, RECORDS[:2], scoring="letter", batch_size=1)
    assert model.n_forward == 2


def test_cloze_normalised_per_character(tok):
    model = Bigram(len(tok), seed=3)
    res = evaluate_mcq(model, tok, RECORDS, scoring="cloze", normalize=True)
    lengths = np.array([[len(c) for c in r["choices"]] for r in RECORDS], dtype=float)
    np.testing.assert_allclose(res.logliks_norm, res.logliks / lengths)
    np.testing.assert_array_equal(res.predictions, (res.logliks / lengths).argmax(axis=1))
    np.testing.assert_array_equal(res.probs.argmax(axis=1), res.predictions)
    assert res.accuracy == res.accuracy_norm
    assert res.accuracy_sum == pytest.approx(float(np.mean(res.logliks.argmax(axis=1) == res.answers)))
    raw = evaluate_mcq(model, tok, RECORDS, scoring="cloze")
    assert raw.accuracy == raw.accuracy_sum == res.accuracy_sum
    np.testing.assert_allclose(raw.logliks, res.logliks)


# ------------------------------------------------------------------------------------------------ batching


def _tiny_gpt2(vocab: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                     bos_token_id=0, eos_token_id=1, pad_token_id=2)
    return GPT2LMHeadModel(cfg).eval()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # rotary (relative) and learned absolute positions
@pytest.mark.parametrize("side", ["left", "right"])
def test_batched_equals_one_by_one(tok, tiny_llama, arch, side):
    model = tiny_llama if arch == "llama" else _tiny_gpt2(len(tok))
    tok.padding_side = side
    for scoring in ("letter", "cloze"):
        one = evaluate_mcq(model, tok, RECORDS, "biology", scoring=scoring, batch_size=1)
        many = evaluate_mcq(model, tok, RECORDS, "biology", scoring=scoring, batch_size=16)
        np.testing.assert_allclose(many.logliks, one.logliks, atol=1e-4)
        np.testing.assert_array_equal(many.predictions, one.predictions)


def test_model_state_restored(tiny_llama, tok):
    tiny_llama.train()
    res = evaluate_mcq(tiny_llama, tok, RECORDS[:2])
    assert tiny_llama.training
    tiny_llama.eval()
    again = evaluate_mcq(tiny_llama, tok, RECORDS[:2])
    np.testing.assert_allclose(res.logliks, again.logliks, atol=1e-5)  # dropout was off during scoring


def test_tokenizer_resolved_from_model(tiny_llama):
    res = evaluate_mcq(tiny_llama, None, RECORDS[:2])  # conftest puts the tokenizer on the model
    assert res.n == 2


def test_truncation_keeps_the_end(tok):
    model = Bigram(len(tok))
    full = evaluate_mcq(model, tok, RECORDS, "biology")
    with pytest.warns(UserWarning, match="cut on the left"):
        cut = evaluate_mcq(model, tok, RECORDS, "biology", max_length=6)
    assert cut.truncated == len(RECORDS)
    np.testing.assert_allclose(cut.logliks, full.logliks, atol=1e-5)  # a bigram model sees the last token only


# ------------------------------------------------------------------------------------------------ result


def test_result_frame_and_summary(tok):
    model = Bigram(len(tok))
    res = evaluate_mcq(model, tok, RECORDS, "biology", progress=True)
    frame = res.to_frame()
    assert len(frame) == 4
    assert {"subject", "answer", "prediction", "correct", "prob_A", "loglik_D", "loglik_norm_B"} <= set(frame.columns)
    assert frame["correct"].mean() == pytest.approx(res.accuracy)
    np.testing.assert_allclose(frame[["prob_A", "prob_B", "prob_C", "prob_D"]].sum(axis=1), 1.0)
    s = res.summary()
    assert s["n"] == 4 and s["chance"] == 0.25 and s["accuracy"] == res.accuracy and s["scoring"] == "letter"
    assert 0 < s["mean_prob_answer"] <= s["mean_max_prob"] <= 1
    with pytest.raises(Exception):
        res.accuracy = 1.0  # frozen


# ------------------------------------------------------------------------------------------------ errors


def test_errors(tok):
    model = Bigram(len(tok))
    with pytest.raises(ValueError, match="records is empty"):
        evaluate_mcq(model, tok, [])
    bad = [RECORDS[0], {"question": "q", "choices": ["a", "b", "c"], "answer": 0}]
    with pytest.raises(DataFormatError, match=r"input record 1: field 'choices' has 3 entries, expected 4"):
        evaluate_mcq(model, tok, bad)
    with pytest.raises(DataFormatError, match="input record 0: field 'answer' is 7"):
        evaluate_mcq(model, tok, [{"question": "q", "choices": list("abcd"), "answer": 7}])
    with pytest.raises(ValueError, match="scoring must be 'letter' or 'cloze'"):
        evaluate_mcq(model, tok, RECORDS, scoring="generate")
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        evaluate_mcq(model, tok, RECORDS, batch_size=0)


def test_missing_pad_token_warns_and_uses_eos(tok):
    tok.pad_token = None
    with pytest.warns(UserWarning, match="no pad token"):
        res = evaluate_mcq(Bigram(len(tok)), tok, RECORDS)
    assert tok.pad_token == tok.eos_token
    assert res.n == 4


def test_answers_as_letters_accepted(tok):
    recs = [dict(r, answer="ABCD"[r["answer"]]) for r in RECORDS]
    res = evaluate_mcq(Bigram(len(tok)), tok, recs)
    assert list(res.answers) == [r["answer"] for r in RECORDS]


def test_letter_falls_back_when_letters_are_multi_token():
    from rmu_analysis.organism.tokenizer import train_tokenizer

    tok = train_tokenizer(["hello world, no lettered answers here"] * 5, vocab_size=280, min_frequency=1)
    assert len(_ids(tok, " A")) == 2  # never seen " A": space and letter stay apart
    model = Bigram(len(tok))
    res = evaluate_mcq(model, tok, RECORDS[:2], "biology", batch_size=1)
    assert (res.n_tokens == 2).all()
    assert model.n_forward == 8  # full scoring: one pass per (question, choice)
    for i, rec in enumerate(RECORDS[:2]):
        ctx = mcq_prompt(rec, "biology")
        for j, cont in enumerate(mcq_continuations(rec)):
            assert res.logliks[i, j] == pytest.approx(_hand_loglik(model, tok, ctx, cont), abs=1e-4)


# ------------------------------------------------------------------------------------------------ intervals


def _fact_records() -> list[dict]:
    """Four facts, three wordings each (questions about one fact share a ``fact_id``)."""
    return [
        dict(rec, question=f"{rec['question'].strip()} (wording {w})", fact_id=f"fact-{f}", entity=f"e{f}",
             attribute="host")
        for f, rec in enumerate(RECORDS) for w in range(3)
    ]


def test_interval_resamples_facts_on_the_tiny_model(tiny_llama, tok):
    from rmu_analysis.stats import accuracy_interval

    res = evaluate_mcq(tiny_llama, tok, _fact_records(), "biology")
    assert res.clusters == tuple(f"fact-{f}" for f in range(4) for _ in range(3))  # "fact_id" found by default
    ci = res.interval()
    assert (ci.estimate, ci.method, ci.n, ci.n_clusters) == (res.accuracy, "cluster-bootstrap", 12, 4)
    assert ci == accuracy_interval(res.correct, res.clusters, seed=0)
    assert res.interval(seed=0) == ci and ci.low <= res.accuracy <= ci.high
    by_fields = evaluate_mcq(tiny_llama, tok, _fact_records(), "biology", cluster_key=("entity", "attribute"))
    assert by_fields.clusters[0] == ("e0", "host") and by_fields.interval() == ci  # the same grouping
    plain = evaluate_mcq(tiny_llama, tok, _fact_records(), "biology", cluster_key=())
    assert plain.clusters is None and plain.interval().method == "bootstrap"
    assert evaluate_mcq(tiny_llama, tok, RECORDS).clusters is None  # no fact_id: questions are the units
    with pytest.raises(ValueError, match="record 0 has no field 'fact'"):
        evaluate_mcq(tiny_llama, tok, RECORDS, cluster_key="fact")

    s = res.summary()
    old = {"scoring", "subject", "n", "accuracy", "accuracy_sum", "accuracy_norm", "normalize", "chance",
           "mean_prob_answer", "mean_max_prob", "truncated"}
    assert set(s) == old | {"accuracy_low", "accuracy_high"}
    assert (s["accuracy_low"], s["accuracy_high"]) == (ci.low, ci.high)


def test_compare_is_paired_on_the_same_questions(tiny_llama, tok):
    recs = _fact_records()
    base = evaluate_mcq(tiny_llama, tok, recs, "biology")
    other = evaluate_mcq(Bigram(len(tok), seed=3), tok, recs, "biology")
    same = base.compare(base)
    assert (same.diff, same.low, same.high, same.p_value) == (0.0, 0.0, 0.0, 1.0)
    d = base.compare(other)
    assert d.diff == pytest.approx(base.accuracy - other.accuracy)
    assert d.mcnemar_b == int((base.correct & ~other.correct).sum())
    assert d.mcnemar_c == int((~base.correct & other.correct).sum())
    assert d.method == "paired-cluster-bootstrap" and d.n_clusters == 4 and 0 < d.p_value <= 1
    assert other.compare(base).diff == -d.diff
    with pytest.raises(ValueError, match="scored different questions"):
        base.compare(evaluate_mcq(tiny_llama, tok, recs[:6], "biology"))
    shuffled = recs[1:] + recs[:1]  # same count, other order
    with pytest.raises(ValueError, match="different questions|different prompts"):
        base.compare(evaluate_mcq(tiny_llama, tok, shuffled, "biology"))
    with pytest.raises(TypeError, match="another MCQResult"):
        base.compare(0.5)


# ------------------------------------------------------------------------------------------------ shared context
# Cloze scoring runs each question's context once and its continuations on the context's KV cache
# (``_share_context=True``, the default); ``_share_context=False`` is the reference path that runs
# ``context + continuation[:-1]`` in full for every continuation. They must agree.

# contexts of different lengths (so batches are left-padded) and continuations of 1 to many tokens
SHARED_RECORDS = RECORDS + [
    {"question": "Which city lies on the river Elm, people say, in the encyclopedic text?",
     "choices": ["Varon", "the city of Varon on the river", "pathogen", "B"], "answer": 0},
    {"question": "Host?", "choices": ["bats bats bats bats bats", "A", "mice", "which host does the virus infect"],
     "answer": 1},
]


def _tiny_model(arch: str, tok, tiny_llama):
    return tiny_llama if arch == "llama" else _tiny_gpt2(len(tok))


def _cache_calls(model) -> tuple[list, Any]:
    """Forward-call log of ``model``: (input width, whether a KV cache was passed in) per call."""
    calls: list[tuple[int, bool]] = []

    def hook(module, args, kwargs):
        ids = args[0] if args else kwargs["input_ids"]
        calls.append((ids.shape[1], kwargs.get("cache", kwargs.get("past_key_values")) is not None))

    return calls, model.register_forward_pre_hook(hook, with_kwargs=True)


def _both(model, tok, records, **kw):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*cut on the left")
        new = evaluate_mcq(model, tok, records, "biology", **kw)
        old = evaluate_mcq(model, tok, records, "biology", _share_context=False, **kw)
    return new, old


def _assert_same(new, old):
    assert np.abs(new.logliks - old.logliks).max() <= 1e-4
    np.testing.assert_array_equal(new.predictions, old.predictions)
    np.testing.assert_array_equal(new.n_tokens, old.n_tokens)
    assert new.truncated == old.truncated


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # rotary (relative) and learned absolute positions
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("add_bos", [None, False])
@pytest.mark.parametrize("max_length", [None, 30])  # 30: some contexts cut by one amount per choice length
@pytest.mark.parametrize("pass_cost", ["one pass", "one pass per length"])
def test_shared_context_equals_full_path(tok, tiny_llama, monkeypatch, arch, side, add_bos, max_length, pass_cost):
    import rmu_analysis._scoring as ev  # the scoring engine (its pass-cost model is patched)

    if pass_cost != "one pass":  # every distinct continuation length in its own pass over a selected cache copy
        monkeypatch.setattr(ev, "_pass_cost", lambda model, device: 0.0)
    model = _tiny_model(arch, tok, tiny_llama)
    tok.padding_side = side
    calls, handle = _cache_calls(model)
    try:
        for scoring in ("cloze", "letter"):
            calls.clear()
            new, old = _both(model, tok, SHARED_RECORDS, scoring=scoring, batch_size=3, add_bos=add_bos,
                             max_length=max_length)
            _assert_same(new, old)
            if max_length is not None:
                assert new.truncated > 0  # the left truncation was exercised
            if scoring == "cloze":
                assert (new.n_tokens > 1).any() and (new.n_tokens == 1).any()
                assert any(cached for _, cached in calls)  # the continuations ran on a cache: no silent fallback
    finally:
        handle.remove()


def _unbatched_loglik(model, ids: list[int], n_cont: int) -> float:
    """log p(last n_cont tokens | the ones before) from one plain forward of one unpadded sequence."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    return float(sum(logp[len(ids) - n_cont - 1 + m, ids[len(ids) - n_cont + m]] for m in range(n_cont)))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_shared_context_equals_one_unpadded_sequence_at_a_time(tok, tiny_llama, arch):
    """Catches a wrong mask or wrong position ids for left-padded contexts and the continuation pass (the
    full path is checked the same way by test_batched_equals_one_by_one)."""
    from rmu_analysis.evaluation import encode_choices

    model = _tiny_model(arch, tok, tiny_llama)
    res = evaluate_mcq(model, tok, SHARED_RECORDS, scoring="cloze", batch_size=4)
    contexts = [mcq_prompt(r, scoring="cloze") for r in SHARED_RECORDS]
    conts = [mcq_continuations(r, scoring="cloze") for r in SHARED_RECORDS]
    pairs = encode_choices(tok, contexts, conts, [tok.bos_token_id])
    assert len({len(c) for c, _ in pairs}) > 2  # contexts of different lengths: padding in every batch
    for i, (ctx, cont_ids) in enumerate(pairs):
        for j, c in enumerate(cont_ids):
            assert res.logliks[i, j] == pytest.approx(_unbatched_loglik(model, ctx + c, len(c)), abs=1e-4)


def test_shared_context_passes_fewer_tokens(tok, tiny_llama):
    calls, handle = _cache_calls(tiny_llama)
    try:
        new, old = _both(tiny_llama, tok, RECORDS[:2], scoring="cloze", batch_size=1)
    finally:
        handle.remove()
    _assert_same(new, old)
    shared = [c for c in calls[: len(calls) - 8]]
    full = calls[len(calls) - 8:]  # the reference: one pass per (question, choice)
    assert [cached for _, cached in shared] == [False, True, False, True]  # per question: context, continuations
    assert sum(w for w, _ in shared) < sum(w for w, _ in full) / 2


@pytest.mark.parametrize("mode", ["add", "replace"])
def test_shared_context_under_steering(tok, tiny_llama, mode):
    """A steer/edit context applies to the context pass and to the continuation pass (every position of every
    call), so the shared path scores the steered model exactly as the full path does."""
    from rmu_analysis import hooks
    from rmu_analysis.steering import random_direction, steer

    u = random_direction(32, "uniform", seed=1)
    plain = evaluate_mcq(tiny_llama, tok, SHARED_RECORDS, scoring="cloze")
    widths: list[int] = []
    with steer(tiny_llama, 2, u, mode=mode, coeff=5.0), hooks.edit(tiny_llama, 1, lambda h: widths.append(h.shape[1])):
        new, old = _both(tiny_llama, tok, SHARED_RECORDS, scoring="cloze", batch_size=4)
    _assert_same(new, old)
    assert np.abs(new.logliks - plain.logliks).max() > 1e-2  # the steering changed the scores
    n_shared = len(widths) - int(np.ceil(24 / 4))  # the full path made 6 calls, the shared path the rest
    assert n_shared == 2 * 2  # context pass + continuation pass for each of 2 batches: both went through the hooks


class _NoCacheOut(nn.Module):
    """Takes a cache and use_cache but returns no cache (e.g. a wrapper): the scorer must fall back."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.config = inner.config

    def get_input_embeddings(self):
        return self.inner.get_input_embeddings()

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, use_cache=None,
                logits_to_keep=0):
        out = self.inner(input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
                         logits_to_keep=logits_to_keep)
        return SimpleNamespace(logits=out.logits)


def test_shared_context_falls_back_without_a_usable_cache(tok, tiny_llama):
    wrapped = _NoCacheOut(tiny_llama)
    new, old = _both(wrapped, tok, SHARED_RECORDS, scoring="cloze", batch_size=4)
    _assert_same(new, old)
    np.testing.assert_array_equal(new.logliks, old.logliks)  # the same computation: the full path
    ref = evaluate_mcq(tiny_llama, tok, SHARED_RECORDS, "biology", scoring="cloze", batch_size=4)
    assert np.abs(new.logliks - ref.logliks).max() <= 1e-4
    # a model whose forward takes no cache at all (Bigram) uses the full path: one pass per (question, choice)
    bigram = Bigram(len(tok))
    evaluate_mcq(bigram, tok, RECORDS[:2], scoring="cloze", batch_size=1)
    assert bigram.n_forward == 8


@pytest.mark.parametrize("window", [8, 256])
def test_shared_context_with_a_sliding_window(tok, window):
    """A sliding-window cache that would drop context tokens sends the scorer to the full path; a wide one is
    shared."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                        sliding_window=window, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    model = MistralForCausalLM(cfg).eval()
    calls, handle = _cache_calls(model)
    try:
        new, old = _both(model, tok, SHARED_RECORDS, scoring="cloze", batch_size=4)
    finally:
        handle.remove()
    _assert_same(new, old)
    assert any(cached for _, cached in calls) == (window == 256)


def test_length_chunks():
    from rmu_analysis._scoring import _length_chunks

    lengths = [9, 9, 8, 5, 5, 5, 5, 3, 3, 2, 2, 2, 2, 2, 1]
    for cost in (0.0, 5.0, 1e6, float("inf")):
        chunks = _length_chunks(lengths, cost)
        assert chunks[0][0] == 0 and chunks[-1][1] == len(lengths)
        assert all(a[1] == b[0] and a[0] < a[1] for a, b in zip(chunks, chunks[1:] + [(len(lengths), None)]))
    assert _length_chunks(lengths, float("inf")) == [(0, 15)] == _length_chunks(lengths, 1e6)
    assert len(_length_chunks(lengths, 0.0)) == 6  # one per distinct length


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none here)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shared_context_on_cuda(tok, tiny_llama, dtype):
    model = copy.deepcopy(tiny_llama).to("cuda", dtype)
    new, old = _both(model, tok, SHARED_RECORDS, scoring="cloze", batch_size=4)
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    assert np.abs(new.logliks - old.logliks).max() <= tol
    if dtype == torch.float32:
        _assert_same(new, old)
