"""Writing files so that nothing is lost: atomic replacement, output checks before work, and SHA-256 digests.

Every writer in diffaccel goes through `atomic_save` (or its two shorthands): the content is written to a hidden
sibling first and moved into place with one rename, so an interrupted run never leaves a half-written file that
looks complete, and a failed write leaves the previous file untouched. `check_output_path` runs before any
computing, so a bad output path is refused at once instead of after the work is done.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from .errors import InputError

_CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def shipped_or_path(name_or_path: str | os.PathLike, shipped: dict[str, Path], what: str) -> Path:
    """A file given by path, or by the name of one shipped with diffaccel (`shipped`: name -> path); an
    `InputError` naming `what` and the shipped names otherwise, or when the path is a folder."""
    path = Path(name_or_path)
    if not path.exists() and str(name_or_path) in shipped:
        path = shipped[str(name_or_path)]
    if not path.exists():
        raise InputError(f"no {what} file {str(name_or_path)!r}; shipped: {', '.join(shipped) or 'none'}")
    if path.is_dir():
        raise InputError(f"{path} is a folder, not a {what} file (.safetensors)")
    return path


def publish(tmp: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Move a finished temporary file or folder `tmp` to `path`, replacing what was there.

    A file is replaced in one rename. A folder that already exists is first renamed aside and removed only after
    the new one is in place, so at every moment either the old or the new complete folder exists on disk.
    """
    tmp, path = Path(tmp), Path(path)
    if tmp.is_dir() and path.exists():
        old = path.with_name(f".{path.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)
    return path


def atomic_save(path: str | os.PathLike, writer: Callable[[Path], object], *, directory: bool = False) -> Path:
    """Call ``writer(tmp)`` on a hidden sibling of `path` (a folder when `directory`), then `publish` it.

    The parent folder is created. If `writer` raises, the temporary is removed and `path` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        writer(tmp)
        if not directory:
            with open(tmp, "rb") as fh:  # the bytes reach the disk before the rename makes them visible
                os.fsync(fh.fileno())
        return publish(tmp, path)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically."""
    return atomic_save(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically."""
    return atomic_save(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def check_output_path(path: str | os.PathLike, *, force: bool = False, option: str = "output",
                      directory: bool = False) -> Path:
    """Refuse an output path before any work: its folder must be creatable and writable, and an existing file is
    only replaced with `force`. With `directory`, `path` is a folder to write into (created here).

    Raises `InputError` naming `option`; returns the path.
    """
    path = Path(path)
    folder = path if directory else path.parent
    if directory and path.exists() and not path.is_dir():
        raise InputError(f"{option} {path} is a file, not a folder")
    if not directory and path.is_dir():
        raise InputError(f"{option} {path} is a folder; give a file name")
    if not directory and path.exists() and not force:
        raise InputError(f"{option} {path} already exists; pass --force to replace it")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"{option}: cannot create folder {folder} ({exc.strerror or exc})") from exc
    try:  # a real probe: permission bits say nothing for root or on a read-only file system
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise InputError(f"{option}: folder {folder} is not writable ({exc.strerror or exc})") from exc
    return path


def check_new_files(paths: list[Path], *, force: bool = False, option: str = "--out") -> None:
    """Refuse to overwrite any of `paths` that exists, unless `force` (checked before any work)."""
    existing = [p for p in paths if p.exists()]
    if existing and not force:
        more = f" and {len(existing) - 1} more" if len(existing) > 1 else ""
        raise InputError(f"{option}: {existing[0]}{more} already exist(s); pass --force to replace, "
                         f"or choose another folder")
