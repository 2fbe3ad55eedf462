"""The model organism: world generator, held-out questions, reference file formats, a reduced build, shipped model."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from rmu_analysis.organism import (
    ASSETS, DOMAINS, SUBJECTS, build_report, load_organism, organism_corpora, organism_mcq,
)
from rmu_analysis.models import attached_tokenizer
from rmu_analysis.organism import world as W
from rmu_analysis.organism.build import BuildConfig, _Stream, block_norms, build_organism

SMALL = dict(n_layers=2, hidden=32, heads=4, mlp=64, vocab_size=320, steps=6, batch_size=8, warmup=2,
             n_entities=(("pathogen", 4), ("exploit", 4), ("city", 4), ("person", 4), ("element", 4)),
             forget_docs=12, retain_docs=16, threads=1)


def test_world_is_deterministic_for_a_seed():
    a, b, c = W.generate_world(3), W.generate_world(3), W.generate_world(4)
    assert a.facts == b.facts and a.mcq == b.mcq and a.forget_corpus == b.forget_corpus
    assert a.retain_corpus == b.retain_corpus
    assert a.facts != c.facts


def test_world_rejects_too_few_entities():
    with pytest.raises(ValueError, match="at least 4 entities"):
        W.generate_world(0, {"city": 3})


def test_world_has_the_promised_structure():
    w = W.generate_world(0)
    kinds = {f.kind for f in w.facts}
    assert kinds == {"pathogen", "exploit", "city", "person", "element"}
    # entities shared across domains: pathogens isolated in cities, exploits named after people
    cities, people = set(w.entities["city"]), set(w.entities["person"])
    assert {f.value for f in w.facts if f.attribute == "isolated_in"} <= cities
    assert {f.value for f in w.facts if f.attribute == "named_after"} <= people
    for domain in DOMAINS:
        for q in w.mcq[domain]:
            assert len(q["choices"]) == 4 and len(set(q["choices"])) == 4
            assert 0 <= q["answer"] < 4
    answers = [q["answer"] for d in DOMAINS for q in w.mcq[d]]
    assert min(answers.count(i) for i in range(4)) > len(answers) / 8  # answer letters are spread


def _frequency_prior_accuracy(questions) -> float:
    """Accuracy of picking, in each question, the choice that answers its attribute most often in the set."""
    from collections import Counter

    count = Counter((q["attribute"], q["choices"][q["answer"]]) for q in questions)
    return sum(max(range(4), key=lambda j: count[(q["attribute"], q["choices"][j])]) == q["answer"]
               for q in questions) / len(questions)


def test_balanced_values_spread_the_answers_evenly():
    from collections import Counter

    plain, balanced = W.generate_world(0), W.generate_world(0, balanced_values=True)
    assert [f.entity for f in plain.facts] == [f.entity for f in balanced.facts]
    for kind in ("pathogen", "exploit", "city"):
        for attr in {f.attribute for f in balanced.facts if f.kind == kind}:
            facts = [f for f in balanced.facts if f.kind == kind and f.attribute == attr]
            counts = Counter(f.value for f in facts)
            expected = len(facts) // len(facts[0].vocabulary)
            assert set(counts.values()) <= {expected, expected + 1}, (kind, attr, counts)
    # knowing how often each value answers an attribute: far above chance in the shipped world, near it balanced
    assert _frequency_prior_accuracy(plain.mcq["bio"]) > 0.40
    assert _frequency_prior_accuracy(balanced.mcq["bio"]) < 0.30
    assert BuildConfig().balanced_values is False  # the shipped organism


def test_questions_are_worded_differently_from_all_training_text():
    w = W.generate_world(0)
    assert not set(W.EVAL_QUESTION_FRAMES) & set(W.TRAIN_QUESTION_FRAMES)
    stream = _Stream(w, BuildConfig(), random.Random(0))
    training = w.forget_corpus["bio"] + w.forget_corpus["cyber"] + w.retain_corpus
    training += [stream.sample() for _ in range(3000)]
    blob = "\n".join(training)
    for domain in DOMAINS:
        for q in w.mcq[domain]:
            assert q["question"] not in blob
    # the frames' fixed wording never occurs in training text either
    for frame in W.EVAL_QUESTION_FRAMES:
        stem = frame.split("{c}")[0].strip()
        assert stem and stem not in blob


def test_reduced_build_runs_end_to_end(tmp_path: Path):
    report = build_organism(tmp_path / "org", BuildConfig(**SMALL), progress=False)
    root = tmp_path / "org"
    for name in ("model.safetensors", "config.json", "tokenizer.json", "build_report.json",
                 "data/bio-forget-corpus.jsonl", "data/cyber-forget-corpus.jsonl", "data/retain-corpus.jsonl",
                 "data/bio-mcq.jsonl", "data/cyber-mcq.jsonl", "data/general-mcq.jsonl"):
        assert (root / name).is_file(), name
    assert not list(tmp_path.glob(".*partial"))
    assert json.loads((root / "build_report.json").read_text()) == json.loads(json.dumps(report))
    assert set(report["accuracy"]) == set(DOMAINS)
    assert len(report["block_norms"]["retain"]) == SMALL["n_layers"]
    model, tok = load_organism(root)
    assert model.config.num_hidden_layers == 2 and len(tok) <= SMALL["vocab_size"]
    corpora = organism_corpora(root)
    assert len(corpora["forget"]["bio"]) == SMALL["forget_docs"] and len(corpora["retain"]) == SMALL["retain_docs"]
    # reference formats: bio is JSON lines with "text", cyber is one raw text per line
    bio_line = (root / "data/bio-forget-corpus.jsonl").read_text().splitlines()[0]
    assert set(json.loads(bio_line)) == {"text"}
    cyber_line = (root / "data/cyber-forget-corpus.jsonl").read_text().splitlines()[0]
    assert not cyber_line.startswith("{") and cyber_line == corpora["forget"]["cyber"][0]


def test_build_refuses_to_overwrite(tmp_path: Path):
    (tmp_path / "org").mkdir()
    with pytest.raises(FileExistsError, match="overwrite"):
        build_organism(tmp_path / "org", BuildConfig(**SMALL), progress=False)


# ------------------------------------------------------------------------------------------ the shipped model
def test_shipped_files_are_small_and_complete():
    total = sum(p.stat().st_size for p in ASSETS.rglob("*") if p.is_file())
    assert total <= 20 * 1024 * 1024, f"organism assets are {total / 2**20:.1f} MiB (limit 20)"
    model, tok = load_organism()
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_hidden_layers >= 12
    assert attached_tokenizer(model) is tok and tok.pad_token is not None
    assert tok("x")["input_ids"][0] == tok.bos_token_id
