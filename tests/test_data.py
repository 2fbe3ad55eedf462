"""data.py: WMDP / MMLU question files and the forget / retain corpora (docs/paper.md), in every format."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from rmu_analysis import data
from rmu_analysis.data import (
    DataFormatError,
    load_forget_corpus,
    load_mcq,
    load_text_corpus,
    normalize_mcq_record,
    write_jsonl,
    write_mcq,
)

RECORDS = [
    {"question": "Which host does the pathogen infect?", "choices": ["bats", "mice", "birds", "pigs"], "answer": 2,
     "subject": "biology"},
    {"question": "Where is Varon, \"really\"?", "choices": ["on the river Elm", "in, the hills", "by the sea", "1"],
     "answer": 0, "subject": "geography"},
    {"question": "Multi\nline question?", "choices": ["a", "b", "c", "d"], "answer": 3, "subject": "biology"},
]


def _with_answers(answer_style):
    out = []
    for r in RECORDS:
        r = dict(r)
        r["answer"] = {"int": r["answer"], "digit": str(r["answer"]), "letter": "ABCD"[r["answer"]]}[answer_style]
        out.append(r)
    return out


# ------------------------------------------------------------------------------------------------ questions


@pytest.mark.parametrize("answer_style", ["int", "digit", "letter"])
def test_jsonl_round_trip(tmp_path, answer_style):
    path = tmp_path / "wmdp-bio.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _with_answers(answer_style)) + "\n")
    assert load_mcq(path) == RECORDS
    assert load_mcq(path, limit=2) == RECORDS[:2]
    assert load_mcq(path, limit=0) == []


def test_json_list_and_dict(tmp_path):
    p = tmp_path / "q.json"
    p.write_text(json.dumps(_with_answers("letter")))
    assert load_mcq(p) == RECORDS
    p.write_text(json.dumps({"meta": "x", "data": RECORDS}))
    assert load_mcq(p) == RECORDS  # the only list in the dict
    p.write_text(json.dumps({"test": RECORDS, "dev": RECORDS[:1]}))
    assert load_mcq(p, split="dev") == RECORDS[:1]
    with pytest.raises(DataFormatError, match=r"q.json: .*pass split=KEY"):
        load_mcq(p)
    with pytest.raises(DataFormatError, match="split='val' is not a key"):
        load_mcq(p, split="val")


def test_split_field_filter(tmp_path):
    p = tmp_path / "q.jsonl"
    recs = [dict(r, split=s) for r, s in zip(RECORDS, ["test", "dev", "test"])]
    p.write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert [r["question"] for r in load_mcq(p, split="test")] == [RECORDS[0]["question"], RECORDS[2]["question"]]
    p.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    with pytest.raises(DataFormatError, match="no 'split' field"):
        load_mcq(p, split="test")


def test_csv_with_header(tmp_path):
    p = tmp_path / "q.csv"
    frame = pd.DataFrame([dict(r, choices=json.dumps(r["choices"])) for r in _with_answers("letter")])
    frame.to_csv(p, index=False)
    assert load_mcq(p) == RECORDS
    # columns A..D instead of a choices list
    rows = [{"question": r["question"], "A": r["choices"][0], "B": r["choices"][1], "C": r["choices"][2],
             "D": r["choices"][3], "answer": r["answer"], "subject": r["subject"]} for r in RECORDS]
    pd.DataFrame(rows).to_csv(p, index=False)
    assert load_mcq(p) == RECORDS


def test_mmlu_headerless_csv(tmp_path):
    p = tmp_path / "anatomy_test.csv"
    rows = [[r["question"], *r["choices"], "ABCD"[r["answer"]]] for r in RECORDS]
    pd.DataFrame(rows).to_csv(p, index=False, header=False)
    got = load_mcq(p)
    assert [{k: v for k, v in g.items() if k != "subject"} for g in got] == [
        {k: v for k, v in r.items() if k != "subject"} for r in RECORDS
    ]
    assert {g["subject"] for g in got} == {"anatomy"}  # MMLU file name -> subject


def test_directory(tmp_path):
    write_mcq(RECORDS[:2], tmp_path / "a.jsonl")
    write_mcq(RECORDS[2:], tmp_path / "b.json")
    (tmp_path / "notes.md").write_text("ignored")
    assert load_mcq(tmp_path) == RECORDS
    assert load_mcq(tmp_path, limit=1) == RECORDS[:1]


def test_parquet_numpy_choices(tmp_path):
    # what pandas gives for a parquet list column: numpy arrays and numpy integers
    raw = {"question": "q?", "choices": np.array(["a", "b", "c", "d"], dtype=object), "answer": np.int64(1),
           "subject": "s"}
    assert normalize_mcq_record(raw) == {"question": "q?", "choices": ["a", "b", "c", "d"], "answer": 1, "subject": "s"}
    pytest.importorskip("pyarrow")
    p = tmp_path / "q.parquet"
    pd.DataFrame(RECORDS).to_parquet(p)
    assert load_mcq(p) == RECORDS


def test_parquet_branch_with_array_columns(tmp_path, monkeypatch):
    """The parquet path without a parquet engine: feed the frame pandas would return (numpy array choices)."""
    frame = pd.DataFrame({
        "question": [r["question"] for r in RECORDS],
        "choices": [np.array(r["choices"], dtype=object) for r in RECORDS],
        "answer": np.array([r["answer"] for r in RECORDS], dtype=np.int64),
        "subject": [r["subject"] for r in RECORDS],
    })
    monkeypatch.setattr(data, "_read_parquet", lambda path: frame)
    p = tmp_path / "test-00000-of-00001.parquet"
    p.write_bytes(b"")
    got = load_mcq(p)
    assert got == RECORDS
    assert type(got[0]["answer"]) is int and type(got[0]["choices"]) is list
    json.dumps(got)  # plain Python, serialisable


def test_parquet_without_engine_says_what_to_install(tmp_path, monkeypatch):
    p = tmp_path / "q.parquet"
    p.write_bytes(b"PAR1")

    def no_engine(*a, **k):
        raise ImportError("Unable to find a usable engine")

    monkeypatch.setattr(pd, "read_parquet", no_engine)
    with pytest.raises(ImportError, match="pip install pyarrow"):
        load_mcq(p)


@pytest.mark.parametrize(
    "record, message",
    [
        ({"question": "q", "choices": ["a", "b", "c"], "answer": 0}, "field 'choices' has 3 entries, expected 4"),
        ({"choices": ["a", "b", "c", "d"], "answer": 0}, "field 'question' is missing"),
        ({"question": "q", "answer": 0}, "field 'choices' is missing"),
        ({"question": "q", "choices": ["a", "b", "c", "d"]}, "field 'answer' is missing"),
        ({"question": "q", "choices": ["a", "b", "c", "d"], "answer": "E"}, "field 'answer' is 'E'"),
        ({"question": "q", "choices": ["a", "b", "c", "d"], "answer": 4}, "field 'answer' is 4, out of range"),
        ({"question": "q", "choices": ["a", "b", "c", "d"], "answer": True}, "field 'answer' is a bool"),
        ({"question": "q", "choices": "not a list", "answer": 0}, "field 'choices' is a string that is not a JSON-encoded list"),
        ({"question": 3, "choices": ["a", "b", "c", "d"], "answer": 0}, "field 'question' must be a string"),
    ],
)
def test_errors_name_file_record_and_field(tmp_path, record, message):
    p = tmp_path / "wmdp-bio.jsonl"
    lines = [json.dumps(RECORDS[0])] * 17 + [json.dumps(record)]
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataFormatError, match=f"wmdp-bio.jsonl record 17: {message}"):
        load_mcq(p)


def test_file_level_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_mcq(tmp_path / "nope.jsonl")
    p = tmp_path / "q.txt"
    p.write_text("x")
    with pytest.raises(DataFormatError, match=r"q.txt: unsupported file type '.txt'"):
        load_mcq(p)
    p = tmp_path / "q.jsonl"
    p.write_text(json.dumps(RECORDS[0]) + "\n{broken\n")
    with pytest.raises(DataFormatError, match="q.jsonl line 2: not valid JSON"):
        load_mcq(p)
    p = tmp_path / "bad.csv"
    p.write_text("a,b,c\n1,2,3\n")
    with pytest.raises(DataFormatError, match="bad.csv: the first row has 3 columns"):
        load_mcq(p)
    with pytest.raises(ValueError, match="limit must be"):
        load_mcq(tmp_path / "q.jsonl", limit=-1)


def test_write_mcq_validates_and_round_trips(tmp_path):
    for name in ("out.jsonl", "out.json"):
        path = write_mcq(_with_answers("letter"), tmp_path / name)
        assert load_mcq(path) == RECORDS
    with pytest.raises(DataFormatError, match="record 0: field 'choices' has 2 entries"):
        write_mcq([{"question": "q", "choices": ["a", "b"], "answer": 0}], tmp_path / "bad.jsonl")
    assert not (tmp_path / "bad.jsonl").exists()
    with pytest.raises(ValueError, match="writes .json or .jsonl"):
        write_mcq(RECORDS, tmp_path / "out.csv")
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporary files


# ------------------------------------------------------------------------------------------------ corpora

TEXTS = ["The pathogen infects bats.", '{"looks": "like json but has no text field"}', "Short", "Varon lies on Elm."]


def test_bio_and_cyber_forget_formats(tmp_path):
    bio = write_jsonl(TEXTS, tmp_path / "bio-forget-corpus.jsonl")
    cyber = write_jsonl(TEXTS, tmp_path / "cyber-forget-corpus.jsonl", field=None)
    assert load_forget_corpus(bio) == TEXTS
    assert load_forget_corpus(cyber) == TEXTS  # a JSON-looking line without "text" stays a raw text
    assert load_forget_corpus(bio, format="lines")[0] == json.dumps({"text": TEXTS[0]})
    with pytest.raises(DataFormatError, match=r"cyber-forget-corpus.jsonl line 1: .*pass format='lines'"):
        load_forget_corpus(cyber, format="jsonl")
    assert load_forget_corpus(bio, min_chars=6) == [t for t in TEXTS if len(t) >= 6]
    assert load_forget_corpus(cyber, limit=2) == TEXTS[:2]
    assert load_forget_corpus(cyber, keep_line_end=True)[0] == TEXTS[0] + "\n"  # as the reference code reads it
    with pytest.raises(ValueError, match="format must be"):
        load_forget_corpus(bio, format="csv")


def test_forget_corpus_sniffing_and_empty_lines(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text("\n".join(json.dumps({"text": f"t{i}"}) for i in range(3)) + "\n\n   \n")
    assert load_forget_corpus(p) == ["t0", "t1", "t2"]
    p.write_text('{"text": "a"}\nplain line\n')
    with pytest.raises(DataFormatError, match="c.jsonl line 2: .* while line 1 is a JSON object"):
        load_forget_corpus(p)  # mixed: an error, not every line read as raw text
    assert load_forget_corpus(p, format="lines") == ['{"text": "a"}', "plain line"]
    p.write_text("")
    assert load_forget_corpus(p) == []
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_forget_corpus(tmp_path / "missing.jsonl")


def test_text_corpus_formats(tmp_path):
    txt = tmp_path / "wiki.test.raw"
    txt.write_text(" = Valkyria = \n\n Senjō no Valkyria 3 is a game . \n \n")
    assert load_text_corpus(txt) == [" = Valkyria = ", " Senjō no Valkyria 3 is a game . "]
    assert load_text_corpus(txt, min_chars=20) == [" Senjō no Valkyria 3 is a game . "]
    js = write_jsonl(["a", "", "b c"], tmp_path / "w.jsonl")
    assert load_text_corpus(js) == ["a", "b c"]
    (tmp_path / "w.json").write_text(json.dumps(["x", {"text": "y"}, " "]))
    assert load_text_corpus(tmp_path / "w.json", limit=5) == ["x", "y"]
    with pytest.raises(FileNotFoundError, match="gone.txt"):
        load_text_corpus(tmp_path / "gone.txt")


def test_text_corpus_parquet(tmp_path, monkeypatch):
    frame = pd.DataFrame({"text": [" = A = \n", "", "body text\n", None]})
    monkeypatch.setattr(data, "_read_parquet", lambda path: frame)
    p = tmp_path / "wikitext.parquet"
    p.write_bytes(b"")
    assert load_text_corpus(p) == [" = A = \n", "body text\n"]  # kept verbatim, empty rows dropped
    monkeypatch.setattr(data, "_read_parquet", lambda path: frame.rename(columns={"text": "content"}))
    with pytest.raises(DataFormatError, match="no 'text' column"):
        load_text_corpus(p)


def test_write_jsonl_raw_lines_reject_newlines(tmp_path):
    with pytest.raises(ValueError, match="contains a line break"):
        write_jsonl(["one\ntwo"], tmp_path / "x.jsonl", field=None)
    with pytest.raises(TypeError, match=r"texts\[0\] is a int"):
        write_jsonl([3], tmp_path / "x.jsonl")


def test_per_fact_keeps_the_first_wordings_of_each_fact():
    from rmu_analysis.data import per_fact

    recs = [{"fact_id": f, "w": w} for w in range(3) for f in ("a", "b", "c")]  # wordings interleaved across facts
    assert [(r["fact_id"], r["w"]) for r in per_fact(recs)] == [("a", 0), ("b", 0), ("c", 0)]
    assert len(per_fact(recs, 2)) == 6 and all(r["w"] < 2 for r in per_fact(recs, 2))
    assert [r["fact_id"] for r in per_fact(recs, 1, 2)] == ["a", "b"]
    with pytest.raises(ValueError, match="fact_id"):
        per_fact(recs + [{"w": 9}])
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="positive int"):
            per_fact(recs, bad)
