"""Generated bad input through the whole CLI, and scans killed while they write.

The CLI runs in process on tiny models with argument lists hypothesis builds
from odd model specs, paths, head lists, numbers of every sign and size, and
prompt files with odd bytes. Whatever it is given, a command ends with exit 0,
or with exit 1 and exactly one ``error:`` line that is not an internal error;
a failed command leaves the folder it ran in exactly as it was, and a
successful one changes nothing outside its ``--out``.

Then scans are SIGKILLed at random points while they replace a run, and the
next command must find either the complete old run or the complete new one.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from headscope.cli import app
from headscope.runs import list_runs, open_run

runner = CliRunner()
FAST_SCAN = ["--prompts", "prose", "--n-prompts", "2", "--seq-len", "8", "--no-report"]
#: examples per command family (HEADSCOPE_FUZZ_SCALE=10 explores ten times as many)
SCALE = int(os.environ.get("HEADSCOPE_FUZZ_SCALE", "1"))

# --------------------------------------------------------------------------- inputs

ODD_TEXT = [
    "", " ", "[/x]", "[bold]x[/bold]", "-1", "nan", "--", "$(touch pwned)", "a\nb", "é中\u202e",
    "\x7f", "../..", "org/name", "x.gguf", "missing/folder",
]  # fmt: skip
MODELS = st.one_of(
    st.sampled_from(["tiny:llama", "tiny:gpt2"]),
    st.sampled_from(["tiny:", "tiny:llama:0", "tiny:llama:-1", "tiny:nope", "tiny:llama:x"]),
    st.sampled_from(ODD_TEXT),
)
HUGE = [str(10**9), str(2**63), str(-(2**63)), "99999999999999999999999"]
NUMBERS = st.one_of(
    st.integers(-5, 4).map(str),
    st.sampled_from(HUGE + ["nan", "inf", "-inf", "1e309", "3.5", "0x10", "abc", ""]),
)
SMALL_COUNT = st.one_of(st.sampled_from(["2", "3"]), NUMBERS)
PATHS = st.sampled_from(
    [
        "out", "out/sub", ".", "..", "/", "~", "", "file.txt", "file.txt/sub", "existing_run",
        "foreign", "empty", "out/../out2", "été", "a b", "[/x]", "-", "existing_run/samples",
    ]
)  # fmt: skip
HEADS = st.one_of(
    st.sampled_from(["L0H0", "L0H0,L1H3", "L9H9", "LxHy", "", ",", "L-1H0", "L0H0,L0H0"]),
    st.sampled_from(["l0h0", "L99999999999999999999H0", "L1H0 , L0H1", "[/x]"]),
    st.text(max_size=8),
)
PROMPT_FILES = ["odd.txt", "bytes.txt", "empty.txt", "bad.jsonl", "prose.txt", "[x].txt"]
PROMPTS = st.lists(
    st.sampled_from(["prose", "code", "nope", "missing.txt", *PROMPT_FILES]), min_size=1, max_size=2
).map(",".join)
DETECTORS = st.sampled_from(["first_token_sink", "previous_token", "nope", "", ","])
DEVICES = st.sampled_from(["cpu", "cpu", "cuda", "cuda:7", "bogus", "meta", ""])


def option(name: str, values: st.SearchStrategy[str]) -> st.SearchStrategy[list[str]]:
    """Absent, or ``[name, value]``."""
    return st.one_of(st.just([]), values.map(lambda v: [name, v]))


def flag(name: str) -> st.SearchStrategy[list[str]]:
    return st.sampled_from([[], [name]])


def command(*parts: st.SearchStrategy[list[str]]) -> st.SearchStrategy[list[str]]:
    return st.tuples(*parts).map(lambda lists: [arg for part in lists for arg in part])


SCAN = command(
    st.just(["scan", "--no-report"]),
    MODELS.map(lambda m: ["--model", m]),  # never the default, real model: not what is tested
    st.one_of(st.just(["--prompts", "prose"]), option("--prompts", PROMPTS)),
    st.one_of(st.just(["--detectors", "first_token_sink"]), option("--detectors", DETECTORS)),
    st.one_of(st.just(["--n-prompts", "2"]), st.just(["--n-prompts", "2", "--seq-len", "8"])),
    option("--n-prompts", SMALL_COUNT),
    option("--seq-len", st.one_of(st.sampled_from(["8", "600"]), NUMBERS)),
    option("--batch-size", NUMBERS),
    option("--device", DEVICES),
    option("--out", PATHS),
    flag("--force"),
)
ABLATION = command(
    st.just(["export", "ablation"]),
    HEADS.map(lambda h: [h]),
    MODELS.map(lambda m: ["--model", m]),
    option("--out", PATHS),
    option("--method", st.sampled_from(["zero", "mean", "resample", "query_scale", "scramble"])),
    option("--reference-prompts", SMALL_COUNT),
    option("--epsilon", st.one_of(NUMBERS, st.sampled_from(["1e-5", "0.5", "1", "-0.1"]))),
    flag("--no-checkpoint"),
    flag("--force"),
)
PRUNE = command(
    st.just(["export", "prune", "--calibration-prompts", "4", "--eval-prompts", "2"]),
    MODELS.map(lambda m: ["--model", m]),
    option("--out", PATHS),
    option("--drop-attn", NUMBERS),
    option("--drop-blocks", NUMBERS),
    option("--attn-layers", st.sampled_from(["0", "1,0", "9", "x", "-1", ""])),
    option("--heads", HEADS),
    option("--batch-size", NUMBERS),
    option("--eval-prompts", SMALL_COUNT),
    option("--calibration-prompts", SMALL_COUNT),
    option("--order", st.sampled_from(["similarity", "block_influence", "nope"])),
    flag("--force"),
)
READ = st.one_of(
    command(st.just(["report"]), PATHS.map(lambda p: [p]), option("--top", NUMBERS)),
    command(
        st.just(["report", "existing_run", "--matrix"]),
        DETECTORS.map(lambda d: [d]),
        option("--prompt-set", st.sampled_from(["prose", "nope", "[/x]"])),
    ),
    command(st.just(["runs"]), PATHS.map(lambda p: [p])),
    command(st.just(["report", "existing_run", "--html"]), PATHS.map(lambda p: [p])),
)


def one_change(valid: list[str], *changes: st.SearchStrategy[list[str]]):
    """A valid command with one option changed (click keeps an option's last value),
    so that commands which succeed are generated too."""
    return st.one_of(*changes).map(lambda change: [*valid, *change])


SCAN = st.one_of(
    SCAN,
    one_change(
        ["scan", "--no-report", "--model", "tiny:llama", *FAST_SCAN[:-1], "--detectors",
         "first_token_sink"],
        option("--out", PATHS), option("--batch-size", NUMBERS), option("--device", DEVICES),
        option("--prompts", PROMPTS), option("--seq-len", NUMBERS), flag("--force"),
        option("--detectors", DETECTORS), option("--model", MODELS),
    ),
)  # fmt: skip
ABLATION = st.one_of(
    ABLATION,
    one_change(
        ["export", "ablation", "L0H0", "--model", "tiny:llama", "--reference-prompts", "4"],
        option("--out", PATHS), option("--method", st.sampled_from(["mean", "resample", "x"])),
        option("--reference-prompts", NUMBERS), option("--epsilon", NUMBERS), flag("--force"),
        flag("--no-checkpoint"), option("--model", MODELS),
    ),
)  # fmt: skip
PRUNE = st.one_of(
    PRUNE,
    one_change(
        ["export", "prune", "--model", "tiny:llama", "--drop-attn", "1", "--batch-size", "4",
         "--calibration-prompts", "4", "--eval-prompts", "2"],
        option("--out", PATHS), option("--drop-blocks", NUMBERS), option("--batch-size", NUMBERS),
        option("--eval-prompts", NUMBERS), option("--heads", HEADS), flag("--force"),
        option("--order", st.sampled_from(["similarity", "block_influence", "iterative"])),
    ),
)  # fmt: skip

# --------------------------------------------------------------------------- world


@pytest.fixture(scope="module", autouse=True)
def library_logs_on_the_real_stderr():
    """transformers binds its log handler to sys.stderr when first used; inside
    CliRunner that is a stream closed after the call, so bind it out here."""
    from transformers.utils import logging as hf_logging

    hf_logging._configure_library_root_logger()


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """The folder every example starts from: a run, foreign folders, odd prompt files."""
    root = tmp_path_factory.mktemp("world")
    result = runner.invoke(
        app, ["scan", "--model", "tiny:llama", *FAST_SCAN, "--detectors", "first_token_sink",
              "--out", str(root / "existing_run")],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    (root / "file.txt").write_text("a user's file")
    (root / "foreign").mkdir()
    (root / "foreign" / "manifest.json").write_text('{"name": "a web app"}')
    (root / "foreign" / "index.html").write_text("<html></html>")
    (root / "empty").mkdir()
    (root / "odd.txt").write_bytes(
        "tab\there\x00nul\n\u202eRTL [/x] ]]\n\r\n  \nok line\n".encode()
    )
    (root / "bytes.txt").write_bytes(b"\xff\xfe\xfa not utf-8\n")
    (root / "empty.txt").write_text("\n \n")
    (root / "bad.jsonl").write_text('{"text": 3}\n')
    (root / "prose.txt").write_text("a file named like a built-in set\n")
    (root / "[x].txt").write_text("markup in a file name\n")
    return root


def snapshot(root: Path) -> dict[str, str]:
    """Every path under ``root`` with its kind and content hash."""
    found = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if path.is_symlink():
            found[key] = "link"
        elif path.is_dir():
            found[key] = "dir"
        else:
            found[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


@contextlib.contextmanager
def world(template: Path):
    """A fresh copy of the template as the working directory, with its own HOME."""
    base = Path(tempfile.mkdtemp(prefix="headscope-fuzz-"))
    root = base / "work"
    shutil.copytree(template, root)
    previous, home = os.getcwd(), os.environ.get("HOME")
    os.chdir(root)
    os.environ["HOME"] = str(base / "home")
    (base / "home").mkdir()
    try:
        yield root
    finally:
        os.chdir(previous)
        if home is None:
            os.environ.pop("HOME", None)
        else:
            os.environ["HOME"] = home
        shutil.rmtree(base, ignore_errors=True)


def out_of(args: list[str], root: Path) -> Path | None:
    """The resolved --out of a write command (or the --html file), else None."""
    for name in ("--out", "--html"):
        if name in args and args.index(name) + 1 < len(args):
            value = args[args.index(name) + 1]
            return Path(os.path.normpath(root / Path(value).expanduser()))
    if args[:1] == ["scan"]:
        return root / "runs" / "latest"
    if args[:2] == ["export", "ablation"]:
        return root / "exports" / "ablation"
    if args[:2] == ["export", "prune"]:
        return root / "exports" / "pruned"
    return None


def changes(before: dict[str, str], after: dict[str, str]) -> set[str]:
    return {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}


def fuzz(arguments: st.SearchStrategy[list[str]], examples: int):
    """A test that runs ``examples`` generated argument lists (the same ones every
    run: derandomized, so CI is stable; raise HEADSCOPE_FUZZ_SCALE to explore)."""

    @settings(
        max_examples=examples * SCALE,
        deadline=None,
        derandomize=SCALE == 1,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    @given(args=arguments)
    def test(template, args):
        ends_cleanly(template, args)

    return test


test_scan_arguments_end_cleanly = fuzz(SCAN, 30)
test_ablation_arguments_end_cleanly = fuzz(ABLATION, 20)
test_prune_arguments_end_cleanly = fuzz(PRUNE, 20)
test_read_arguments_end_cleanly = fuzz(READ, 20)


def ends_cleanly(template: Path, args: list[str]) -> None:
    with world(template) as root:
        before = snapshot(root)
        result = runner.invoke(app, args)
        after = snapshot(root)
    stderr = result.stderr
    event(f"exit {result.exit_code}")  # pytest --hypothesis-show-statistics shows the mix
    assert result.exit_code in (0, 1), (args, result.exit_code, result.output)
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        args,
        repr(result.exception),
    )
    assert "Traceback" not in stderr, (args, stderr)
    if result.exit_code == 1:
        lines = [line for line in stderr.splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("error: ")]
        assert len(errors) == 1 and lines[-1] == errors[0], (args, stderr)
        others = [line for line in lines[:-1] if not line.startswith(("warning: ", "scan "))]
        assert others == [], (args, stderr)  # only warnings and progress bars before it
        assert "internal error" not in errors[0], (args, stderr)
        assert changes(before, after) == set(), (args, changes(before, after))
        return
    out = out_of(args, root)
    allowed = set()
    if out is not None:
        relative = out.relative_to(root) if out.is_relative_to(root) else None
        if relative is not None:
            allowed = {str(relative), *(str(p) for p in relative.parents if str(p) != ".")}
    outside = {
        changed
        for changed in changes(before, after)
        if changed not in allowed and not any(changed.startswith(a + os.sep) for a in allowed)
    }
    assert outside == set(), (args, outside)


@pytest.mark.parametrize(
    "args, message",
    [
        (["scan", "--model", "[/x]", *FAST_SCAN], "not in the local Hugging Face cache"),
        (["scan", "--model", "tiny:llama", "--device", "cuda", *FAST_SCAN], "no usable CUDA"),
        (["scan", "--model", "tiny:llama", "--device", "bogus", *FAST_SCAN], "unknown device"),
        (["scan", "--model", "tiny:gpt2", "--prompts", "prose", "--n-prompts", "2",
          "--seq-len", "1000"], "learned position embeddings for only 512"),
        (["scan", "--model", "tiny:llama", "--prompts", "repeated-token", "--n-prompts", "1",
          "--seq-len", "100000"], "full attention patterns"),
        (["scan", "--model", "tiny:llama", *FAST_SCAN, "--out", "file.txt/run"],
         "is a file, not a folder"),
        (["scan", "--model", "tiny:llama", *FAST_SCAN, "--out", "foreign", "--force"],
         "not a headscope run"),
        (["scan", "--model", "tiny:llama", *FAST_SCAN, "--out", ".", "--force"],
         "current directory"),
        (["scan", "--model", "tiny:llama", "--prompts", "prose,prose.txt", "--n-prompts", "2"],
         "the name of a built-in prompt set"),
        (["export", "ablation", "L0H0", "--model", "tiny:llama", "--out", "foreign", "--force"],
         "not a headscope ablation export"),
        (["export", "prune", "--model", "tiny:llama", "--batch-size", "0"], "--batch-size"),
        (["export", "prune", "--model", "tiny:llama", "--batch-size", "-1"], "--batch-size"),
    ],
)  # fmt: skip
@pytest.mark.filterwarnings("ignore:prompt set 'repeated-token' has prompts of 100000")
def test_each_reported_case_is_one_error_line(template, args, message):
    with world(template) as root:
        before = snapshot(root)
        result = runner.invoke(app, args)
        assert snapshot(root) == before
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines


# --------------------------------------------------------------------------- kills


def scan_command(out: Path, n_prompts: int) -> list[str]:
    return [
        sys.executable, "-m", "headscope.cli", "scan", "--model", "tiny:llama",
        "--prompts", "prose", "--n-prompts", str(n_prompts), "--seq-len", "8",
        "--detectors", "first_token_sink", "--no-report", "--out", str(out), "--force",
    ]  # fmt: skip


def wait_for(condition, process: subprocess.Popen, limit_s: float = 300.0) -> bool:
    """Poll ``condition`` until it holds or ``process`` ends; a generous outer bound only."""
    stop = time.monotonic() + limit_s
    while time.monotonic() < stop:
        if condition():
            return True
        if process.poll() is not None:
            return False
        time.sleep(0.002)
    return False


def test_a_scan_killed_at_any_point_leaves_the_old_run_or_the_new_one(tmp_path):
    out = tmp_path / "run"
    first = runner.invoke(app, scan_command(out, 2)[3:])
    assert first.exit_code == 0, first.output
    rng = random.Random(13)
    for attempt in range(3):
        n_prompts = 3 + attempt  # each replacement is told apart by its prompt count
        process = subprocess.Popen(
            scan_command(out, n_prompts), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        try:
            if attempt % 2 == 0:  # kill it while it writes the new run
                wait_for(lambda: any(tmp_path.glob(".run.partial-*")), process)
                time.sleep(rng.uniform(0, 0.02))
            else:  # or at some point of its work before that
                wait_for(lambda: (tmp_path / ".run.lock").exists(), process)
                time.sleep(rng.uniform(0, 1.0))
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait()
        run = open_run(out)  # never half a run
        counts = {p["n_prompts"] for p in run.manifest["prompt_sets"]}
        assert len(counts) == 1 and counts <= {2, *range(3, n_prompts + 1)}, counts
        assert [r.name for r in list_runs(tmp_path)] == ["run"]
    # the next writer is not blocked by a dead one's lock and clears its leftovers
    finished = runner.invoke(app, scan_command(out, 9)[3:])
    assert finished.exit_code == 0, finished.output
    assert {p["n_prompts"] for p in open_run(out).manifest["prompt_sets"]} == {9}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
