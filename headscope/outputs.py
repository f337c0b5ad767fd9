"""Output folders: the one policy for every folder headscope writes (runs, exports).

A user's files are never deleted. ``--force`` replaces a folder only when
headscope wrote it: its marker file (a run's manifest.json, an export's spec)
parses, names the expected format and a schema version this headscope knows,
and the folder holds nothing but the entries headscope writes there. Anything
else is refused with an error that names the folder and the reason, and so is,
always, the current directory, one of its parents, the home folder (or one of
its parents) and ``/``.

Writing is swap-in-then-delete: the new folder is written into a hidden
sibling (``.<name>.partial-<random>``); when it is complete it is exchanged
with the old one in one atomic ``renameat2(RENAME_EXCHANGE)`` (two renames
where the system lacks it), and only then is the old one deleted. A failure
(or a kill) at any point leaves either the old folder or the new one complete
at ``out``; the hidden leftovers of a killed writer are cleared by the next.

A lock file beside the folder (``.<name>.lock``, created with ``O_EXCL`` and
held with ``flock``, which the kernel releases when its holder dies, even by
SIGKILL) makes a second writer to the same ``--out`` fail at once with one
line, before it loads a model, not after its whole scan.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import secrets
import shutil
import socket
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from headscope.errors import HeadscopeError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None

#: Leftovers of an interrupted write carry one of these suffixes and 8 hex digits.
_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?:partial|old)-[0-9a-f]{8}$")


@dataclass(frozen=True)
class FolderKind:
    """What one kind of headscope folder looks like, so it can be recognised.

    ``marker`` is the JSON file that proves headscope wrote the folder;
    ``recognise(marker_json)`` says whether it is this kind in a version this
    headscope reads; ``entries`` are every top-level name headscope writes there.
    """

    name: str
    marker: str
    recognise: Callable[[Mapping[str, Any]], bool]
    entries: frozenset[str]


def versioned_format(name: str, newest: int, *, version_field: str = "version"):
    """``FolderKind.recognise`` for a marker with ``format == name`` and an
    integer version this headscope reads (1 to ``newest``)."""

    def recognise(marker: Mapping[str, Any]) -> bool:
        version = marker.get(version_field)
        return (
            marker.get("format") == name
            and isinstance(version, int)
            and not isinstance(version, bool)
            and 1 <= version <= newest
        )

    return recognise


class OutputError(HeadscopeError):
    """An output folder headscope must not write to; the message names it and the fix."""


def _forbidden_reason(path: Path) -> str | None:
    """Why ``path`` (resolved) may never be replaced, or None."""
    if path == Path(path.anchor):
        return "it is the root of the file system"
    cwd = Path.cwd().resolve()
    if path == cwd or path in cwd.parents:
        return "it is the current directory or one of its parents"
    home = Path.home().expanduser().resolve()
    if path == home or path in home.parents:
        return "it is your home folder or one of its parents"
    return None


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if os.path.lexists(candidate):
            return candidate
    return Path(path.anchor)


def check_parent(out: Path | str, what: str = "output") -> Path:
    """Resolve ``out`` and check that it could be created: its nearest existing
    ancestor is a writable folder (not a file). Returns the resolved path."""
    given = Path(out)
    if not str(out).strip():
        raise OutputError(f"empty {what} path; give a folder such as runs/latest")
    path = given.expanduser().absolute()
    if given.is_symlink():
        raise OutputError(f"{what} {given} is a symbolic link; give the real path")
    path = Path(os.path.normpath(path))
    ancestor = _nearest_existing(path.parent)
    if not ancestor.is_dir():
        raise OutputError(
            f"cannot write {what} {given}: {ancestor} is a file, not a folder; choose another path"
        )
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputError(
            f"cannot write {what} {given}: {ancestor} is not writable; choose another path"
        )
    return ancestor.resolve() / path.relative_to(ancestor)


def _read_marker(path: Path) -> Mapping[str, Any] | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None


def _replaceable_reason(path: Path, kind: FolderKind) -> str | None:
    """Why the existing folder ``path`` is not one headscope wrote as ``kind``, or None."""
    marker = _read_marker(path / kind.marker)
    if marker is None:
        return f"it has no readable {kind.marker}"
    try:
        recognised = kind.recognise(marker)
    except (AttributeError, TypeError, ValueError, KeyError):
        recognised = False
    if not recognised:
        return f"its {kind.marker} is not a {kind.name} in a format this headscope writes"
    foreign = sorted(
        entry.name
        for entry in path.iterdir()
        if entry.name not in kind.entries and not _LEFTOVER.match(entry.name)
    )
    if foreign:
        more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        shown = ", ".join(foreign[:3]) + more
        return f"it holds files headscope did not write ({shown})"
    return None


def check_output_folder(out: Path | str | OutputFolder, kind: FolderKind, *, force: bool) -> Path:
    """Refuse an output folder headscope must not write to; returns the resolved path.

    Nothing is created. Call it before expensive work; ``claim_output`` calls
    it again under the lock.
    """
    if isinstance(out, OutputFolder):
        return out.path  # checked when it was claimed, and held since
    given = Path(out)
    path = check_parent(out, what=f"{kind.name} folder")
    reason = _forbidden_reason(path)
    if reason is not None:
        raise OutputError(f"refusing to write a {kind.name} at {given}: {reason}")
    if not os.path.lexists(path):
        return path
    if not path.is_dir():
        raise OutputError(
            f"{given} exists and is a file, not a {kind.name}; headscope never replaces it: "
            "choose another --out"
        )
    if not any(entry for entry in path.iterdir() if not _LEFTOVER.match(entry.name)):
        return path  # an empty folder: nothing to lose
    reason = _replaceable_reason(path, kind)
    if reason is not None:
        raise OutputError(
            f"{given} already exists and is not a {kind.name} ({reason}); "
            "headscope never deletes it, not even with --force: choose another --out"
        )
    if not force:
        raise OutputError(
            f"{given} already holds a {kind.name}; pass --force to replace it "
            "or choose another --out"
        )
    return path


# --------------------------------------------------------------------------- lock


def _lock_path(path: Path) -> Path:
    return path.parent / f".{path.name}.lock"


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, 512, 0).decode("utf-8", "replace")
        info = json.loads(text)
        return f"pid {info['pid']} on {info['host']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


@contextlib.contextmanager
def _locked(path: Path, given: Path) -> Iterator[None]:
    """Hold ``.<name>.lock`` beside ``path``; a second holder fails at once."""
    if fcntl is None:  # pragma: no cover - not POSIX: no cross-process lock
        yield
        return
    lock = _lock_path(path)
    for _ in range(5):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
        except FileExistsError:
            try:
                fd = os.open(lock, os.O_RDWR)
            except FileNotFoundError:
                continue  # released between our two calls: try again
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise OutputError(
                f"{given} is being written by {holder}; wait for it to finish "
                "or choose another --out"
            ) from None
        try:
            same_file = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same_file = False
        if same_file:
            break
        os.close(fd)  # the holder removed it as we opened it: take a fresh one
    else:  # pragma: no cover - only under heavy contention
        raise OutputError(f"{given}: could not take the lock {lock}; try again")
    try:
        info = {"pid": os.getpid(), "host": socket.gethostname()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)
        os.close(fd)


# --------------------------------------------------------------------------- swap


def _renameat2() -> Callable[[Path, Path], bool]:
    """An atomic exchange of two paths where the C library offers one."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.renameat2
    except (OSError, AttributeError):  # pragma: no cover - not glibc >= 2.28
        return lambda a, b: False
    at_fdcwd, rename_exchange = -100, 2

    def exchange(a: Path, b: Path) -> bool:
        if function(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
            return True
        code = ctypes.get_errno()
        if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
            return False  # this file system cannot exchange: fall back to two renames
        raise OSError(code, os.strerror(code), str(b))

    return exchange


_exchange = _renameat2()


def _swap_in(partial: Path, path: Path) -> None:
    """Put the complete folder ``partial`` at ``path``; the old one is deleted last."""
    if not os.path.lexists(path):
        os.rename(partial, path)
        return
    if _exchange(partial, path):  # partial now holds the old folder
        shutil.rmtree(partial, ignore_errors=True)
        return
    old = path.parent / f".{path.name}.old-{secrets.token_hex(4)}"
    os.rename(path, old)
    try:
        os.rename(partial, path)
    except BaseException:
        os.rename(old, path)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _clear_leftovers(path: Path) -> None:
    """Under the lock: finish or undo what a killed writer left beside ``path``.

    An old folder set aside by the two-rename fallback goes back when ``path``
    is missing; every other leftover (an unfinished new folder, an old one
    whose deletion was cut short) is removed.
    """
    leftovers = [
        entry
        for entry in path.parent.iterdir()
        if (m := _LEFTOVER.match(entry.name)) and m.group("name") == path.name
    ]
    for entry in leftovers:
        if entry.name.startswith(f".{path.name}.old-") and not os.path.lexists(path):
            os.rename(entry, path)
        else:
            shutil.rmtree(entry, ignore_errors=True)


class OutputFolder:
    """A claimed output folder: checked, locked, written atomically.

    ::

        with OutputFolder(out, RUN_FOLDER, force=force) as folder:
            ...  # long work; a second writer to ``out`` fails at once
            with folder.writing() as partial:
                ...  # write files into ``partial``; at the end it becomes ``out``
    """

    def __init__(self, out: Path | str, kind: FolderKind, *, force: bool) -> None:
        self.given = Path(out)
        self.kind = kind
        self.force = force
        self.path = check_output_folder(out, kind, force=force)
        self._stack: contextlib.ExitStack | None = None
        self._created: list[Path] = []

    def __enter__(self) -> OutputFolder:
        stack = contextlib.ExitStack()
        try:
            missing = [p for p in (self.path.parent, *self.path.parent.parents)]
            missing = [p for p in missing if not os.path.lexists(p)]
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._created = missing  # deepest first: removed on failure when still empty
            stack.enter_context(_locked(self.path, self.given))
            _clear_leftovers(self.path)
            check_output_folder(self.path, self.kind, force=self.force)  # again, under the lock
        except BaseException:
            stack.close()
            self._remove_created()
            raise
        self._stack = stack
        return self

    def __exit__(self, kind, value, traceback) -> None:
        assert self._stack is not None
        self._stack.close()
        self._stack = None
        if value is not None and not os.path.lexists(self.path):
            self._remove_created()

    def _remove_created(self) -> None:
        for folder in self._created:
            with contextlib.suppress(OSError):
                folder.rmdir()

    @contextlib.contextmanager
    def writing(self) -> Iterator[Path]:
        """A hidden folder beside ``out`` to write into; it becomes ``out`` on success."""
        if self._stack is None:
            raise HeadscopeError("OutputFolder.writing() needs the folder claimed (use `with`)")
        partial = self.path.parent / f".{self.path.name}.partial-{secrets.token_hex(4)}"
        partial.mkdir()
        try:
            yield partial
            _swap_in(partial, self.path)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise


@contextlib.contextmanager
def write_folder(out: Path | str | OutputFolder, kind: FolderKind, *, force: bool):
    """Write ``out`` atomically: yields the hidden folder to fill. ``out`` may be an
    ``OutputFolder`` the caller claimed before its long work; a path is claimed here."""
    if isinstance(out, OutputFolder):
        with out.writing() as partial:
            yield partial
        return
    with OutputFolder(out, kind, force=force) as folder, folder.writing() as partial:
        yield partial
