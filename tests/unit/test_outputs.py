"""The output-folder policy: what --force may replace, the lock, the swap."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from headscope import outputs
from headscope.outputs import FolderKind, OutputError, OutputFolder, versioned_format, write_folder

KIND = FolderKind(
    name="test export",
    marker="spec.json",
    recognise=versioned_format("test-format", 2),
    entries=frozenset({"spec.json", "data.bin"}),
)


SPEC = json.dumps({"format": "test-format", "version": 1})


def write(out, value: str, *, force: bool = False) -> Path:
    with write_folder(out, KIND, force=force) as partial:
        (partial / "data.bin").write_text(value)
        (partial / "spec.json").write_text(SPEC)
    return Path(out)


def tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): p.read_text() if p.is_file() else "<dir>"
        for p in sorted(root.rglob("*"))
    }


def test_a_folder_is_written_then_replaced_only_with_force(tmp_path):
    out = write(tmp_path / "x", "old")
    with pytest.raises(OutputError, match="already holds a test export; pass --force"):
        write(out, "new")
    assert (out / "data.bin").read_text() == "old"
    write(out, "new", force=True)
    assert (out / "data.bin").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]  # no lock, no old copy


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda d: (d / "keep.txt").write_text("mine"), "holds files headscope did not write"),
        (lambda d: (d / "spec.json").unlink(), "has no readable spec.json"),
        (lambda d: (d / "spec.json").write_text("{not json"), "has no readable spec.json"),
        (lambda d: (d / "spec.json").write_text('{"format": "other", "version": 1}'), "not a"),
        (lambda d: (d / "spec.json").write_text('{"format": "test-format", "version": 3}'), "not"),
        (lambda d: (d / "spec.json").write_text('{"format": "test-format", "version": true}'), ""),
        (lambda d: (d / "spec.json").write_text("[1, 2]"), "has no readable spec.json"),
    ],
)
def test_force_never_replaces_a_folder_headscope_did_not_write(tmp_path, damage, reason):
    out = write(tmp_path / "x", "old")
    damage(out)
    before = tree(tmp_path)
    for force in (False, True):
        with pytest.raises(OutputError, match=f"is not a test export.*{reason}"):
            write(out, "new", force=force)
    assert tree(tmp_path) == before


def test_a_file_in_the_way_and_a_file_as_parent_are_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    for target, message in (
        (tmp_path / "notes.txt", "is a file, not a test export"),
        (tmp_path / "notes.txt" / "sub", "notes.txt is a file, not a folder"),
        (tmp_path / "notes.txt" / "a" / "b", "notes.txt is a file, not a folder"),
    ):
        for force in (False, True):
            with pytest.raises(OutputError, match=message):
                write(target, "new", force=force)
    assert tree(tmp_path) == {"notes.txt": "mine"}


def test_the_working_directory_its_parents_home_and_root_are_never_written(tmp_path, monkeypatch):
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    for target in (".", "..", str(tmp_path), "/", "~", str(tmp_path / "home"), "./"):
        for force in (False, True):
            with pytest.raises(OutputError, match="refusing to write"):
                outputs.check_output_folder(target, KIND, force=force)
    write("fresh", "new")  # a new folder below the working directory is fine
    assert (work / "fresh" / "data.bin").read_text() == "new"


def test_an_empty_folder_is_taken_and_a_symlink_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    write(tmp_path / "empty", "new")
    assert (tmp_path / "empty" / "data.bin").read_text() == "new"
    (tmp_path / "link").symlink_to(tmp_path / "empty")
    with pytest.raises(OutputError, match="symbolic link"):
        write(tmp_path / "link", "newer", force=True)


def test_missing_parents_are_made_and_removed_again_on_failure(tmp_path):
    target = tmp_path / "p" / "q" / "out"
    with pytest.raises(RuntimeError, match="boom"):
        with write_folder(target, KIND, force=False):
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    write(target, "new")
    assert (target / "data.bin").read_text() == "new"


def test_a_failure_while_writing_keeps_the_old_folder_whole(tmp_path):
    out = write(tmp_path / "x", "old")
    with pytest.raises(KeyboardInterrupt):
        with write_folder(out, KIND, force=True) as partial:
            (partial / "data.bin").write_text("half")
            raise KeyboardInterrupt
    assert tree(tmp_path) == {"x": "<dir>", "x/data.bin": "old", "x/spec.json": SPEC}


def test_the_swap_is_one_atomic_exchange_here(tmp_path, monkeypatch):
    calls = []
    real = outputs._exchange

    def spy(a, b):
        calls.append(real(a, b))
        return calls[-1]

    monkeypatch.setattr(outputs, "_exchange", spy)
    out = write(tmp_path / "x", "old")
    write(out, "new", force=True)
    assert calls == [True], "the first write renames; the replacement exchanges atomically"
    assert (out / "data.bin").read_text() == "new"


def test_without_exchange_two_renames_and_a_kill_between_them_is_undone(tmp_path, monkeypatch):
    monkeypatch.setattr(outputs, "_exchange", lambda a, b: False)
    out = write(tmp_path / "x", "old")
    write(out, "new", force=True)
    assert (out / "data.bin").read_text() == "new"
    # a writer killed between its two renames leaves the old folder set aside
    os.rename(out, tmp_path / ".x.old-0123abcd")
    (tmp_path / ".x.partial-89abcdef").mkdir()
    with OutputFolder(out, KIND, force=True):
        assert (out / "data.bin").read_text() == "new"  # put back under the lock
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]


def test_a_rename_that_fails_puts_the_old_folder_back(tmp_path, monkeypatch):
    monkeypatch.setattr(outputs, "_exchange", lambda a, b: False)
    out = write(tmp_path / "x", "old")
    real_rename = os.rename

    def failing_rename(src, dst):
        if ".partial-" in str(src):
            raise OSError(28, "No space left on device")
        return real_rename(src, dst)

    monkeypatch.setattr(outputs.os, "rename", failing_rename)
    with pytest.raises(OSError, match="No space"):
        write(out, "new", force=True)
    assert (out / "data.bin").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]


def test_a_second_writer_fails_at_once_and_the_lock_is_released(tmp_path):
    out = tmp_path / "x"
    with OutputFolder(out, KIND, force=False):
        with pytest.raises(OutputError, match=f"is being written by pid {os.getpid()}"):
            OutputFolder(out, KIND, force=False).__enter__()
    assert not (tmp_path / ".x.lock").exists()
    write(out, "new")


def test_a_lock_left_by_a_killed_writer_does_not_block(tmp_path):
    out = tmp_path / "x"
    holder = textwrap.dedent(
        f"""
        import sys, time
        from headscope.outputs import FolderKind, OutputFolder
        kind = FolderKind(name="t", marker="m", recognise=bool, entries=frozenset())
        with OutputFolder({str(out)!r}, kind, force=False):
            print("held", flush=True)
            time.sleep(600)
        """
    )
    child = subprocess.Popen([sys.executable, "-c", holder], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "held"
        with pytest.raises(OutputError, match=f"being written by pid {child.pid}"):
            write(out, "new")
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert (tmp_path / ".x.lock").exists()  # SIGKILL left the file; the kernel freed the lock
    write(out, "new")
    assert (out / "data.bin").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]


def test_an_unwritable_parent_is_refused_before_anything_is_made(tmp_path, monkeypatch):
    real_access = os.access
    monkeypatch.setattr(
        outputs.os, "access", lambda p, mode: False if Path(p) == tmp_path else real_access(p, mode)
    )
    with pytest.raises(OutputError, match=f"{tmp_path} is not writable"):
        write(tmp_path / "a" / "x", "new")
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_is_one_error_line_and_leaves_nothing(tmp_path, monkeypatch):
    import safetensors.torch
    from typer.testing import CliRunner

    from headscope.cli import app

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device", str(tmp_path / "run"))

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    result = CliRunner().invoke(
        app,
        ["scan", "--model", "tiny:llama", "--prompts", "prose", "--n-prompts", "2",
         "--seq-len", "8", "--detectors", "first_token_sink", "--no-report",
         "--out", str(tmp_path / "run")],
    )  # fmt: skip
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert all(line.startswith("scan ") for line in lines[:-1]), lines  # progress bars
    assert lines[-1:] == [
        f"error: cannot read or write {tmp_path / 'run'}: No space left on device; "
        "check the path, its permissions and the free disk space"
    ]
    assert list(tmp_path.iterdir()) == []
