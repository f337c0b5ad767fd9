"""The converted-weight cache: float32 safetensors of dequantized GGUFs, safe to share.

Dequantizing a GGUF takes seconds to tens of seconds, so ``loading.py`` keeps the
result under ``cache_root()/models/<prefix>-<hash16>`` and later loads read that
folder. The cache is shared by every process of every checkout of one user, so
it lives apart from the loading logic, in this small module, and keeps four
promises:

- An entry is what it says. Its name hashes the sha256 of the whole source
  file(s) and the versions of the converters (transformers, gguf, and this
  module's ``CACHE_FORMAT``); its marker file repeats them with the size of
  every file, and a read checks all of it. A size-and-ends fingerprint missed
  edits in the middle of a file; a whole-file hash costs ~0.1 s per 100 MB.
- An entry appears whole or not at all. It is built in a hidden partial folder
  beside it, the marker is written last, and the folder is renamed into place
  only when the name is free: two processes converting at once keep the first
  entry and drop the second copy. A Ctrl-C or error while writing removes the
  partial folder; one left by a killed process is never read, and is removed
  once it is an hour old.
- Nothing complete is deleted unless it was found damaged (no or a wrong
  marker, a truncated file, a load error) or superseded (an older entry for the
  same source path), and then it is first renamed aside to a hidden
  ``.trash-*`` name, so that a process reading it keeps its open files and a
  fresh entry published meanwhile under the same name is put back.
- A cache that cannot be written (read-only, a file in the way, a full disk)
  costs one warning naming the folder; the model still loads, in memory.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import importlib.metadata
import json
import os
import re
import secrets
import shutil
import stat
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

CACHE_MARKER = "headscope-cache.json"
CACHE_FORMAT = 2
HASH_BLOCK = 4 << 20  # bytes read at a time when hashing a source file
PARTIAL_TAG = ".partial-"  # hidden folders ".<name>.partial-<random>" being written
TRASH_PREFIX = ".trash-"  # hidden folders renamed aside before removal
PARTIAL_MAX_AGE_S = 3600.0  # a partial folder this old belongs to a dead process
TRASH_MAX_AGE_S = 600.0

T = TypeVar("T")


def cache_root() -> Path:
    """Where converted weights are cached ($HEADSCOPE_CACHE or ~/.cache/headscope)."""
    env = os.environ.get("HEADSCOPE_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "headscope"


def models_dir() -> Path:
    """The folder holding one sub-folder per cache entry."""
    return cache_root() / "models"


# --------------------------------------------------------------------------- keys


def sha256_files(paths: Sequence[Path]) -> str:
    """sha256 of the files' bytes, concatenated in order, read in HASH_BLOCK blocks."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as handle:
            while block := handle.read(HASH_BLOCK):
                digest.update(block)
    return digest.hexdigest()


def converter_versions() -> dict[str, Any]:
    """Versions of everything that shapes a converted entry (None: not installed)."""

    def version(package: str) -> str | None:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {
        "headscope_cache_format": CACHE_FORMAT,
        "transformers": version("transformers"),
        "gguf": version("gguf"),
    }


@dataclass(frozen=True, kw_only=True)
class CacheKey:
    """Identity of one cache entry: a readable prefix, the source and its converters."""

    prefix: str
    source: str
    source_sha256: str
    versions: dict[str, Any] = field(hash=False)

    @property
    def name(self) -> str:
        """Folder name: ``<prefix>-<16 hex digits of the content and version hash>``."""
        payload = json.dumps(
            {"source_sha256": self.source_sha256, "versions": self.versions}, sort_keys=True
        )
        return f"{self.prefix}-{hashlib.sha256(payload.encode()).hexdigest()[:16]}"

    @property
    def path(self) -> Path:
        return models_dir() / self.name


def key_for(
    prefix: str, sources: Sequence[Path], *, versions: dict[str, Any] | None = None
) -> CacheKey:
    """The key of ``sources`` (one file, or chunks hashed in order) converted under ``prefix``."""
    readable = re.sub(r"[^a-z0-9._-]+", "-", prefix.lower()).strip(".-")[:48] or "model"
    return CacheKey(
        prefix=readable,
        source=str(Path(sources[0]).resolve()),
        source_sha256=sha256_files(sources),
        versions=converter_versions() if versions is None else dict(versions),
    )


# --------------------------------------------------------------------------- reading


def read(
    key: CacheKey,
    load: Callable[[Path], T],
    *,
    errors: tuple[type[BaseException], ...] = (Exception,),
) -> T | None:
    """``load(entry folder)`` for the entry of ``key``, or None when there is none.

    A damaged or foreign entry (see ``entry_problem``) and one whose ``load``
    raises one of ``errors`` are removed, so the caller rebuilds it.
    """
    folder = key.path
    seen = _identity(folder)
    if seen is None:
        return None
    problem = entry_problem(folder, key)
    if problem is None:
        try:
            return load(folder)
        except errors:
            pass
    discard(folder, seen=seen)
    return None


def entry_problem(folder: Path, key: CacheKey) -> str | None:
    """Why ``folder`` is not a complete entry for ``key`` (None: it is one)."""
    if not folder.is_dir() or folder.is_symlink():
        return "not a folder"
    marker = read_marker(folder)
    if marker is None:
        return "no readable marker"
    expected = {
        "format": CACHE_FORMAT,
        "versions": key.versions,
        "source_sha256": key.source_sha256,
    }
    for name, value in expected.items():
        if marker.get(name) != value:
            return f"marker {name} is {marker.get(name)!r}, not {value!r}"
    files = marker.get("files")
    if not isinstance(files, dict) or not files:
        return "marker lists no files"
    for name, size in files.items():
        try:
            actual = (folder / name).stat().st_size
        except (OSError, ValueError):
            return f"{name} is missing"
        if actual != size:
            return f"{name} has {actual} bytes, not {size}"
    return None


def read_marker(folder: Path) -> dict[str, Any] | None:
    """The entry's marker as a dict, or None when it is missing or not a JSON object."""
    try:
        marker = json.loads((folder / CACHE_MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


# --------------------------------------------------------------------------- writing


def publish(key: CacheKey, write: Callable[[Path], None]) -> Path | None:
    """Build the entry of ``key`` with ``write(folder)`` and move it into place.

    Returns the entry folder (ours, or one another process published first), or
    None when the cache cannot be written (after one warning). Any exception,
    Ctrl-C included, removes the partial folder; an OSError is reported as an
    unwritable cache, anything else is raised.
    """
    root = models_dir()
    try:
        root.mkdir(parents=True, exist_ok=True)
        clean_stale(root)
        partial = Path(tempfile.mkdtemp(prefix=f".{key.name}{PARTIAL_TAG}", dir=root))
    except OSError as err:
        _warn_unwritable(root, err)
        return None
    try:
        write(partial)
        _write_marker(partial, key)
        os.chmod(partial, 0o755)  # mkdtemp's 0o700 would hide a shared cache from others
        published = _rename_if_absent(partial, key.path)
    except OSError as err:
        _remove(partial)
        _warn_unwritable(root, err)
        return None
    except BaseException:
        _remove(partial)
        raise
    if published:
        prune_superseded(key)
    else:
        _remove(partial)  # another process published first: keep theirs
    return key.path


def _write_marker(folder: Path, key: CacheKey) -> None:
    files = {
        path.relative_to(folder).as_posix(): path.stat().st_size
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }
    marker = {
        "format": CACHE_FORMAT,
        "versions": key.versions,
        "source": key.source,
        "source_sha256": key.source_sha256,
        "created": time.time(),
        "entry_id": secrets.token_hex(8),
        "files": files,
    }
    (folder / CACHE_MARKER).write_text(json.dumps(marker, indent=1, sort_keys=True))


def _rename_if_absent(partial: Path, target: Path) -> bool:
    """Rename ``partial`` to ``target`` unless something is there; True if renamed."""
    if os.path.lexists(target):
        return False
    try:
        os.rename(partial, target)
    except OSError as err:
        # Linux says ENOTEMPTY when another process renamed its entry there first
        if err.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            return False
        if os.path.lexists(target):
            return False
        raise
    return True


@contextlib.contextmanager
def scratch_folder(label: str) -> Iterator[Path]:
    """A private folder for intermediate files (an assembled GGUF), removed on exit.

    It lives in the cache folder (same disk as the entries, and ``clean_stale``
    removes it if the process is killed) or, when that cannot be written, in
    the system's temporary folder.
    """
    try:
        root = models_dir()
        root.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix=f".{label}{PARTIAL_TAG}", dir=root))
    except OSError:
        folder = Path(tempfile.mkdtemp(prefix=f"headscope-{label}-"))
    try:
        yield folder
    finally:
        _remove(folder)


# --------------------------------------------------------------------------- removing


def discard(folder: Path, *, seen: tuple[Any, ...] | None = None) -> None:
    """Remove a damaged or superseded entry: rename it aside, then delete it.

    With ``seen`` (the entry's ``_identity`` when it was found damaged), a
    different folder found under that name at removal time is a fresh entry
    another process published meanwhile; it is put back instead of deleted.
    """
    trash = folder.parent / f"{TRASH_PREFIX}{time.time_ns()}-{secrets.token_hex(4)}"
    try:
        os.rename(folder, trash)
    except FileNotFoundError:
        return  # another process removed it first
    except OSError as err:
        warnings.warn(
            f"could not remove the damaged weight-cache entry {folder} ({err}); "
            "remove it yourself, or set HEADSCOPE_CACHE to another folder",
            stacklevel=3,
        )
        return
    if seen is not None and _identity(trash) != seen:
        with contextlib.suppress(OSError):
            os.rename(trash, folder)
            return
        # another complete entry stands there now; this one is a spare copy
    _remove(trash)


def prune_superseded(key: CacheKey) -> None:
    """Remove older entries of the same prefix converted from the same source path.

    An entry of another source path (another checkout or environment sharing
    the cache, with other converter versions) is left alone, so that two of
    them do not rebuild each other's entries in turn.
    """
    pattern = re.compile(re.escape(key.prefix) + r"-[0-9a-f]{16}")
    root = models_dir()
    try:
        names = os.listdir(root)
    except OSError:
        return
    for name in names:
        if name == key.name or not pattern.fullmatch(name):
            continue
        marker = read_marker(root / name)
        if marker is not None and marker.get("source") != key.source:
            continue
        discard(root / name)


def clean_stale(root: Path) -> None:
    """Remove partial folders of dead processes (older than an hour) and old trash."""
    now = time.time()
    try:
        entries = list(os.scandir(root))
    except OSError:
        return
    for entry in entries:
        name = entry.name
        if name.startswith(TRASH_PREFIX):
            # renaming keeps a folder's mtime: the trash name carries its own time
            stamp = name.removeprefix(TRASH_PREFIX).partition("-")[0]
            born = int(stamp) / 1e9 if stamp.isdigit() else _mtime(entry)
            max_age = TRASH_MAX_AGE_S
        elif name.startswith(".") and PARTIAL_TAG in name:
            born = _mtime(entry)  # a live publisher keeps touching its folder
            max_age = PARTIAL_MAX_AGE_S
        else:
            continue
        if now - born > max_age:
            _remove(Path(entry.path))


def _mtime(entry: os.DirEntry) -> float:
    try:
        return entry.stat(follow_symlinks=False).st_mtime
    except OSError:
        return time.time()


def _identity(path: Path) -> tuple[Any, ...] | None:
    """What tells one entry from another under the same name (None: nothing there).

    The inode alone is not enough: a folder deleted and a new one created at
    once often get the same inode number; every marker has its own random id.
    """
    try:
        info = os.lstat(path)
    except OSError:
        return None
    marker = read_marker(path) if stat.S_ISDIR(info.st_mode) else None
    return info.st_dev, info.st_ino, None if marker is None else marker.get("entry_id")


def _remove(path: Path) -> None:
    """Delete a folder tree, or a file or symlink (never following a symlink)."""
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return
    if stat.S_ISDIR(mode):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            os.unlink(path)


def _warn_unwritable(root: Path, err: OSError) -> None:
    warnings.warn(
        f"cannot write the converted-weight cache under {root} ({err}); the model is "
        "loaded in memory and will be converted again next time. Make the folder "
        "writable or set HEADSCOPE_CACHE to one that is.",
        stacklevel=3,
    )
