"""The converted-weight cache: content keys, atomic publishing, repair, and faults.

A tiny random model stands in for a dequantized GGUF and a few bytes in
tmp_path for its source file, so nothing here needs a real GGUF.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch

from headscope.probes import loading, weight_cache
from headscope.probes.weight_cache import (
    CACHE_MARKER,
    PARTIAL_TAG,
    TRASH_PREFIX,
    CacheKey,
    converter_versions,
    key_for,
    publish,
    read,
)


@pytest.fixture
def root(tmp_path, monkeypatch) -> Path:
    """The models folder of an empty cache in tmp_path."""
    monkeypatch.setenv("HEADSCOPE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "models"


@pytest.fixture
def source(tmp_path) -> Path:
    path = tmp_path / "tiny.gguf"
    path.write_bytes(b"the bytes of a quantized model, version 1\n")
    return path


def saver(handle, *, then=None):
    """A ``write`` callable that saves ``handle``'s model and tokenizer, then calls ``then``."""

    def write(folder: Path) -> None:
        handle.model.save_pretrained(folder)
        handle.tokenizer.save_pretrained(folder)
        if then is not None:
            then(folder)

    return write


def load(folder: Path):
    return loading._load_hf_folder(folder, quiet=True)


def read_model(key: CacheKey):
    return read(key, load, errors=loading._cache_load_errors())


def same_weights(model, handle) -> bool:
    theirs = handle.model.state_dict()
    return all(torch.equal(t, theirs[name]) for name, t in model.state_dict().items())


def hidden(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("."))


# --------------------------------------------------------------------------- keys


def test_the_key_hashes_every_byte_of_the_source(source, monkeypatch):
    monkeypatch.setattr(weight_cache, "HASH_BLOCK", 7)  # many blocks, one partial
    data = bytearray(os.urandom(100))
    source.write_bytes(data)
    base = key_for("Tiny Model", [source])
    assert base.source_sha256 == hashlib.sha256(data).hexdigest()
    prefix, digest = base.name.rsplit("-", 1)
    assert prefix == "tiny-model" and len(digest) == 16 and int(digest, 16) >= 0
    names = {base.name}
    for position in (0, 50, 99):
        changed = bytearray(data)
        changed[position] ^= 1
        source.write_bytes(changed)
        names.add(key_for("Tiny Model", [source]).name)
    assert len(names) == 4
    source.write_bytes(data)
    assert key_for("Tiny Model", [source]) == base


def test_an_edit_in_the_middle_of_a_large_source_changes_the_key(source):
    """The old size-plus-first-and-last-MiB fingerprint missed exactly this."""
    data = bytearray(random.Random(0).randbytes(3 << 20))
    source.write_bytes(data)
    base = key_for("tiny", [source]).name
    data[len(data) // 2] ^= 0xFF
    source.write_bytes(data)
    assert key_for("tiny", [source]).name != base


def test_the_key_changes_with_every_converter_version(source):
    versions = converter_versions()
    assert set(versions) == {"headscope_cache_format", "transformers", "gguf"}
    assert versions["headscope_cache_format"] == weight_cache.CACHE_FORMAT == 2
    base = key_for("tiny", [source]).name
    for name in versions:
        other = {**versions, name: "0.0.0-other"}
        assert key_for("tiny", [source], versions=other).name != base, name


def test_chunked_sources_hash_in_order(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    first.write_bytes(b"part one,")
    second.write_bytes(b"part two")
    key = key_for("chunks", [first, second])
    assert key.source_sha256 == hashlib.sha256(b"part one,part two").hexdigest()
    assert key_for("chunks", [second, first]).name != key.name


# --------------------------------------------------------------------------- publish and read


def test_publish_then_read_round_trip(root, source, tiny_llama):
    key = key_for("tiny", [source])
    assert read_model(key) is None
    assert publish(key, saver(tiny_llama)) == key.path
    marker = json.loads((key.path / CACHE_MARKER).read_text())
    assert marker["source_sha256"] == key.source_sha256
    assert marker["versions"] == converter_versions()
    assert marker["source"] == str(source.resolve())
    assert marker["files"]["model.safetensors"] > 0
    assert key.path.stat().st_mode & 0o777 == 0o755  # readable by whoever shares the cache
    model, tokenizer = read_model(key)
    assert same_weights(model, tiny_llama)
    assert tokenizer.bos_token_id == tiny_llama.tokenizer.bos_token_id
    assert hidden(root) == []


def test_a_second_publisher_keeps_the_first_entry(root, source, tiny_llama):
    key = key_for("tiny", [source])

    def publish_first_meanwhile(folder: Path) -> None:
        (folder / "mine").write_text("second")
        assert publish(key, saver(tiny_llama, then=lambda f: (f / "mine").write_text("first")))

    assert publish(key, saver(tiny_llama, then=publish_first_meanwhile)) == key.path
    assert (key.path / "mine").read_text() == "first"
    assert weight_cache.entry_problem(key.path, key) is None
    assert hidden(root) == []
    assert same_weights(read_model(key)[0], tiny_llama)


def test_a_rename_that_loses_the_race_keeps_the_winner(root, source, tiny_llama, monkeypatch):
    """The name was free when checked but taken at rename time (ENOTEMPTY on Linux)."""
    key = key_for("tiny", [source])
    assert publish(key, saver(tiny_llama, then=lambda f: (f / "mine").write_text("first")))
    monkeypatch.setattr(weight_cache.os.path, "lexists", lambda path: False)
    assert publish(key, saver(tiny_llama, then=lambda f: (f / "mine").write_text("second")))
    assert (key.path / "mine").read_text() == "first"
    assert hidden(root) == []


def test_publishers_racing_in_threads_leave_one_whole_entry(root, source, tiny_llama):
    key = key_for("tiny", [source])
    template = root.parent / "template"
    saver(tiny_llama)(template)
    barrier = threading.Barrier(4)
    results, failures = [], []

    def write(folder: Path) -> None:
        for path in template.iterdir():
            (folder / path.name).write_bytes(path.read_bytes())
        barrier.wait(timeout=30)  # all four renames start together

    def run() -> None:
        try:
            results.append(publish(key, write))
        except BaseException as err:  # noqa: BLE001 (reported below)
            failures.append(err)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert failures == [] and results == [key.path] * 4
    assert weight_cache.entry_problem(key.path, key) is None
    assert sorted(p.name for p in root.iterdir()) == [key.name]
    assert same_weights(read_model(key)[0], tiny_llama)


# --------------------------------------------------------------------------- damage


def watch_deletions(monkeypatch) -> list[str]:
    """Record every path the cache deletes (a tree or a file)."""
    deleted: list[str] = []
    rmtree, unlink = weight_cache.shutil.rmtree, weight_cache.os.unlink

    def watched_rmtree(path, *args, **kwargs):
        deleted.append(str(path))
        return rmtree(path, *args, **kwargs)

    def watched_unlink(path, *args, **kwargs):
        if "dir_fd" not in kwargs:  # not rmtree's own work inside a tree
            deleted.append(str(path))
        return unlink(path, *args, **kwargs)

    monkeypatch.setattr(weight_cache.shutil, "rmtree", watched_rmtree)
    monkeypatch.setattr(weight_cache.os, "unlink", watched_unlink)
    return deleted


def test_the_marker_records_every_file_size(root, source, tiny_llama):
    key = key_for("tiny", [source])
    assert publish(key, saver(tiny_llama))
    assert weight_cache.entry_problem(key.path, key) is None
    with (key.path / "tokenizer.json").open("ab") as handle:
        handle.write(b" ")  # still valid JSON, but not what was written
    assert "tokenizer.json has" in weight_cache.entry_problem(key.path, key)
    (key.path / "config.json").unlink()
    assert "config.json is missing" in weight_cache.entry_problem(key.path, key)


def _truncate(entry: Path) -> None:
    weights = entry / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def _zero_same_size(entry: Path) -> None:  # passes the size check, fails to load
    weights = entry / "model.safetensors"
    weights.write_bytes(b"\x00" * weights.stat().st_size)


def _garbage_marker(entry: Path) -> None:
    (entry / CACHE_MARKER).write_bytes(b"\x00{not json")


def _old_format(entry: Path) -> None:
    marker = json.loads((entry / CACHE_MARKER).read_text())
    (entry / CACHE_MARKER).write_text(json.dumps({**marker, "format": 1}))


def _other_hash(entry: Path) -> None:
    marker = json.loads((entry / CACHE_MARKER).read_text())
    (entry / CACHE_MARKER).write_text(json.dumps({**marker, "source_sha256": "0" * 64}))


def _no_marker(entry: Path) -> None:
    (entry / CACHE_MARKER).unlink()


def _foreign_folder(entry: Path) -> None:
    weight_cache._remove(entry)
    entry.mkdir()
    (entry / "notes.txt").write_text("not a cache entry")


def _file_in_the_way(entry: Path) -> None:
    weight_cache._remove(entry)
    entry.write_text("a file where the entry should be")


@pytest.mark.parametrize(
    "damage",
    [
        _truncate,
        _zero_same_size,
        _garbage_marker,
        _old_format,
        _other_hash,
        _no_marker,
        _foreign_folder,
        _file_in_the_way,
    ],
)
def test_a_damaged_entry_is_removed_and_rebuilt(root, source, tiny_llama, damage, monkeypatch):
    key = key_for("tiny", [source])
    assert publish(key, saver(tiny_llama))
    damage(key.path)
    assert weight_cache.entry_problem(key.path, key) is not None or damage is _zero_same_size
    deleted = watch_deletions(monkeypatch)
    assert read_model(key) is None
    assert not os.path.lexists(key.path)
    assert all(Path(path).name.startswith(TRASH_PREFIX) for path in deleted), deleted
    assert hidden(root) == []  # the trash is emptied too
    assert publish(key, saver(tiny_llama)) == key.path
    assert same_weights(read_model(key)[0], tiny_llama)


def test_a_symlinked_entry_is_unlinked_and_its_target_kept(root, source, tiny_llama, tmp_path):
    key = key_for("tiny", [source])
    users = tmp_path / "users-own-folder"
    users.mkdir()
    (users / "precious.txt").write_text("keep me")
    root.mkdir(parents=True)
    key.path.symlink_to(users, target_is_directory=True)
    assert read_model(key) is None
    assert not os.path.lexists(key.path)
    assert (users / "precious.txt").read_text() == "keep me"


def test_a_fresh_entry_published_while_a_reader_discards_is_put_back(root, source, tiny_llama):
    """Reader A finds the entry damaged; before A removes it, B has replaced it."""
    key = key_for("tiny", [source])
    assert publish(key, saver(tiny_llama))
    _zero_same_size(key.path)

    def load_meanwhile_replaced(folder: Path):
        weight_cache.discard(folder)  # process B removes the damaged entry ...
        assert publish(key, saver(tiny_llama))  # ... and publishes a fresh one
        raise OSError("A's load failed on the damaged weights")

    assert read(key, load_meanwhile_replaced, errors=(OSError,)) is None
    assert weight_cache.entry_problem(key.path, key) is None
    assert same_weights(read_model(key)[0], tiny_llama)
    assert hidden(root) == []


# --------------------------------------------------------------------------- interruption


@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError, SystemExit])
def test_an_interrupted_conversion_leaves_no_partial_folder(root, source, tiny_llama, error):
    key = key_for("tiny", [source])

    def interrupt(folder: Path) -> None:
        assert (folder / "model.safetensors").is_file()
        raise error("interrupted while writing")

    with pytest.raises(error):
        publish(key, saver(tiny_llama, then=interrupt))
    assert list(root.iterdir()) == []


def test_a_dead_publishers_partial_folder_is_ignored_then_cleaned(root, source, tiny_llama):
    key = key_for("tiny", [source])
    dead = root / f".{key.name}{PARTIAL_TAG}deadbeef"
    saver(tiny_llama)(dead)  # complete but never renamed into place
    two_hours_ago = time.time() - 7200
    os.utime(dead, (two_hours_ago, two_hours_ago))
    (root / f"{TRASH_PREFIX}{time.time_ns() - 7200 * 10**9}-0123").mkdir()
    young = [root / f".{key.name}{PARTIAL_TAG}alive", root / f"{TRASH_PREFIX}{time.time_ns()}-4567"]
    for folder in young:
        folder.mkdir()  # a live publisher's folder, trash being emptied: left alone
    assert read_model(key) is None
    assert publish(key, saver(tiny_llama))
    assert sorted(p.name for p in root.iterdir()) == sorted([key.name, *(f.name for f in young)])


# --------------------------------------------------------------------------- unwritable


def _file_as_cache_root(tmp_path, monkeypatch) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a regular file where the cache folder should be")
    monkeypatch.setenv("HEADSCOPE_CACHE", str(blocker))


def _rename_fails(tmp_path, monkeypatch) -> None:
    def no_rename(src, dst):
        raise OSError(errno.EROFS, "Read-only file system", str(dst))

    monkeypatch.setattr(weight_cache.os, "rename", no_rename)


def _disk_full(tmp_path, monkeypatch) -> None:
    def full(folder, key):
        raise OSError(errno.ENOSPC, "No space left on device", str(folder))

    monkeypatch.setattr(weight_cache, "_write_marker", full)


@pytest.mark.parametrize("fault", [_file_as_cache_root, _rename_fails, _disk_full])
def test_an_unwritable_cache_warns_once_and_the_model_still_loads(
    root, tmp_path, monkeypatch, fault
):
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"fake gguf")
    converted = loading.load_model("tiny:llama")
    monkeypatch.setattr(loading, "_load_gguf", lambda path: (converted.model, converted.tokenizer))
    fault(tmp_path, monkeypatch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        handle = loading.load_model(str(gguf))
    messages = [str(w.message) for w in caught if "converted-weight cache" in str(w.message)]
    assert len(messages) == 1, messages
    assert str(weight_cache.models_dir()) in messages[0]
    assert handle.cache_hit is False and same_weights(handle.model, converted)
    if root.is_dir():
        assert list(root.iterdir()) == []


# --------------------------------------------------------------------------- loading.py uses it


def test_a_gguf_spec_converts_once_then_reads_the_cache(root, tmp_path, monkeypatch):
    gguf = tmp_path / "My Model.Q4.gguf"
    gguf.write_bytes(b"fake gguf, version 1")
    calls = []

    def fake_convert(path):
        calls.append(path)
        handle = loading.load_model("tiny:llama")
        return handle.model, handle.tokenizer

    monkeypatch.setattr(loading, "_load_gguf", fake_convert)
    cold = loading.load_model(str(gguf))
    warm = loading.load_model(str(gguf))
    assert (cold.cache_hit, warm.cache_hit, len(calls)) == (False, True, 1)
    assert same_weights(warm.model, cold)
    (entry,) = root.iterdir()
    assert entry.name.startswith("my-model.q4-")
    gguf.write_bytes(b"fake gguf, version 2")  # same size: a new key all the same
    assert loading.load_model(str(gguf)).cache_hit is False
    (newer,) = root.iterdir()  # the superseded entry is pruned
    assert newer.name != entry.name and len(calls) == 2


# --------------------------------------------------------------------------- pruning


def test_superseded_entries_of_the_same_source_are_pruned(
    root, source, tmp_path, tiny_llama, monkeypatch
):
    old = key_for("tiny", [source])
    assert publish(old, saver(tiny_llama))
    elsewhere = tmp_path / "other-install" / "tiny.gguf"  # another environment's copy
    elsewhere.parent.mkdir()
    elsewhere.write_bytes(b"the bytes of a quantized model, version 0\n")
    theirs = key_for("tiny", [elsewhere])
    assert publish(theirs, saver(tiny_llama))
    unrelated = key_for("tiny-chat", [source])
    assert publish(unrelated, saver(tiny_llama))
    foreign = root / "tiny-0123456789abcdef"
    foreign.mkdir()  # same prefix, no marker: a damaged leftover
    source.write_bytes(b"the bytes of a quantized model, version 2\n")
    new = key_for("tiny", [source])
    assert new.name != old.name
    deleted = watch_deletions(monkeypatch)
    assert publish(new, saver(tiny_llama))
    assert sorted(p.name for p in root.iterdir()) == sorted([new.name, theirs.name, unrelated.name])
    assert len(deleted) == 2  # the old entry and the leftover, each renamed aside first
    assert all(Path(path).name.startswith(TRASH_PREFIX) for path in deleted), deleted


# --------------------------------------------------------------------------- fault injection

PUBLISH_LOOP = r"""
import sys, time
from pathlib import Path
from headscope.probes import weight_cache

template, source = Path(sys.argv[1]), Path(sys.argv[2])

def write(folder):  # a slow copy of a saved tiny model, so kills land inside it
    for path in sorted(template.iterdir()):
        with open(path, "rb") as src, open(folder / path.name, "wb") as dst:
            while block := src.read(1 << 16):
                dst.write(block)
                dst.flush()
                time.sleep(0.002)

for i in range(1_000_000):
    source.write_bytes(b"source version %d" % i)
    weight_cache.publish(weight_cache.key_for("tiny", [source]), write)
"""


def _wait_for_new(
    root: Path, wanted, child: subprocess.Popen, log: Path, timeout: float = 90.0
) -> None:
    """Wait until a name that ``wanted`` accepts appears in ``root``."""
    before = set(os.listdir(root)) if root.is_dir() else set()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert child.poll() is None, log.read_text()
        try:
            if any(wanted(name) for name in set(os.listdir(root)) - before):
                return
        except FileNotFoundError:
            pass
        time.sleep(0.002)
    raise AssertionError("the publishing process never got there")


def _is_partial(name: str) -> bool:
    return PARTIAL_TAG in name


def _is_entry(name: str) -> bool:
    return not name.startswith(".")


def _assert_only_whole_entries(root: Path, tiny_llama) -> None:
    for folder in root.iterdir():
        if folder.name.startswith("."):
            continue  # a partial or trash folder: never read
        marker = weight_cache.read_marker(folder)
        assert marker is not None, f"half entry {folder.name}: {os.listdir(folder)}"
        key = CacheKey(
            prefix="tiny",
            source=marker["source"],
            source_sha256=marker["source_sha256"],
            versions=converter_versions(),
        )
        assert key.name == folder.name
        assert weight_cache.entry_problem(folder, key) is None
        assert same_weights(load(folder)[0], tiny_llama)


def test_killing_a_publisher_never_leaves_a_half_entry(
    root, source, tmp_path, tiny_llama, monkeypatch
):
    template = tmp_path / "template"
    saver(tiny_llama)(template)
    rng = random.Random(13)
    # kill as a partial folder appears, as an entry appears (pruning its
    # predecessor next), and at seeded random points of the loop after those
    kills = [(_is_partial, 0.0), (_is_entry, 0.0)]
    kills += [(rng.choice([_is_partial, _is_entry]), rng.uniform(0.0, 0.3)) for _ in range(3)]
    log = tmp_path / "child.log"
    for wanted, delay in kills:
        with log.open("wb") as stderr:
            child = subprocess.Popen(
                [sys.executable, "-c", PUBLISH_LOOP, str(template), str(source)],
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )
        try:
            _wait_for_new(root, wanted, child, log)
            time.sleep(delay)
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=30)
        _assert_only_whole_entries(root, tiny_llama)
        key = key_for("tiny", [source])
        found = read_model(key)
        if found is None:  # no entry for the current source: a fresh publish works
            assert publish(key, saver(tiny_llama)) == key.path
            found = read_model(key)
        assert same_weights(found[0], tiny_llama)
    # whatever the kills left behind is hidden, and cleaned once it is old
    monkeypatch.setattr(weight_cache, "PARTIAL_MAX_AGE_S", -1.0)
    monkeypatch.setattr(weight_cache, "TRASH_MAX_AGE_S", -1.0)
    weight_cache.clean_stale(root)
    assert hidden(root) == []
