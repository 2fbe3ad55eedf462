"""Loading the real data sets from local files (WMDP's release formats, docs/paper.md): WMDP / MMLU questions and
the forget / retain corpora.

Data formats stay apart from scoring (``evaluation.py`` does not know which benchmark it scores):

* questions: records ``{"question": str, "choices": [4 str], "answer": 0..3}`` (extra fields such as
  ``subject`` are kept), read from JSON, JSONL, parquet or CSV (with a header, or MMLU's headerless
  ``question,A,B,C,D,answer`` rows);
* forget corpora: ``bio-forget-corpus.jsonl`` (JSON lines with a ``"text"`` field) and
  ``cyber-forget-corpus.jsonl`` (each raw line is one text);
* retain text: wikitext-style passages (``.txt``/``.raw`` one per line, ``.jsonl`` with ``"text"``, parquet
  with a ``"text"`` column).

Nothing here downloads anything: pass the path of a file you have.
"""
from __future__ import annotations

import ast
import contextlib
import csv
import json
import os
import re
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import pandas as pd

from ._io import atomic_write_text

__all__ = [
    "DataFormatError",
    "LETTERS",
    "normalize_mcq_record",
    "load_mcq",
    "load_forget_corpus",
    "load_text_corpus",
    "write_mcq",
    "write_jsonl",
    "per_fact",
]

#: Answer letters of the four choices, in order.
LETTERS: tuple[str, ...] = ("A", "B", "C", "D")

_MCQ_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv")
#: Text files are read as UTF-8; a leading byte-order mark is ignored.
_ENCODING = "utf-8-sig"


class DataFormatError(ValueError):
    """A data file (or record) does not have the expected format; the message names the file and the field."""


# ----------------------------------------------------------------------------------------------------------
# multiple-choice questions
# ----------------------------------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """numpy scalars / arrays -> plain Python (so records stay JSON-serialisable)."""
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return value.tolist()
    return value


def _parse_choices(value: Any, where: str) -> list[str]:
    value = _plain(value)
    if isinstance(value, str):
        text = value.strip()
        parsed: Any = None
        try:
            parsed = json.loads(text)
        except (ValueError, RecursionError):
            try:
                parsed = ast.literal_eval(text)
            except Exception:  # any string that is not a Python literal (SyntaxError, TypeError, ...)
                parsed = None
        if not isinstance(parsed, (list, tuple)):
            raise DataFormatError(
                f"{where}: field 'choices' is a string that is not a JSON-encoded list: {value[:80]!r}"
            )
        value = parsed
    if not isinstance(value, (list, tuple)):
        raise DataFormatError(
            f"{where}: field 'choices' must be a list of 4 strings, got {type(value).__name__}"
        )
    if len(value) != 4:
        raise DataFormatError(f"{where}: field 'choices' has {len(value)} entries, expected 4")
    out = []
    for c in value:
        c = _plain(c)
        if c is None or isinstance(c, (list, dict, tuple)):
            raise DataFormatError(f"{where}: field 'choices' has an entry that is not a string: {c!r}")
        out.append(str(c))
    return out


def _parse_answer(value: Any, where: str) -> int:
    value = _plain(value)
    if isinstance(value, bool):
        raise DataFormatError(f"{where}: field 'answer' is a bool ({value}); expected 0..3 or a letter A..D")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str):
        text = value.strip()
        if text.upper() in LETTERS:
            return LETTERS.index(text.upper())
        if re.fullmatch(r"[+-]?\d+", text):
            value = int(text)
        else:
            raise DataFormatError(
                f"{where}: field 'answer' is {value!r}; expected an index 0..3, a digit string or a letter A..D"
            )
    if not isinstance(value, int):
        raise DataFormatError(
            f"{where}: field 'answer' is {value!r} ({type(value).__name__}); expected an index 0..3 or a letter A..D"
        )
    if not 0 <= value <= 3:
        raise DataFormatError(f"{where}: field 'answer' is {value}, out of range: expected 0..3 (or A..D)")
    return value


def normalize_mcq_record(record: Any, *, source: str = "records", index: int = 0) -> dict:
    """One question as ``{"question", "choices" (4 str), "answer" (0..3), **extra fields}``.

    ``choices`` may be a list, a numpy array, a JSON-encoded list, or four fields ``A``..``D``; ``answer`` may
    be an int, a digit string or a letter. Errors read like ``"wmdp-bio.jsonl record 17: field 'choices' has
    3 entries, expected 4"``.
    """
    where = f"{source} record {index}"
    if not isinstance(record, dict):
        raise DataFormatError(f"{where}: expected a mapping with fields question/choices/answer, got {type(record).__name__}")
    if "question" not in record:
        raise DataFormatError(f"{where}: field 'question' is missing (fields present: {sorted(map(str, record))})")
    question = _plain(record["question"])
    if not isinstance(question, str):
        raise DataFormatError(f"{where}: field 'question' must be a string, got {type(question).__name__}")
    letter_fields = [k for k in LETTERS if k in record] or [k for k in "abcd" if k in record]
    if "choices" in record:
        choices = _parse_choices(record["choices"], where)
        used = {"question", "choices", "answer"}
    elif len(letter_fields) == 4:
        choices = _parse_choices([record[k] for k in letter_fields], where)
        used = {"question", "answer", *letter_fields}
    else:
        raise DataFormatError(
            f"{where}: field 'choices' is missing (and no fields A, B, C, D); fields present: {sorted(map(str, record))}"
        )
    if "answer" not in record:
        raise DataFormatError(f"{where}: field 'answer' is missing (fields present: {sorted(map(str, record))})")
    answer = _parse_answer(record["answer"], where)
    out = {"question": question, "choices": choices, "answer": answer}
    for key, value in record.items():
        if key not in used:
            out[str(key)] = _plain(value)
    return out


def _check_path(path: str | os.PathLike, *, directory_ok: bool = False) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: pass the path of a local data file (nothing is downloaded)")
    if path.is_dir() and not directory_ok:
        raise IsADirectoryError(f"{path} is a directory: pass the path of one data file")
    return path


def _decode_error(path: Path, exc: UnicodeDecodeError) -> DataFormatError:
    """The first line of ``path`` that is not UTF-8, as an error naming the file and the line."""
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as bad:
                return DataFormatError(
                    f"{path.name} line {lineno}: not valid UTF-8 (byte 0x{raw[bad.start]:02x} at byte {bad.start + 1} "
                    "of the line): save the file as UTF-8"
                )
    return DataFormatError(f"{path.name}: not valid UTF-8 ({exc}): save the file as UTF-8")  # pragma: no cover


@contextlib.contextmanager
def _decoding(path: Path) -> Iterator[None]:
    """Turn a ``UnicodeDecodeError`` while reading ``path`` into an error naming the file and the line."""
    try:
        yield
    except UnicodeDecodeError as exc:
        raise _decode_error(path, exc) from exc


def _check_nul(path: Path, lineno: int, line: str) -> None:
    if "\x00" in line:
        raise DataFormatError(
            f"{path.name} line {lineno}: contains a NUL character, which UTF-8 text does not (is the file UTF-16?): "
            "save the file as UTF-8"
        )


def _check_limit(limit: int | None) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be None or a non-negative int, got {limit!r}")


def _read_json_records(path: Path, split: str | None) -> tuple[list, bool]:
    """Records of a .json file; second value: whether ``split`` was used as the key."""
    with _decoding(path):
        text = path.read_text(encoding=_ENCODING)
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise DataFormatError(f"{path.name}: not valid JSON ({exc}); JSON lines files should end in .jsonl") from exc
    if isinstance(obj, list):
        return obj, False
    if isinstance(obj, dict):
        lists = {k: v for k, v in obj.items() if isinstance(v, list)}
        if split is not None:
            if split not in lists:
                raise DataFormatError(
                    f"{path.name}: split={split!r} is not a key holding a list; keys with lists: {sorted(lists)}"
                )
            return lists[split], True
        if len(lists) == 1:
            return next(iter(lists.values())), False
        raise DataFormatError(
            f"{path.name}: a JSON object with {len(lists)} lists of records ({sorted(lists)}): "
            "pass split=KEY to choose one"
            if lists
            else f"{path.name}: a JSON object without any list of records: expected a list, or a dict holding one"
        )
    raise DataFormatError(f"{path.name}: expected a JSON list of records (or a dict holding one), got {type(obj).__name__}")


def _read_jsonl(path: Path, hint: str = "") -> Iterator[tuple[int, Any]]:
    """(line number starting at 1, parsed object) for every non-empty line."""
    with _decoding(path), path.open(encoding=_ENCODING) as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            _check_nul(path, lineno, line)
            try:
                obj = json.loads(line)
            except (ValueError, RecursionError) as exc:
                raise DataFormatError(f"{path.name} line {lineno}: not valid JSON ({exc}){hint}") from exc
            yield lineno, obj


def _read_parquet(path: Path):
    try:
        return pd.read_parquet(path)
    except ImportError as exc:
        raise ImportError(
            f"reading {path.name} needs a parquet engine: pip install pyarrow (or convert the file to JSONL). "
            f"Original error: {exc}"
        ) from exc
    except (ValueError, OSError) as exc:  # pyarrow's ArrowInvalid / ArrowIOError
        raise DataFormatError(f"{path.name}: not a readable parquet file ({exc})") from exc


def _read_csv_records(path: Path) -> list[dict]:
    try:
        with _decoding(path), path.open(encoding=_ENCODING, newline="") as fh:
            reader = csv.reader(fh)
            rows = []
            for row in reader:
                if row:
                    _check_nul(path, reader.line_num, "".join(row))
                    rows.append(row)
    except csv.Error as exc:
        raise DataFormatError(f"{path.name} line {reader.line_num}: not readable as CSV ({exc})") from exc
    if not rows:
        return []
    head = [c.strip().lower() for c in rows[0]]
    if "question" in head and "answer" in head:
        names = [c.strip() for c in rows[0]]
        records = []
        for i, row in enumerate(rows[1:]):
            if len(row) != len(names):
                raise DataFormatError(
                    f"{path.name} record {i}: has {len(row)} columns but the header names {len(names)}"
                )
            records.append(dict(zip(names, row)))
        # case-insensitive core columns: "Question" -> "question"
        for rec in records:
            for key in list(rec):
                low = key.lower()
                if low in ("question", "choices", "answer") and key != low:
                    rec[low] = rec.pop(key)
        return records
    if len(rows[0]) != 6:
        raise DataFormatError(
            f"{path.name}: the first row has {len(rows[0])} columns and is not a header: expected a header naming "
            "'question', 'choices' (or A, B, C, D) and 'answer', or six unnamed columns question,A,B,C,D,answer (MMLU)"
        )
    m = re.fullmatch(r"(.+)_(test|dev|val|validation|train)\.csv", path.name)
    subject = m.group(1) if m else None
    records = []
    for i, row in enumerate(rows):
        if len(row) != 6:
            raise DataFormatError(
                f"{path.name} record {i}: has {len(row)} columns, expected 6 (question,A,B,C,D,answer)"
            )
        rec = {"question": row[0], "choices": row[1:5], "answer": row[5]}
        if subject is not None:
            rec["subject"] = subject
        records.append(rec)
    return records


def _raw_mcq_records(path: Path, split: str | None) -> tuple[list, bool]:
    suffix = path.suffix.lower()
    if suffix == ".json":
        return _read_json_records(path, split)
    if suffix == ".jsonl":
        return [obj for _, obj in _read_jsonl(path)], False
    if suffix == ".parquet":
        return _read_parquet(path).to_dict("records"), False
    if suffix == ".csv":
        return _read_csv_records(path), False
    raise DataFormatError(
        f"{path.name}: unsupported file type {path.suffix!r}: use one of {', '.join(_MCQ_SUFFIXES)}"
    )


def load_mcq(path: str | os.PathLike, *, split: str | None = None, limit: int | None = None) -> list[dict]:
    """Multiple-choice questions (WMDP / MMLU) as normalised records.

    ``path``: a .json (list of records, or a dict holding one; ``split`` picks the key), .jsonl, .parquet or
    .csv file, or a directory (every such file directly inside, sorted by name). For other formats ``split``
    keeps the records whose ``"split"`` field equals it. MMLU's headerless CSVs get ``subject`` from the file
    name (``anatomy_test.csv`` -> ``"anatomy"``). ``limit`` keeps the first ``limit`` records.
    """
    _check_limit(limit)
    path = _check_path(path, directory_ok=True)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in _MCQ_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"{path} holds no question files ({', '.join(_MCQ_SUFFIXES)})")
        out: list[dict] = []
        for f in files:
            out.extend(load_mcq(f, split=split, limit=None if limit is None else limit - len(out)))
            if limit is not None and len(out) >= limit:
                break
        return out
    raw, split_used = _raw_mcq_records(path, split)
    records = [normalize_mcq_record(rec, source=path.name, index=i) for i, rec in enumerate(raw)]
    if split is not None and not split_used:
        if records and not all("split" in r for r in records):
            raise DataFormatError(
                f"{path.name}: split={split!r} given but the records have no 'split' field: "
                "pass split=None, or use a file that holds only that split"
            )
        records = [r for r in records if r.get("split") == split]
    return records if limit is None else records[:limit]


# ----------------------------------------------------------------------------------------------------------
# corpora
# ----------------------------------------------------------------------------------------------------------


def _strip_line_end(line: str) -> str:
    return line.rstrip("\r\n")


def _is_text_record(line: str) -> bool:
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError):
        return False
    return isinstance(obj, dict) and isinstance(obj.get("text"), str)


def _sniff_corpus_format(path: Path) -> str:
    """Read the whole file: "jsonl" when every non-empty line is a JSON object with a "text" string, "lines" when
    none is. A file with both kinds of line is an error naming one line of each (a malformed line in a JSON lines
    file must not turn every line, JSON included, into a raw text)."""
    record = other = None
    with _decoding(path), path.open(encoding=_ENCODING) as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            if _is_text_record(line):
                record = record or lineno
            else:
                other = other or (lineno, line)
            if record and other:
                break
    if record and other:
        lineno, line = other
        try:
            json.loads(line)
            reason = "valid JSON but not an object with a 'text' string"
        except (ValueError, RecursionError) as exc:
            reason = f"not valid JSON ({exc})"
        raise DataFormatError(
            f"{path.name} line {lineno}: {reason}, while line {record} is a JSON object with a 'text' string: fix "
            "that line, or pass format='lines' (unlearn --forget-format lines) to take every raw line as a text"
        )
    return "jsonl" if record else "lines"


def _keep(texts: Iterable[str], min_chars: int, limit: int | None) -> list[str]:
    out: list[str] = []
    if limit == 0:
        return out
    for text in texts:
        if not text.strip() or len(text) < min_chars:
            continue
        out.append(text)
        if limit is not None and len(out) >= limit:
            break
    return out


def _jsonl_texts(path: Path, field: str = "text", hint: str = "") -> Iterator[str]:
    for lineno, obj in _read_jsonl(path, hint):
        if not isinstance(obj, dict) or field not in obj:
            raise DataFormatError(
                f"{path.name} line {lineno}: not a JSON object with a {field!r} field{hint}"
            )
        value = obj[field]
        if not isinstance(value, str):
            raise DataFormatError(f"{path.name} line {lineno}: field {field!r} must be a string, got {type(value).__name__}")
        yield value


def _raw_lines(path: Path, keep_line_end: bool) -> Iterator[str]:
    with _decoding(path), path.open(encoding=_ENCODING, newline="") as fh:
        for lineno, line in enumerate(fh, 1):
            _check_nul(path, lineno, line)
            yield line if keep_line_end else _strip_line_end(line)


def load_forget_corpus(
    path: str | os.PathLike,
    *,
    min_chars: int = 0,
    limit: int | None = None,
    format: str = "auto",
    keep_line_end: bool = False,
) -> list[str]:
    """Forget-corpus texts (WMDP's formats): ``bio-forget-corpus.jsonl`` or ``cyber-forget-corpus.jsonl``.

    ``format``: ``"jsonl"`` reads the ``"text"`` field of each JSON line (bio); ``"lines"`` takes each raw
    line as a text, even a line that happens to be valid JSON (cyber); ``"auto"`` reads the whole file and picks
    ``"jsonl"`` when every non-empty line is a JSON object with a ``"text"`` string, ``"lines"`` when none is,
    and raises ``DataFormatError`` naming the lines when some are and some are not. Files are UTF-8 (a leading
    byte-order mark is ignored); a line that is not is an error naming it. Empty lines are skipped; texts with
    fewer than ``min_chars`` characters are dropped (the reference code keeps ``len > 50``, i.e.
    ``min_chars=51``). In ``"lines"`` mode the line end is removed unless ``keep_line_end=True`` (the reference
    code keeps it).
    """
    _check_limit(limit)
    path = _check_path(path)
    if format not in ("auto", "jsonl", "lines"):
        raise ValueError(f"format must be 'auto', 'jsonl' or 'lines', got {format!r}")
    if format == "auto":
        format = _sniff_corpus_format(path)
    hint = "; if each raw line is a text (cyber-forget-corpus style), pass format='lines'"
    texts = _jsonl_texts(path, hint=hint) if format == "jsonl" else _raw_lines(path, keep_line_end)
    return _keep(texts, min_chars, limit)


def load_text_corpus(path: str | os.PathLike, *, min_chars: int = 0, limit: int | None = None) -> list[str]:
    """Retain text (wikitext-style, as the reference uses), one passage per item; empty passages are dropped.

    ``.jsonl``: the ``"text"`` field of each line; ``.json``: a list of strings or of ``{"text": ...}``;
    ``.parquet``: the ``"text"`` column (texts kept verbatim); anything else (``.txt``, ``.raw``...): one
    passage per line, line end removed. Texts with fewer than ``min_chars`` characters are dropped.
    """
    _check_limit(limit)
    path = _check_path(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        texts: Iterable[str] = _jsonl_texts(path)
    elif suffix == ".json":
        with _decoding(path):
            text = path.read_text(encoding=_ENCODING)
        try:
            obj = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise DataFormatError(f"{path.name}: not valid JSON ({exc})") from exc
        if not isinstance(obj, list):
            raise DataFormatError(f"{path.name}: expected a JSON list of strings or of {{'text': ...}} objects")
        texts = []
        for i, item in enumerate(obj):
            if isinstance(item, dict) and isinstance(item.get("text"), str):
                texts.append(item["text"])
            elif isinstance(item, str):
                texts.append(item)
            else:
                raise DataFormatError(f"{path.name} record {i}: expected a string or an object with a 'text' string")
    elif suffix == ".parquet":
        df = _read_parquet(path)
        if "text" not in df.columns:
            raise DataFormatError(f"{path.name}: no 'text' column (columns: {list(map(str, df.columns))})")
        texts = ("" if t is None or (isinstance(t, float) and t != t) else str(t) for t in df["text"].tolist())
    else:
        texts = _raw_lines(path, keep_line_end=False)
    return _keep(texts, min_chars, limit)


# ----------------------------------------------------------------------------------------------------------
# writers (used by the organism build)
# ----------------------------------------------------------------------------------------------------------


def per_fact(records: Iterable[dict], k: int = 1, limit: int | None = None, *, name: str = "records") -> list[dict]:
    """The first ``k`` questions of each fact (records in order; each needs a ``"fact_id"``, as the organism's held-out
    wordings have), then the first ``limit`` of those: ``per_fact(questions["bio"], 1, 64)`` = one wording of each
    of the first 64 facts. Scores on one wording per fact are independent across questions."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int (questions kept per fact), got {k!r}")
    _check_limit(limit)
    records = list(records)
    missing = [i for i, r in enumerate(records) if "fact_id" not in r]
    if missing:
        raise ValueError(f"per-fact selection needs a 'fact_id' in every record of {name} (record {missing[0]} has none)")
    seen: dict[Any, int] = {}
    kept = []
    for r in records:
        seen[r["fact_id"]] = seen.get(r["fact_id"], 0) + 1
        if seen[r["fact_id"]] <= k:
            kept.append(r)
    return kept if limit is None else kept[:limit]


def write_mcq(records: Sequence[dict], path: str | os.PathLike) -> Path:
    """Atomically write question records as ``.jsonl`` (one per line) or ``.json`` (a list); returns the path.

    Records are normalised first (so what is written loads back with ``load_mcq``).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".json", ".jsonl"):
        raise ValueError(f"write_mcq writes .json or .jsonl files, got {path.name!r}")
    clean = [normalize_mcq_record(r, source="records", index=i) for i, r in enumerate(records)]
    if suffix == ".jsonl":
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in clean)
    else:
        text = json.dumps(clean, ensure_ascii=False, indent=1) + "\n"
    return atomic_write_text(path, text)


def write_jsonl(texts: Iterable[str], path: str | os.PathLike, field: str | None = "text") -> Path:
    """Atomically write texts as JSON lines ``{field: text}`` (bio-forget-corpus style) or, with
    ``field=None``, one raw text per line (cyber-forget-corpus style); returns the path."""
    lines = []
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{i}] is a {type(text).__name__}, expected str")
        if field is None:
            if "\n" in text or "\r" in text:
                raise ValueError(
                    f"texts[{i}] contains a line break: raw-line files hold one text per line; use field='text'"
                )
            lines.append(text + "\n")
        else:
            lines.append(json.dumps({field: text}, ensure_ascii=False) + "\n")
    return atomic_write_text(path, "".join(lines))
