"""The built-in prompt sets, prompt files, and name resolution for the CLI.

Every built-in set is built from text that ships with Python itself (the
``pydoc_data`` help topics, a fixed list of standard-library sources) or is
written below, so a scan needs no download and the same Python gives the same
prompts. Defaults follow the papers' protocols (docs/methods.md): at least 100
natural-text sequences of 64 tokens for sinks and positional heads, and a random
sequence of 32 tokens repeated once (after BOS) for induction heads.

``get_prompt_set`` resolves what a user typed: a built-in name first, then an
existing ``.txt`` (one prompt per line) or ``.jsonl`` (a ``"text"`` per line)
file.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sysconfig
from collections.abc import Callable
from pathlib import Path

from headscope.data.ordinal import ORDINAL_TEXTS
from headscope.data.prompt_sets import RANDOM_KINDS, PromptSet
from headscope.errors import HeadscopeError

#: standard-library sources of the ``code`` set, in this order (all present in CPython 3.11+)
CODE_SOURCE_FILES: tuple[str, ...] = (
    "json/decoder.py",
    "json/encoder.py",
    "textwrap.py",
    "heapq.py",
    "bisect.py",
    "functools.py",
    "dataclasses.py",
    "argparse.py",
    "fractions.py",
    "statistics.py",
    "string.py",
    "shlex.py",
    "fnmatch.py",
    "difflib.py",
    "contextlib.py",
)

#: short sequences whose next element is predictable from an ordering (successor heads)

#: built-in name -> one-line description
_DESCRIPTIONS: dict[str, str] = {
    "prose": "natural English prose: Python's built-in help topics (pydoc_data.topics)",
    "prose-heldout": "held-out prose (32 x 256 tokens from token 40000 of the help topics), "
    "for perplexity",
    "prose-long": "long prose (2 texts x 2048 tokens from token 60000 of the help topics), "
    "for window attention",
    "prose-book": "one long prose text (16384 tokens from token 70000 of the help topics, "
    "twice SmolLM2's trained context), for StreamingLLM past the trained length",
    "code": f"Python source: {len(CODE_SOURCE_FILES)} standard-library modules",
    "random-tokens": "i.i.d. uniform random ordinary tokens (64 x 64), the random-token "
    "control for attention sinks",
    "random-repeat": "random ordinary tokens repeated twice (BOS + 32 + 32), for induction heads",
    "repeated-token": "one random ordinary token repeated, for duplicate-token heads and sinks",
    "ordinal": "short ordinal sequences (weekdays, months, numbers, letters), for successor heads",
}


@functools.cache
def _pydoc_topics() -> tuple[str, ...]:
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    return tuple(topics[key] for key in sorted(topics))


@functools.cache
def _stdlib_sources() -> tuple[str, ...]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    sources = []
    for relative in CODE_SOURCE_FILES:
        try:
            sources.append((stdlib / relative).read_text(encoding="utf-8"))
        except OSError:
            continue  # a trimmed Python install; the content hash records what was read
    if not sources:
        raise HeadscopeError(
            f"the 'code' prompt set reads Python's standard-library sources, but none of "
            f"{', '.join(CODE_SOURCE_FILES[:3])}, ... exist under {stdlib}; use another set"
        )
    return tuple(sources)


def _prose_stream(name: str, *, n_prompts: int, seq_len: int, start: int = 0) -> PromptSet:
    """A window of the help-topics text stream (the three prose sets do not overlap)."""
    return PromptSet(
        name=name,
        description=_DESCRIPTIONS[name],
        kind="text_stream",
        texts=_pydoc_topics(),
        n_prompts=n_prompts,
        seq_len=seq_len,
        start=start,
    )


def _prose() -> PromptSet:
    return _prose_stream("prose", n_prompts=128, seq_len=64)


def _prose_heldout() -> PromptSet:
    return _prose_stream("prose-heldout", n_prompts=32, seq_len=256, start=40_000)


def _prose_long() -> PromptSet:
    return _prose_stream("prose-long", n_prompts=2, seq_len=2048, start=60_000)


def _prose_book() -> PromptSet:
    return _prose_stream("prose-book", n_prompts=1, seq_len=16_384, start=70_000)


def _code() -> PromptSet:
    return PromptSet(
        name="code",
        description=_DESCRIPTIONS["code"],
        kind="text_stream",
        texts=_stdlib_sources(),
        n_prompts=64,
        seq_len=64,
    )


def _random_tokens() -> PromptSet:
    return PromptSet(
        name="random-tokens",
        description=_DESCRIPTIONS["random-tokens"],
        kind="random_tokens",
        n_prompts=64,
        seq_len=64,
        seed=0,
    )


def _random_repeat() -> PromptSet:
    return PromptSet(
        name="random-repeat",
        description=_DESCRIPTIONS["random-repeat"],
        kind="random_repeat",
        n_prompts=64,
        seq_len=65,
        seed=0,
    )


def _repeated_token() -> PromptSet:
    return PromptSet(
        name="repeated-token",
        description=_DESCRIPTIONS["repeated-token"],
        kind="repeated_token",
        n_prompts=32,
        seq_len=64,
        seed=0,
    )


def _ordinal() -> PromptSet:
    return PromptSet(
        name="ordinal",
        description=_DESCRIPTIONS["ordinal"],
        kind="texts",
        texts=ORDINAL_TEXTS,
    )


#: name -> factory; factories are cheap except for reading the source texts (cached)
_BUILTINS: dict[str, Callable[[], PromptSet]] = {
    "prose": _prose,
    "prose-heldout": _prose_heldout,
    "prose-long": _prose_long,
    "prose-book": _prose_book,
    "code": _code,
    "random-tokens": _random_tokens,
    "random-repeat": _random_repeat,
    "repeated-token": _repeated_token,
    "ordinal": _ordinal,
}


def builtin_prompt_sets() -> dict[str, str]:
    """Built-in set name -> one-line description (reads no texts)."""
    return dict(_DESCRIPTIONS)


def get_prompt_set(
    name_or_path: str,
    *,
    n_prompts: int | None = None,
    seq_len: int | None = None,
    seed: int | None = None,
) -> PromptSet:
    """A built-in set by name, or a prompt file by path, with overrides applied.

    Overrides apply only where the kind uses them, so that a global ``--n-prompts``
    does not change the content hash of a set that ignores it: ``n_prompts`` is
    not applied to ``texts`` sets, ``seed`` only to the random kinds; ``seq_len``
    always applies (for ``texts`` it is a maximum length).
    """
    name_or_path = os.fspath(name_or_path)
    if name_or_path in _BUILTINS:
        prompt_set = _BUILTINS[name_or_path]()
    elif Path(name_or_path).is_file():
        prompt_set = prompt_set_from_file(name_or_path)
        if prompt_set.name in _BUILTINS:
            raise HeadscopeError(
                f"prompt file '{name_or_path}' would be named '{prompt_set.name}', the name of "
                "a built-in prompt set, and a run keeps one result per name: rename the file"
            )
    elif Path(name_or_path).suffix.lower() in (".txt", ".jsonl"):
        raise HeadscopeError(f"prompt file '{name_or_path}' does not exist")
    else:
        raise HeadscopeError(
            f"unknown prompt set '{name_or_path}'; built-in sets: {', '.join(_BUILTINS)}; "
            'or give a path to a .txt (one prompt per line) or .jsonl (a "text" field per '
            "line) file"
        )
    overrides: dict[str, int] = {}
    if seq_len is not None:
        overrides["seq_len"] = seq_len
    if n_prompts is not None and prompt_set.kind != "texts":
        overrides["n_prompts"] = n_prompts
    if seed is not None and prompt_set.kind in RANDOM_KINDS:
        overrides["seed"] = seed
    return dataclasses.replace(prompt_set, **overrides) if overrides else prompt_set


def prompt_set_from_file(path: str | os.PathLike[str], *, seq_len: int = 0) -> PromptSet:
    """A ``texts`` set from a ``.txt`` (one prompt per non-empty line) or ``.jsonl`` file.

    Each ``.jsonl`` line is an object with a string ``"text"``. Whitespace around
    a prompt is stripped and blank prompts are skipped; the set is named after
    the file's stem.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".txt", ".jsonl"):
        raise HeadscopeError(
            f"prompt file '{path}' must end in .txt (one prompt per line) or .jsonl "
            '(a "text" field per line)'
        )
    try:
        content = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise HeadscopeError(f"cannot read prompt file '{path}': {error}") from None
    texts = _jsonl_texts(path, content) if suffix == ".jsonl" else _txt_texts(content)
    if not texts:
        raise HeadscopeError(f"prompt file '{path}' has no prompts; put one prompt per line")
    return PromptSet(
        name=path.stem,
        description=f"{len(texts)} prompts from {path.name}",
        kind="texts",
        texts=texts,
        seq_len=seq_len,
    )


def _txt_texts(content: str) -> tuple[str, ...]:
    return tuple(line.strip() for line in content.splitlines() if line.strip())


def _jsonl_texts(path: Path, content: str) -> tuple[str, ...]:
    texts = []
    for number, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise HeadscopeError(
                f"prompt file '{path}' line {number} is not valid JSON ({error.msg})"
            ) from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise HeadscopeError(
                f"prompt file '{path}' line {number} needs an object with a string \"text\" field"
            )
        if record["text"].strip():
            texts.append(record["text"].strip())
    return tuple(texts)
