"""The testbed-v2 world and build: balance, splits, WMDP-shaped corpora, held-out wordings, a reduced build."""
from __future__ import annotations

import json
import random
from collections import Counter

import pytest
import torch

from rmu_analysis.evaluation import evaluate_mcq
from rmu_analysis.organism import SCORING, build_report, load_organism, organism_corpora, organism_mcq
from rmu_analysis.organism import world_v2 as V
from rmu_analysis.organism.build import block_norms
from rmu_analysis.organism.build_v2 import BuildConfigV2, Stream, build_organism_v2, summary_v2, tokenizer_texts


@pytest.fixture(scope="module")
def world():
    return V.generate_world(0)


def test_world_rejects_bad_split_sizes():
    with pytest.raises(ValueError, match="forget-topic kind"):
        V.generate_world(0, split_sizes={**V.SPLIT_SIZES, "pathogen": {"dev": 8, "test": 8, "retain": 8}})
    with pytest.raises(ValueError, match="at least 4 entities"):
        V.generate_world(0, split_sizes={**V.SPLIT_SIZES, "city": {"test": 3}})


def test_world_is_deterministic_for_a_seed(world):
    again, other = V.generate_world(0), V.generate_world(1)
    assert again.facts == world.facts and again.mcq == world.mcq
    assert again.forget_corpus == world.forget_corpus and again.retain_corpus == world.retain_corpus
    assert other.facts != world.facts


def test_question_counts_and_wordings(world):
    for domain in V.DOMAINS:
        test = world.mcq["test"][domain]
        assert len(test) >= 600, (domain, len(test))
        per_fact = Counter(r["fact_id"] for r in test)
        assert min(per_fact.values()) >= 3
        # every fact is asked in each held-out wording
        frames = {fid: set() for fid in per_fact}
        for r in test:
            frames[r["fact_id"]].add(r["question"].replace(r["entity"], "{e}"))
        assert min(len(v) for v in frames.values()) >= 3


def test_answers_are_balanced_and_the_value_prior_is_chance(world):
    for split in ("dev", "test"):
        for domain in V.DOMAINS:
            records = world.mcq[split][domain]
            letters = Counter(r["answer"] for r in records)
            assert max(letters.values()) - min(letters.values()) <= 1
            assert V.value_prior(world, records) <= 0.28
            for r in records:
                assert len(set(r["choices"])) == 4 and r["choices"][r["answer"]] in r["choices"]
    # within an attribute every value is the answer equally often (+-1) in every split
    for kind in V.KINDS:
        for attr, _, vocab, _ in V.SCHEMA[kind]:
            if isinstance(vocab, str):
                continue
            for split in ("dev", "test", "retain"):
                counts = Counter(f.value for f in world.facts if f.attribute == attr and f.kind == kind
                                 and f.split == split)
                if counts:
                    assert max(counts.values()) - min(counts.get(v, 0) for v in vocab) <= 1, (kind, attr, split)


def test_values_differ_in_their_first_word(world):
    for vocab in {f.vocabulary for f in world.facts}:
        firsts = [v.split()[0].lower() for v in vocab]
        assert len(set(firsts)) == len(firsts), vocab


def test_splits_are_disjoint_and_corpora_are_wmdp_shaped(world):
    dev = {r["entity"] for d in V.DOMAINS for r in world.mcq["dev"][d]}
    test = {r["entity"] for d in V.DOMAINS for r in world.mcq["test"][d]}
    assert dev and test and not dev & test
    for topic, kind in (("bio", "pathogen"), ("cyber", "exploit")):
        corpus = " ".join(world.forget_corpus[topic])
        covered = {e for e in world.entities[kind] if e in corpus}
        tagged = {r["entity"] for s in ("dev", "test") for r in world.mcq[s][topic] if r["in_corpus"]}
        assert covered == tagged
        ents = [e for e in world.entities[kind] if world.splits[e] == "test"]
        assert 0.4 <= sum(e in covered for e in ents) / len(ents) <= 0.6  # half of the topic
    retain = " ".join(world.retain_corpus)
    general_test = [e for k in ("city", "person", "element") for e in world.entities[k] if world.splits[e] == "test"]
    for f in world.facts:  # no general test fact is stated in the retain corpus handed to unlearning
        if f.entity in general_test:
            assert not any(f.entity in doc and f.value in doc for doc in world.retain_corpus), f


def test_held_out_wordings_never_occur_in_training_text(world):
    assert not set(V.EVAL_QUESTION_FRAMES) & set(V.TRAIN_QUESTION_FRAMES)
    assert not set(V.EVAL_DRILL_FRAMES) & set(V.DRILL_FRAMES)
    stems = [f.split("{")[0].strip() for f in V.EVAL_QUESTION_FRAMES + V.EVAL_DRILL_FRAMES]
    stems = [s for s in stems if len(s) > 6]
    stream = Stream(world, BuildConfigV2(items_per_doc=2), random.Random(0))
    texts = [stream.sample() for _ in range(1000)] + tokenizer_texts(world, 0)
    texts += world.forget_corpus["bio"] + world.forget_corpus["cyber"] + world.retain_corpus
    for text in texts:
        for stem in stems:
            assert stem not in text, (stem, text[:200])
    questions = {r["question"] for s in world.mcq.values() for d in s.values() for r in d}
    blob = "\n".join(texts)
    assert not any(q in blob for q in questions)


def test_reduced_build_end_to_end(tmp_path):
    cfg = BuildConfigV2(n_layers=2, hidden=32, heads=4, mlp=64, vocab_size=600, steps=4, batch_size=8, warmup=2,
                        threads=1, docs_per_entity=1,
                        split_sizes=tuple((k, (("dev", 4), ("test", 4)) + ((("retain", 4),) if k in ("city", "person", "element")
                                                                     else ())) for k in V.KINDS))
    lines = []
    report = build_organism_v2(tmp_path / "org", cfg, progress=False, eval_every=2, log=lines.append)
    assert len(report["learning_curve"]) == 2 and lines == report["learning_curve"]
    files = sorted(p.name for p in (tmp_path / "org" / "data").iterdir())
    assert "bio-mcq.jsonl" in files and "bio-dev-mcq.jsonl" in files and "retain-corpus.jsonl" in files
    saved = json.loads((tmp_path / "org" / "build_report.json").read_text())
    assert saved["version"] == 2 and set(saved["accuracy"]) == {"dev", "test"}
    text = summary_v2(saved)
    assert "bio/letter" in text and "input-independent model" in text
    assert len(saved["floor"]["accuracy"]["cloze"]["bio"]) == 5 and len(saved["floor"]["accuracy"]["letter"]["cyber"]) == 5
    assert 0 <= saved["floor"]["value_prior"]["bio"] <= 1
    first = json.loads((tmp_path / "org" / "data" / "bio-mcq.jsonl").read_text().splitlines()[0])
    assert {"fact_id", "split", "in_corpus"} <= set(first)
    with pytest.raises(FileExistsError):
        build_organism_v2(tmp_path / "org", cfg, progress=False)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="not written by rmu_analysis"):  # refused before any training
        build_organism_v2(tmp_path / "mine", cfg, overwrite=True, progress=False)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_cli_testbed_flags_are_checked_before_any_work(capsys):
    from rmu_analysis.cli import main

    assert main(["organism", "build", "--testbed", "1"]) == 2  # no --out: never over the shipped organism
    assert "--out" in capsys.readouterr().err
    assert main(["organism", "build", "--testbed", "1", "--out", "x", "--eval-every", "5"]) == 2
    assert "testbed-2 option" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ the shipped model
def test_shipped_organism_is_testbed_2_with_dev_and_test_questions():
    report = build_report()
    assert report["version"] == V.VERSION
    test, dev = organism_mcq(), organism_mcq(split="dev")
    world = BuildConfigV2(**{k: (tuple(tuple(x) if isinstance(x, list) else x for x in v) if isinstance(v, list) else v)
                             for k, v in report["config"].items() if k in BuildConfigV2.__dataclass_fields__}).world()
    for domain in V.DOMAINS:  # the shipped files are the world's question sets
        assert test[domain] == world.mcq["test"][domain] and dev[domain] == world.mcq["dev"][domain]
        assert not {r["entity"] for r in test[domain]} & {r["entity"] for r in dev[domain]}


def test_shipped_model_accuracy_equals_its_build_report():
    torch.set_num_threads(2)  # the conftest fixture restores one thread afterwards
    model, tok = load_organism()
    report = build_report()
    for split in ("dev", "test"):
        mcq = organism_mcq(split=split)
        for domain in V.DOMAINS:
            res = evaluate_mcq(model, tok, mcq[domain], subject=V.SUBJECTS[domain], scoring="cloze", batch_size=64)
            assert round(float(res.accuracy), 4) == pytest.approx(report["accuracy"][split][f"{domain}/cloze"], abs=1e-4)


def test_shipped_model_meets_its_targets():
    """Testbed-2 targets the shipped model reaches, on the test questions (docs/testbed_v2.md): cloze ≥ 85% on
    every set, an input-independent model ≤ 28% on each forget topic (every draw, the default scoring) and so is
    the value-frequency prior, norm growth ≥ 2.5×."""
    report = build_report()
    for domain in V.DOMAINS:
        assert report["accuracy"]["test"][f"{domain}/cloze"] >= 0.85, (domain, report["accuracy"]["test"])
    for topic, draws in report["floor"]["accuracy"][SCORING].items():
        assert max(draws) <= 0.28, (topic, draws)
        assert report["floor"]["value_prior"][topic] <= 0.28
    model, tok = load_organism()
    measured = block_norms(model, tok, organism_corpora()["retain"][:64])
    assert measured == pytest.approx(report["block_norms"]["retain"], abs=1e-3)
    assert measured[-1] / measured[0] >= 2.5, measured
