"""What a run reads, identified by content: the model's files and the data. Both identities are part of every run's
key (:meth:`~.specs.RunSpec.key`), so a changed weight file, corpus or question file gives new keys and a sweep
rerun into the same results directory recomputes instead of reusing a stale result.

- model ``"organism"``: the shipped files (weights, config, tokenizer, ``build_report.json``), so a rebuilt
  organism is a new model; a local directory: every top-level file except hidden ones and documentation
  (``README*``, ``LICENSE*``, ``*.md``); a hub name: its snapshot in the local Hugging Face cache if there is
  one, else the name alone. The model's name or path is in the spec as well, so the same weights under
  another path are keyed apart.
- data ``"organism"``: the shipped corpora and question files; any other data is identified by its name, and
  :func:`~.workbench.data_from_files` names its data by a hash of the loaded texts and records
  (``"files:<hash>"``): two copies of the same files under other names are the same data, one changed character
  is other data.

A file's digest is SHA-256 of its bytes, cached by (path, size, mtime, inode), in memory and in
``$XDG_CACHE_HOME/rmu_analysis/file-digests.json`` (a 7B model is hashed once, not at every sweep start). A file
modified in the last two seconds is never served from the cache (its timestamp may not have ticked yet).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Iterable

from huggingface_hub import try_to_load_from_cache

from .._io import atomic_write_json
from ..organism import ASSETS

__all__ = ["file_digest", "files_digest", "model_identity", "data_identity", "run_inputs", "content_digest", "ORGANISM"]

#: The model and data name of the built-in organism (``load_model("organism")``, ``organism_data()``).
ORGANISM = "organism"
_CHUNK = 1 << 22
_SETTLED_NS = 2_000_000_000  # a file younger than this may change again within one timestamp tick
_memory: dict[str, tuple[tuple[int, int, int], str]] = {}


def _cache_file() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "rmu_analysis" / "file-digests.json"


def _disk_cache() -> dict:
    try:
        data = json.loads(_cache_file().read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 (hex) of the file's bytes; cached by (size, mtime, inode) unless the file changed in the last 2 s."""
    name = os.path.abspath(path)
    st = os.stat(name)
    stamp = (st.st_size, st.st_mtime_ns, st.st_ino)
    settled = time.time_ns() - st.st_mtime_ns > _SETTLED_NS
    if settled:
        if name in _memory and _memory[name][0] == stamp:
            return _memory[name][1]
        cached = _disk_cache().get(name)
        if isinstance(cached, list) and len(cached) == 2 and tuple(cached[0]) == stamp:
            _memory[name] = (stamp, cached[1])
            return cached[1]
    sha = hashlib.sha256()
    with open(name, "rb") as fh:
        for block in iter(lambda: fh.read(_CHUNK), b""):
            sha.update(block)
    digest = sha.hexdigest()
    if settled:
        _memory[name] = (stamp, digest)
        if st.st_size >= 1 << 26:  # only big files are worth a disk write (64 MiB: a few tenths of a second)
            disk = _disk_cache()
            disk[name] = [list(stamp), digest]
            try:
                atomic_write_json(_cache_file(), disk, indent=None)
            except OSError:
                pass  # a read-only home: hash again next time
    return digest


def files_digest(files: Iterable[Path], root: Path) -> str:
    """One digest of several files: their paths relative to ``root`` and their contents."""
    sha = hashlib.sha256()
    for f in sorted(files):
        sha.update(f"{f.relative_to(root).as_posix()}\0{file_digest(f)}\n".encode())
    return sha.hexdigest()[:16]


def _files(root: Path) -> list[Path]:
    """The regular files directly in ``root`` (links followed), without hidden ones and documentation."""
    def skip(name: str) -> bool:
        upper = name.upper()
        return name.startswith(".") or upper.startswith(("README", "LICENSE")) or upper.endswith(".MD")

    with os.scandir(root) as entries:
        return [Path(e.path) for e in entries if e.is_file() and not skip(e.name)]


def _hub_snapshot(name: str) -> Path | None:
    """The local cache's snapshot directory of hub model ``name`` (holding its config.json), if there is one."""
    try:
        found = try_to_load_from_cache(name, "config.json")
    except ValueError:  # not a valid repo id: the name is all there is
        return None
    return Path(found).parent if isinstance(found, str) else None


def model_identity(model: str) -> str:
    """The identity of model ``model`` (a run key's part): a digest of its files, or its name when it has none
    here (a hub model not in the local cache, a test label)."""
    if model == ORGANISM:
        return "organism:" + files_digest(_files(ASSETS), ASSETS)
    path = Path(model).expanduser()
    if path.is_dir():
        return "files:" + files_digest(_files(path), path)
    snapshot = _hub_snapshot(model)
    if snapshot is not None:
        return f"hub:{model}:" + files_digest(_files(snapshot), snapshot)
    return f"name:{model}"


def data_identity(data: str) -> str:
    """The identity of data ``data`` (a run key's part): the shipped files' digest for the organism, else the
    name (:func:`~.workbench.data_from_files` puts the content's hash in it)."""
    if data == ORGANISM:
        return "organism:" + files_digest(_files(ASSETS / "data"), ASSETS / "data")
    return data


def run_inputs(model: str, data: str) -> dict[str, str]:
    """``{"model": model_identity(model), "data": data_identity(data)}``: what a run keyed with them reads."""
    return {"model": model_identity(model), "data": data_identity(data)}


def content_digest(parts: Iterable[Any]) -> str:
    """A digest of a stream of JSON-able ``parts`` (texts, question records) in canonical form: what was loaded,
    not how (file names, formats and encodings leave no trace)."""
    sha = hashlib.sha256()
    for part in parts:
        sha.update(json.dumps(part, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str).encode())
        sha.update(b"\n")
    return sha.hexdigest()[:16]
