"""Atomic file and directory writes: a crash never leaves a half-written file that looks complete.

Every directory written by :func:`atomic_directory` (``save_unlearned``, the organism build) holds a marker file,
:data:`MARKER`. ``overwrite=True`` replaces only a directory that holds it: a directory this toolkit did not write
(a user's files, the current directory) is refused, whatever the flag says.

Replacing a directory is a swap of two directory entries. On Linux (``renameat2(RENAME_EXCHANGE)``) and macOS
(``renamex_np(RENAME_SWAP)``) the swap is one atomic step: the target path always names a complete copy, the old
one or the new one. On a file system without that call, the old copy is first renamed to ``.NAME.rmu-old`` beside
the target and the new one renamed into place; between those two renames (microseconds) the target path is
missing. A crash in that window leaves the old copy at ``.NAME.rmu-old``, and the next call that writes to the
same path (or :func:`check_output_dir`) puts it back. An interrupted write can leave a hidden
``.NAME.*.partial`` directory beside the target; it is never read and is safe to delete.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterator

_UMASK = os.umask(0)
os.umask(_UMASK)

#: Name of the marker file in every directory this toolkit writes (``overwrite`` replaces only those).
MARKER = ".rmu_analysis_output"
_MARKER_TEXT = json.dumps({
    "written_by": "rmu_analysis",
    "note": "this directory was written by rmu_analysis; its --overwrite may replace it",
}, indent=2) + "\n"
_OLD_SUFFIX = ".rmu-old"


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` via a temporary file in the same directory and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_json(path: str | os.PathLike, obj: Any, **kwargs: Any) -> Path:
    """Atomically write ``obj`` as indented JSON."""
    kwargs.setdefault("indent", 2)
    return atomic_write_text(path, json.dumps(obj, **kwargs) + "\n")


# ------------------------------------------------------------------------------------------ output checks
def is_toolkit_output(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a real directory (not a link) holding the :data:`MARKER` file."""
    path = Path(path)
    return path.is_dir() and not path.is_symlink() and (path / MARKER).is_file()


def _old_path(path: Path) -> Path:
    return path.with_name(f".{path.name}{_OLD_SUFFIX}")


def _repair(path: Path) -> None:
    """Finish a swap that a crash interrupted: put the old copy back if the target is missing, else remove it."""
    old = _old_path(path)
    if not is_toolkit_output(old):
        return
    if os.path.lexists(path):
        _remove_tree(old)
    else:
        os.rename(old, path)
        warnings.warn(f"{path} was missing after an interrupted replacement: its previous copy was put back",
                      stacklevel=4)


def _remove_tree(path: Path) -> None:
    """Delete a replaced copy: the marker first, so a half-deleted copy is never taken for a complete one."""
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path / MARKER)
        shutil.rmtree(path)
    except OSError as exc:
        warnings.warn(f"could not delete the replaced copy {path} ({exc}): delete it by hand", stacklevel=4)


def _first_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if os.path.lexists(candidate):
            return candidate
    return Path(path.anchor or ".")


def check_output_dir(path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Check, before any work, that :func:`atomic_directory` can write ``path``; returns it (``~`` expanded).

    Errors (all ``OSError`` s naming the path): ``FileExistsError`` when ``path`` exists and ``overwrite`` is
    False, or exists and was not written by this toolkit (no :data:`MARKER`), or is the current directory or
    one above it; ``NotADirectoryError`` when ``path`` or a parent is a file; ``PermissionError`` when the
    directory that would hold ``path`` is not writable. Also finishes a replacement that a crash interrupted.
    """
    path = Path(path).expanduser()
    if path.name in ("", ".", ".."):
        path = path.resolve()
    _repair(path)
    if os.path.lexists(path):
        if path.is_symlink():
            raise FileExistsError(f"{path} is a symbolic link: pass the directory it points to, or another path")
        if not path.is_dir():
            raise NotADirectoryError(
                f"{path} is a file, not a directory: the output is a directory; choose another path"
            )
        here = Path.cwd().resolve()
        target = path.resolve()
        if target == here or target in here.parents:
            raise FileExistsError(
                f"{path} is the current directory or one above it: it is never replaced; choose a new directory"
            )
        if not is_toolkit_output(path):
            raise FileExistsError(
                f"{path} already exists and was not written by rmu_analysis (it has no {MARKER} file): choose "
                "another output directory; --overwrite / overwrite=True only replaces directories this toolkit "
                "wrote (delete this one yourself if you mean to replace it)"
            )
        if not overwrite:
            raise FileExistsError(f"{path} already exists: pass overwrite=True (--overwrite) to replace it")
    parent = _first_existing(path.parent)
    if not parent.is_dir():
        raise NotADirectoryError(f"{parent} is a file: cannot create the output directory {path} below it")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"{parent} is not writable: cannot create the output directory {path} there")
    return path


def check_output_file(path: str | os.PathLike) -> Path:
    """Check, before any work, that a file can be written at ``path`` (not a directory, writable parent)."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory: pass a file name (e.g. {path / 'results.json'})")
    parent = _first_existing(path.parent)
    if not parent.is_dir():
        raise NotADirectoryError(f"{parent} is a file: cannot create {path} below it")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"{parent} is not writable: cannot create {path}")
    return path


# ------------------------------------------------------------------------------------------ the swap
def _libc_swap():
    """The platform's atomic exchange of two paths, or None."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    except OSError:  # pragma: no cover - exotic platforms
        return None
    if sys.platform.startswith("linux") and hasattr(libc, "renameat2"):
        fn = libc.renameat2
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        return lambda a, b: fn(-100, a, -100, b, 2)  # AT_FDCWD, RENAME_EXCHANGE
    if sys.platform == "darwin" and hasattr(libc, "renamex_np"):  # pragma: no cover - macOS
        fn = libc.renamex_np
        fn.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_uint]
        return lambda a, b: fn(a, b, 2)  # RENAME_SWAP
    return None  # pragma: no cover


_SWAP = _libc_swap()


def _exchange(a: Path, b: Path) -> bool:
    """Swap the directory entries ``a`` and ``b`` in one atomic step; False when the system cannot."""
    if _SWAP is None:  # pragma: no cover
        return False
    return _SWAP(os.fsencode(a), os.fsencode(b)) == 0


def _swap_into_place(new: Path, path: Path) -> None:
    """Put the complete directory ``new`` at ``path``, replacing the (marked) directory there."""
    if not os.path.lexists(path):
        os.rename(new, path)
        return
    if _exchange(new, path):  # path now names the new copy, new the old one
        _remove_tree(new)
        return
    old = _old_path(path)
    os.rename(path, old)  # the window in which path is missing starts ...
    try:
        os.rename(new, path)  # ... and ends
    except BaseException:
        os.rename(old, path)
        raise
    _remove_tree(old)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it gets the :data:`MARKER` file and replaces ``path``.

    ``path`` is checked first (:func:`check_output_dir`): an existing ``path`` is replaced only when
    ``overwrite`` is True and this toolkit wrote it. On an exception the temporary directory is removed and
    ``path`` is left as it was.
    """
    path = check_output_dir(path, overwrite=overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp creates 0700
    try:
        yield tmp
        (tmp / MARKER).write_text(_MARKER_TEXT, encoding="utf-8")
        check_output_dir(path, overwrite=overwrite)  # the target may have appeared while the work ran
        _swap_into_place(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
