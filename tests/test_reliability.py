"""Reliability: bad inputs are errors before any work, outputs replace only what this toolkit wrote, and no
loader gives a silent wrong answer or deletes a file.

One test (parametrised where natural) per failure a new user met: ``--overwrite`` on directories the toolkit did
not write, a crash in the middle of a replacement, ``--out FILE``; non-finite or non-positive c, β, α, learning
rates and lengths; texts that are not lists of non-empty strings; JSON lines files with a malformed line; lengths
beyond the model's positions; ``--limit -1``; empty prompts; the output checked before training; OS errors as
one-line messages; decode errors naming file and line; a mistyped local model path. Then property-based tests
(hypothesis) of the loaders and of ``atomic_directory`` on random bytes, JSON, encodings and directory states.
"""
from __future__ import annotations

import codecs
import contextlib
import hashlib
import io
import json
import math
import os
import random
import re
import tempfile
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from rmu_analysis import _io
from rmu_analysis._io import MARKER, atomic_directory, check_output_dir, is_toolkit_output
from rmu_analysis.cli import main
from rmu_analysis.confidence import measure_confidence
from rmu_analysis.data import DataFormatError, load_forget_corpus, load_mcq, load_text_corpus, write_jsonl
from rmu_analysis.evaluation import evaluate_mcq
from rmu_analysis.models import load_model
from rmu_analysis.testing import tiny_llama as make_tiny_llama
from rmu_analysis.unlearning import (
    AdaptiveRMUConfig, GAConfig, GradDiffConfig, NPOConfig, RMUConfig, prepare_corpora, save_unlearned, unlearn,
)
from rmu_analysis.unlearning import cli as unlearn_cli
from rmu_analysis.unlearning.common import sequence_lengths


PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
WORDS = "pathogen host bats mice birds virus infect city river Elm people text".split()


def texts(n: int, seed: int, lo: int = 3, hi: int = 12) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))) for _ in range(n)]


def tree(path: Path) -> dict[str, bytes | None]:
    """Every entry under ``path`` (relative name -> file bytes, None for a directory)."""
    if not path.exists():
        return {}
    out: dict[str, bytes | None] = {}
    for p in sorted(path.rglob("*")):
        out[str(p.relative_to(path))] = None if p.is_dir() else p.read_bytes()
    return out


def marked_dir(path: Path, content: str = "old") -> Path:
    """A directory as this toolkit writes it: a file and the marker."""
    with atomic_directory(path) as tmp:
        (tmp / "weights.txt").write_text(content)
    return path


@pytest.fixture()
def tiny_run(tiny_tokenizer):
    """A tiny 4-block Llama, a tokenizer, two forget topics and a retain corpus; ``config(**kw)`` a 4-step RMU."""
    model = make_tiny_llama(len(tiny_tokenizer), n_layers=4)

    class Run:
        tokenizer = tiny_tokenizer
        forget = {"bio": texts(8, 1), "cyber": texts(8, 2)}
        retain = texts(8, 3)

        @staticmethod
        def config(cls=RMUConfig, **kw):
            base = dict(layer=2, lr=1e-3, steps=4, batch_size=2, alpha=10.0, forget_max_length=24,
                        retain_max_length=24)
            base.update(kw)
            if cls is RMUConfig:
                base.setdefault("steering_coeff", 20.0)
            return cls(**base)

    Run.model = model
    return Run


# ================================================================================== --overwrite (item 2)
@pytest.mark.parametrize("content", ["user files", "empty", "nested"])
def test_overwrite_refuses_a_directory_the_toolkit_did_not_write(tmp_path, content):
    target = tmp_path / "out"
    target.mkdir()
    if content == "user files":
        (target / "thesis.tex").write_text("three years of work")
    elif content == "nested":
        (target / "sub").mkdir()
        (target / "sub" / "data.csv").write_text("1,2,3")
    before = tree(tmp_path)
    with pytest.raises(FileExistsError, match="not written by rmu_analysis"):
        with atomic_directory(target, overwrite=True) as tmp:
            (tmp / "new.txt").write_text("new")
    assert tree(tmp_path) == before  # nothing deleted, no temporary directory left


def test_overwrite_refuses_the_current_directory(tmp_path, monkeypatch):
    marked_dir(tmp_path / "run")
    monkeypatch.chdir(tmp_path / "run")  # even a directory the toolkit wrote, when it is where we stand
    before = tree(tmp_path)
    for target in (".", tmp_path / "run", tmp_path):
        with pytest.raises(FileExistsError, match="current directory"):
            check_output_dir(target, overwrite=True)
    assert tree(tmp_path) == before


@pytest.mark.parametrize("swap", ["atomic exchange", "two renames"])
def test_overwrite_replaces_a_toolkit_directory_and_leaves_nothing_behind(tmp_path, monkeypatch, swap):
    if swap == "two renames":
        monkeypatch.setattr(_io, "_exchange", lambda a, b: False)
    target = marked_dir(tmp_path / "out", "old")
    (tmp_path / "neighbour.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="pass overwrite=True"):
        with atomic_directory(target):
            pass
    with atomic_directory(target, overwrite=True) as tmp:
        (tmp / "weights.txt").write_text("new")
    assert (target / "weights.txt").read_text() == "new" and is_toolkit_output(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["neighbour.txt", "out"]  # no .out.old / .partial


def test_a_failed_second_rename_puts_the_old_copy_back(tmp_path, monkeypatch):
    monkeypatch.setattr(_io, "_exchange", lambda a, b: False)
    target = marked_dir(tmp_path / "out", "old")
    real = os.rename
    calls = []

    def rename(a, b):
        calls.append((a, b))
        if len(calls) == 2:
            raise OSError(28, "No space left on device", str(b))
        return real(a, b)

    monkeypatch.setattr(_io.os, "rename", rename)
    with pytest.raises(OSError, match="No space"):
        with atomic_directory(target, overwrite=True) as tmp:
            (tmp / "weights.txt").write_text("new")
    monkeypatch.setattr(_io.os, "rename", real)
    assert (target / "weights.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("crash", ["between the renames", "before the old copy was deleted"])
def test_the_next_call_repairs_an_interrupted_replacement(tmp_path, crash):
    target = marked_dir(tmp_path / "out", "old")
    old = _io._old_path(target)
    os.rename(target, old)  # what the first rename of the two-rename swap leaves
    if crash == "before the old copy was deleted":  # the second rename put the new copy in place
        target.mkdir()
        (target / "weights.txt").write_text("new")
        (target / MARKER).write_text("{}")
    expected = "old" if crash == "between the renames" else "new"
    with pytest.warns(UserWarning, match="put back") if expected == "old" else contextlib.nullcontext():
        check_output_dir(target, overwrite=True)
    assert (target / "weights.txt").read_text() == expected and not old.exists()


def test_out_that_is_a_file_or_a_link_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    file = tmp_path / "model.bin"
    file.write_bytes(b"weights")
    link = tmp_path / "link"
    link.symlink_to(marked_dir(tmp_path / "real"))
    monkeypatch.setattr(unlearn_cli, "_read_data", _must_not_run)
    monkeypatch.setattr(unlearn_cli, "load_from_args", _must_not_run)
    before = tree(tmp_path)
    for out, message in ((file, "is a file, not a directory"), (link, "symbolic link"),
                         (file / "sub", "is a file: cannot create")):
        assert main(["unlearn", "--out", str(out), "--overwrite", "--steps", "4"]) == 2
        err = capsys.readouterr().err
        assert message in err and str(out if out != file / "sub" else file) in err and err.count("\n") == 1
    assert tree(tmp_path) == before  # the file is intact, no .model.bin.old


def _must_not_run(*args, **kwargs):
    raise AssertionError("work started before the arguments were checked")


def test_cli_overwrite_end_to_end(tmp_path, capsys):
    out = tmp_path / "unlearned"
    argv = ["unlearn", "--model", "organism", "--preset", "organism-rmu", "--steps", "2", "--out", str(out),
            "--no-progress"]
    assert main(argv) == 0 and is_toolkit_output(out)
    first = (out / "model.safetensors").read_bytes()
    capsys.readouterr()
    t0 = time.perf_counter()
    assert main(argv) == 2 and "pass overwrite=True (--overwrite)" in capsys.readouterr().err
    assert time.perf_counter() - t0 < 5  # refused before loading or training
    assert main(argv[:-3] + ["--steps", "4"] + argv[-3:] + ["--overwrite"]) == 0
    assert (out / "model.safetensors").read_bytes() != first and is_toolkit_output(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unlearned"]


def test_organism_build_refuses_a_foreign_directory_before_training(tmp_path, monkeypatch):
    import rmu_analysis.organism.build as build

    monkeypatch.setattr(build, "train_model", _must_not_run)
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not written by rmu_analysis"):
        build.build_organism(tmp_path / "org", overwrite=True, progress=False)
    assert (tmp_path / "org" / "notes.txt").read_text() == "mine"


def test_saved_and_shipped_directories_carry_the_marker(tiny_run, tmp_path):
    from rmu_analysis.organism import ASSETS

    assert is_toolkit_output(ASSETS)  # so `organism build --overwrite` may replace the shipped model
    result = unlearn(tiny_run.model, tiny_run.tokenizer, tiny_run.forget, tiny_run.retain, tiny_run.config(),
                     progress=False)
    path = save_unlearned(result, tmp_path / "saved")
    assert is_toolkit_output(path)
    save_unlearned(result, path, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["saved"]


# ================================================================================== validation (item 3)
BAD_NUMBERS = [
    (RMUConfig, "steering_coeff", 0.0), (RMUConfig, "steering_coeff", -44.0), (RMUConfig, "steering_coeff", math.nan),
    (RMUConfig, "steering_coeff", math.inf), (RMUConfig, "steering_coeff", (6.5, -1.0)),
    (AdaptiveRMUConfig, "beta", 0.0), (AdaptiveRMUConfig, "beta", -5.0), (AdaptiveRMUConfig, "beta", math.nan),
    (RMUConfig, "alpha", -1.0), (RMUConfig, "alpha", math.nan), (AdaptiveRMUConfig, "alpha", math.inf),
    (GradDiffConfig, "alpha", -0.5), (NPOConfig, "alpha", math.nan), (NPOConfig, "beta", 0.0),
    (NPOConfig, "beta", math.inf), (RMUConfig, "lr", 0.0), (AdaptiveRMUConfig, "lr", -1e-3),
    (GAConfig, "lr", math.nan), (GAConfig, "lr", math.inf), (RMUConfig, "steps", 0), (GAConfig, "steps", -1),
    (RMUConfig, "steps", 2.5), (RMUConfig, "batch_size", 0), (RMUConfig, "forget_max_length", 0),
    (RMUConfig, "forget_max_length", -1), (RMUConfig, "forget_max_length", (512, 0)),
    (RMUConfig, "retain_max_length", 0), (RMUConfig, "retain_max_length", -1), (RMUConfig, "adam_eps", 0.0),
    (RMUConfig, "weight_decay", -0.1), (RMUConfig, "betas", (1.0, 0.999)), (RMUConfig, "seed", 1.5),
    (RMUConfig, "steering_coeff", True), (RMUConfig, "alpha", "1200"),
]


@pytest.mark.parametrize("cls,name,value", BAD_NUMBERS)
def test_bad_numbers_are_errors_when_the_config_is_built(cls, name, value):
    with pytest.raises(ValueError, match=name):
        cls(**{name: value})


@pytest.mark.parametrize("cls", [RMUConfig, AdaptiveRMUConfig, GradDiffConfig, NPOConfig])
def test_alpha_zero_is_allowed(cls):
    assert cls(alpha=0.0).alpha == 0.0 and cls(alpha=(0.0, 1.0)).alpha == (0.0, 1.0)


@pytest.mark.parametrize("flags", [["--coeff", "-44"], ["--coeff", "nan"], ["--alpha", "-1"],
                                   ["--method", "adaptive-rmu", "--beta", "0"], ["--forget-max-length", "-1"]])
def test_cli_rejects_bad_numbers_before_loading_anything(tmp_path, monkeypatch, capsys, flags):
    monkeypatch.setattr(unlearn_cli, "_read_data", _must_not_run)
    monkeypatch.setattr(unlearn_cli, "load_from_args", _must_not_run)
    assert main(["unlearn", "--out", str(tmp_path / "o"), *flags]) == 2
    assert "must be" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("forget,retain,message", [
    ({"bio": "one long string"}, ["r"], r"forget\['bio'\] is a single str"),
    ("one long string", ["r"], "forget is a single str"),
    ({"bio": [None, "text"]}, ["r"], r"forget\['bio'\]\[0\] is None"),
    ({"bio": ["text", 3]}, ["r"], r"forget\['bio'\]\[1\] is 3 \(int\)"),
    ([["a"], ["b", b"bytes"]], ["r"], r"forget\[1\]\[1\] is b'bytes'"),
    ({"bio": ["text"]}, "one string", "retain is a single str"),
    ({"bio": ["text"]}, ["ok", None], r"retain\[1\] is None"),
    ({"bio": ["text"]}, {"bio": [1.5]}, r"retain\['bio'\]\[0\] is 1.5"),
    ({"bio": ["text"]}, 42, "retain must be a list of texts"),
])
def test_texts_must_be_lists_of_strings(forget, retain, message):
    with pytest.raises(TypeError, match=message):
        prepare_corpora(forget, retain)


def test_empty_texts_are_dropped_with_one_warning_and_an_all_empty_corpus_is_an_error():
    with pytest.warns(UserWarning, match=r"dropped 4 empty or whitespace-only texts \(forget\['bio'\]: 2, "
                                         r"forget\['cyber'\]: 1, retain: 1\)") as record:
        data = prepare_corpora({"bio": ["", "a b", "  \n"], "cyber": ["c", "\t"]}, ["r", " "])
    assert len(record) == 1
    assert data.forget == (("a b",), ("c",)) and data.retain == (("r",), ("r",))
    with pytest.raises(ValueError, match="topic 'bio' holds only empty or whitespace-only texts"):
        prepare_corpora({"bio": ["", "   "]}, ["r"])
    with pytest.raises(ValueError, match="retain corpus paired with topic 'bio' is empty"):
        prepare_corpora({"bio": ["x"]}, [])


def test_a_run_with_empty_texts_equals_the_run_without_them(tiny_run):
    """Adaptive RMU scaled c by the BOS norm when an empty text came first; now it never sees one."""
    cfg = tiny_run.config(AdaptiveRMUConfig, beta=3.0)
    clean = unlearn(tiny_run.model, tiny_run.tokenizer, tiny_run.forget, tiny_run.retain, cfg, progress=False)
    padded = {t: ["", "   "] + v for t, v in tiny_run.forget.items()}
    with pytest.warns(UserWarning, match="dropped 5"):
        dirty = unlearn(tiny_run.model, tiny_run.tokenizer, padded, [" "] + tiny_run.retain, cfg, progress=False)
    assert dirty.coefficients == clean.coefficients
    assert all(torch.equal(dirty.trained[k], clean.trained[k]) for k in clean.trained)


JSONL_CASES = {
    "malformed first line": ('{"text": "a" oops\n' + "".join(json.dumps({"text": f"t{i}"}) + "\n" for i in range(6)), 1),
    "malformed late line": ("".join(json.dumps({"text": f"t{i}"}) + "\n" for i in range(7)) + "{broken\n", 8),
    "raw line among records": ('{"text": "a"}\n{"text": "b"}\nplain text\n', 3),
    "record without text": ('{"text": "a"}\n{"body": "b"}\n', 2),
}


@pytest.mark.parametrize("case", sorted(JSONL_CASES))
def test_jsonl_detection_reads_the_whole_file(tmp_path, case):
    content, line = JSONL_CASES[case]
    path = tmp_path / "bio-forget-corpus.jsonl"
    path.write_text(content)
    with pytest.raises(DataFormatError, match=rf"bio-forget-corpus.jsonl line {line}: .*format='lines'"):
        load_forget_corpus(path)
    assert len(load_forget_corpus(path, format="lines")) == content.count("\n")  # the explicit way out


def test_jsonl_detection_without_mixed_lines(tmp_path):
    records = write_jsonl(["a", "b c", "d"], tmp_path / "r.jsonl")
    raw = tmp_path / "raw.jsonl"
    raw.write_text('plain\n{"json": "without a text field"}\n"a JSON string"\n42\n')
    assert load_forget_corpus(records) == ["a", "b c", "d"]
    assert load_forget_corpus(raw) == ["plain", '{"json": "without a text field"}', '"a JSON string"', "42"]


def test_lengths_beyond_the_positions_are_cut_with_a_warning(tiny_tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tiny_tokenizer), n_positions=32, n_embd=32, n_layer=3,
                                       n_head=4, bos_token_id=0, eos_token_id=1)).eval()
    long_texts = {"bio": texts(4, 1, 60, 80), "cyber": texts(4, 2, 60, 80)}  # more tokens than 32 positions
    retain = texts(4, 3, 60, 80)
    explicit = RMUConfig(layer=1, steps=2, batch_size=2, forget_max_length=(64, 512), retain_max_length=128)
    with pytest.warns(UserWarning, match=r"forget_max_length \(64, 512\) and retain_max_length 128 exceed the "
                                         "model's 32 positions"):
        assert sequence_lengths(model, explicit, ("bio", "cyber")) == ((32, 32), 32)
    default = RMUConfig(layer=1, steps=2, batch_size=2)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the defaults (512 / 768, retain 512) are cut silently
        assert sequence_lengths(model, default, ("bio", "cyber")) == ((32, 32), 32)
        result = unlearn(model, tiny_tokenizer, long_texts, retain, default, progress=False)  # crashed in F.embedding
    assert result.steps == 2 and all(torch.isfinite(t).all() for t in result.trained.values())


def test_evaluate_mcq_max_length(tiny_llama, tiny_tokenizer):
    records = [{"question": f"Which host does pathogen {i} infect?", "choices": ["bats", "mice", "birds", "pigs"],
                "answer": i % 4} for i in range(4)]
    base = evaluate_mcq(tiny_llama, tiny_tokenizer, records, "biology")
    with pytest.warns(UserWarning, match="max_length=100000 is more than the model's 256 positions: using 256"):
        big = evaluate_mcq(tiny_llama, tiny_tokenizer, records, "biology", max_length=100_000)
    assert (big.logliks == base.logliks).all()
    for bad in (-1, 0, 1, 2.5, True):
        with pytest.raises(ValueError, match="max_length must be None or an int"):
            evaluate_mcq(tiny_llama, tiny_tokenizer, records, "biology", max_length=bad)


@pytest.mark.parametrize("flag", [["--limit", "-1"], ["--limit", "0"], ["--batch-size", "0"], ["--generate", "-2"]])
def test_evaluate_flags_are_checked_before_loading(monkeypatch, capsys, flag):
    monkeypatch.setattr(unlearn_cli, "load_from_args", _must_not_run)
    assert main(["evaluate", "--model", "organism", *flag]) == 2
    assert f"{flag[0]} must be at least" in capsys.readouterr().err


@pytest.mark.parametrize("prompts,bad", [([""], "[0]"), (["   \n"], "[0]"), (["a real prompt", ""], "[1]")])
def test_measure_confidence_rejects_empty_prompts(tiny_llama, tiny_tokenizer, prompts, bad):
    with pytest.raises(ValueError, match=re.escape(f"prompt(s) {bad} are empty or whitespace only")):
        measure_confidence(tiny_llama, prompts, tiny_tokenizer)


# ================================================================================== early, clear errors (item 4)
@pytest.mark.parametrize("exc", [
    FileExistsError(17, "File exists", "/data/out"),
    PermissionError(13, "Permission denied", "/data/out/model.safetensors"),
    IsADirectoryError(21, "Is a directory", "/data/report.json"),
    OSError(28, "No space left on device", "/data/out/.out.x.partial"),
    OSError(18, "Invalid cross-device link", "/a/x", None, "/b/x"),
])
def test_os_errors_are_one_line_messages_naming_the_path(monkeypatch, capsys, exc):
    def fail(args):
        raise exc

    monkeypatch.setattr(unlearn_cli, "run_unlearn", fail)
    assert main(["unlearn", "--out", "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rmu-analysis: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert exc.filename in err and exc.strerror in err and (exc.filename2 is None or exc.filename2 in err)


def test_output_checked_before_training(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(unlearn_cli, "_read_data", _must_not_run)
    monkeypatch.setattr(unlearn_cli, "load_from_args", _must_not_run)
    (tmp_path / "taken").mkdir()
    assert main(["unlearn", "--out", str(tmp_path / "taken")]) == 2
    assert f"{tmp_path / 'taken'} already exists and was not written by rmu_analysis" in capsys.readouterr().err
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # a read-only parent (root ignores chmod)
    assert main(["unlearn", "--out", str(tmp_path / "new")]) == 2
    assert f"{tmp_path} is not writable" in capsys.readouterr().err
    monkeypatch.undo()
    monkeypatch.setattr(unlearn_cli, "load_from_args", _must_not_run)
    assert main(["evaluate", "--model", "organism", "--json", str(tmp_path)]) == 2  # a directory as --json
    assert f"{tmp_path} is a directory" in capsys.readouterr().err


BAD_UTF8 = b"\xff\xfe not utf-8 \xc3("


@pytest.mark.parametrize("name,lines,loader", [
    ("cyber.jsonl", [b"first text", b"second text", BAD_UTF8], load_forget_corpus),
    ("bio.jsonl", [b'{"text": "a"}', b'{"text": "b"}', b'{"text": "' + BAD_UTF8 + b'"}'], load_forget_corpus),
    ("wiki.txt", [b"a", b"b", BAD_UTF8], load_text_corpus),
    ("wiki.jsonl", [b'{"text": "a"}', b'{"text": "b"}', b'{"text": "' + BAD_UTF8 + b'"}'], load_text_corpus),
    ("wiki.json", [b"[", b'"a",', b'"' + BAD_UTF8 + b'"]'], load_text_corpus),
    ("q.jsonl", [b"{}", b"{}", BAD_UTF8], load_mcq),
    ("q.json", [b"[", b"{},", BAD_UTF8 + b"]"], load_mcq),
    ("q.csv", [b"question,A,B,C,D,answer", b"q,a,b,c,d,A", b"q," + BAD_UTF8 + b",b,c,d,A"], load_mcq),
])
def test_decode_errors_name_file_and_line(tmp_path, name, lines, loader):
    path = tmp_path / name
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(DataFormatError, match=rf"{name} line 3: not valid UTF-8 \(byte 0x"):
        loader(path)


def test_utf16_is_an_error_not_text_with_nul_characters(tmp_path):
    path = tmp_path / "wiki.txt"
    path.write_bytes("first passage\nsecond\n".encode("utf-16-le"))  # no BOM: decodes as "UTF-8" with NULs
    with pytest.raises(DataFormatError, match="wiki.txt line 1: contains a NUL character"):
        load_text_corpus(path)


@pytest.mark.parametrize("name", ["runs/typo", "./typo", "../typo", "~/no-such-model-dir-xyz", "a/b/c", "two words"])
def test_a_missing_local_path_fails_fast_without_the_hub(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    monkeypatch.setattr("socket.getaddrinfo", _must_not_run)  # never asks the network
    t0 = time.perf_counter()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(name)
    assert time.perf_counter() - t0 < 2


def test_a_hub_name_offline_fails_fast(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(OSError, match="HF_HUB_OFFLINE is set"):
        load_model("some-org/some-model")
    assert time.perf_counter() - t0 < 10


# ================================================================================== properties of the loaders
LOADERS = [
    ("corpus.jsonl", lambda p: load_forget_corpus(p)),
    ("corpus.txt", lambda p: load_forget_corpus(p, format="lines")),
    ("wiki.txt", load_text_corpus),
    ("wiki.jsonl", load_text_corpus),
    ("wiki.json", load_text_corpus),
    ("questions.jsonl", load_mcq),
    ("questions.json", load_mcq),
    ("questions.csv", load_mcq),
]


def _load_in_fresh_dir(name: str, data: bytes, loader):
    """Write ``data`` as ``name`` beside a bystander file, load it; return (result or exception, untouched?)."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "bystander.txt").write_text("keep")
        path = root / name
        path.write_bytes(data)
        before = tree(root)
        try:
            result: object = loader(path)
        except (ValueError, OSError) as exc:  # UnicodeError and DataFormatError are ValueErrors
            result = exc
        return result, tree(root) == before


def _check_outcome(result, name: str) -> None:
    if isinstance(result, Exception):
        assert isinstance(result, DataFormatError), repr(result)
        assert name in str(result), f"the error does not name the file: {result}"
    else:
        assert isinstance(result, list)
        for item in result:
            if name.startswith("questions"):
                assert isinstance(item["question"], str) and len(item["choices"]) == 4
                assert all(isinstance(c, str) for c in item["choices"]) and item["answer"] in (0, 1, 2, 3)
            else:
                assert isinstance(item, str) and item.strip()


@PROPERTY
@given(data=st.binary(max_size=300), which=st.integers(0, len(LOADERS) - 1))
def test_random_bytes_give_a_parse_or_an_error_naming_the_file(data, which):
    name, loader = LOADERS[which]
    result, untouched = _load_in_fresh_dir(name, data, loader)
    assert untouched
    _check_outcome(result, name)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(
        st.sampled_from(["text", "question", "choices", "answer", "A", "B", "C", "D", "subject"]), children,
        max_size=6),
    max_leaves=20,
)


@PROPERTY
@given(values=st.lists(JSON, max_size=6), which=st.integers(0, len(LOADERS) - 1))
def test_random_json_gives_a_parse_or_an_error_naming_the_file(values, which):
    name, loader = LOADERS[which]
    if name.endswith(".json"):
        data = json.dumps(values).encode()
    else:
        data = "".join(json.dumps(v) + "\n" for v in values).encode()
    result, untouched = _load_in_fresh_dir(name, data, loader)
    assert untouched
    _check_outcome(result, name)
    if name == "wiki.json" and not isinstance(result, Exception):  # a correct parse: exactly the texts given
        given_texts = [v if isinstance(v, str) else v["text"] for v in values]
        assert result == [t for t in given_texts if t.strip()]


@PROPERTY
@given(text=st.lists(st.text(max_size=30), min_size=1, max_size=6).filter(lambda ts: any(t.strip() for t in ts)))
def test_jsonl_corpora_round_trip(text):
    result, untouched = _load_in_fresh_dir(
        "corpus.jsonl", "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in text).encode(),
        load_forget_corpus)
    assert untouched and result == [t for t in text if t.strip()]


ENCODINGS = ["utf-8", "utf-8-sig", "utf-16", "utf-16-le", "utf-32", "latin-1", "cp1252", "shift_jis"]


@PROPERTY
@given(lines=st.lists(st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"),
                                max_size=20), min_size=1, max_size=5),
       encoding=st.sampled_from(ENCODINGS))
def test_random_encodings_are_read_right_or_refused(lines, encoding):
    text = "\n".join(lines) + "\n"
    try:
        data = text.encode(encoding)
    except UnicodeEncodeError:
        assume(False)
    result, untouched = _load_in_fresh_dir("wiki.txt", data, load_text_corpus)
    assert untouched
    try:
        decoded = codecs.decode(data, "utf-8-sig")
    except UnicodeDecodeError:
        decoded = None
    if decoded is None or "\x00" in decoded:
        assert isinstance(result, DataFormatError) and "wiki.txt line " in str(result)
    else:  # read as UTF-8: exactly the lines of the decoded text (the text itself when it was UTF-8)
        expected = [line.rstrip("\r\n") for line in io.StringIO(decoded, newline="")]
        assert result == [line for line in expected if line.strip()]
        if encoding.startswith("utf-8"):
            assert result == [line for line in lines if line.strip()]


# ================================================================================== properties of atomic_directory
STATES = ["missing", "foreign dir", "empty dir", "toolkit dir", "file", "link"]


def _make_state(root: Path, state: str) -> Path:
    target = root / "out"
    if state == "foreign dir":
        target.mkdir()
        (target / "user.txt").write_text("user data")
    elif state == "empty dir":
        target.mkdir()
    elif state == "toolkit dir":
        marked_dir(target, "old")
    elif state == "file":
        target.write_text("a file")
    elif state == "link":
        (root / "elsewhere").mkdir()
        (root / "elsewhere" / "user.txt").write_text("user data")
        target.symlink_to(root / "elsewhere")
    return target


@PROPERTY
@given(state=st.sampled_from(STATES), overwrite=st.booleans(), body_fails=st.booleans(),
       exchange=st.booleans())
def test_atomic_directory_replaces_only_what_it_may(state, overwrite, body_fails, exchange):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "bystander.txt").write_text("keep")
        target = _make_state(root, state)
        before = tree(root)
        real_exchange = _io._exchange
        _io._exchange = real_exchange if exchange else (lambda a, b: False)
        try:
            with atomic_directory(target, overwrite=overwrite) as work:
                (work / "weights.txt").write_text("new")
                if body_fails:
                    raise RuntimeError("the work failed")
            outcome = "written"
        except (OSError, RuntimeError):
            outcome = "refused"
        finally:
            _io._exchange = real_exchange
        allowed = state == "missing" or (state == "toolkit dir" and overwrite)
        if allowed and not body_fails:
            assert outcome == "written" and (target / "weights.txt").read_text() == "new" and is_toolkit_output(target)
            after = tree(root)
            assert {k: v for k, v in after.items() if not k.startswith("out")} == \
                   {k: v for k, v in before.items() if not k.startswith("out")}
            assert sorted(p.name for p in root.iterdir()) == sorted(
                {"bystander.txt", "out"} | ({"elsewhere"} if state == "link" else set()))
        else:
            assert outcome == "refused" and tree(root) == before  # nothing changed, no temporary left
