"""Prompt sets: what a probe feeds the model, and how they become token tensors.

A ``PromptSet`` is a frozen description of inputs (source texts or a recipe for
random tokens plus sizes and a seed); ``PromptSet.tokenize`` turns it into a
``TokenizedPrompts`` for one tokenizer. Keeping the two apart lets a run record
exactly what was asked for (``content_hash``, independent of any tokenizer) and
exactly what the model saw (``token_hash``), so two runs are comparable only
when both hashes agree.

The four kinds exist because head roles are defined on different inputs:

* ``text_stream`` -- natural text cut into equal windows of one token stream
  (sinks, previous-token and successor heads are measured on ordinary text; equal
  lengths mean every batch is a dense [batch, T] tensor with no padding to mask).
* ``texts`` -- one prompt per text (ordinal sequences, user prompt files).
* ``random_tokens`` -- i.i.d. uniform random ordinary tokens (Gu et al.'s
  random-token control for attention sinks: no structure at all to attend to).
* ``random_repeat`` -- a random sequence repeated twice: the only way to predict
  the second half is to copy from the first, which isolates induction heads from
  n-gram statistics.
* ``repeated_token`` -- one token repeated: duplicate-token heads and the
  attention-sink dynamics of degenerate input.

BOS handling is explicit: the tokenizer is always called with
``add_special_tokens=False`` and the caller passes the one BOS id to prepend (or
None), so a model's own tokenizer config can never add a second BOS or an EOS
behind the probe's back. ``seq_len`` counts that BOS.

Batching belongs to the data too: ``TokenizedPrompts.batches`` groups prompts of
equal length (no padding); ``TokenizedPrompts.padded`` right-pads prompts of any
length into batches (``PaddedBatch``) that carry the mask every forward needs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import torch
from torch import Tensor

from headscope.errors import HeadscopeError

PromptSetKind = Literal["text_stream", "texts", "random_tokens", "random_repeat", "repeated_token"]
#: the kinds made of seeded random tokens
RANDOM_KINDS = ("random_tokens", "random_repeat", "repeated_token")
PROMPT_SET_KINDS: tuple[str, ...] = get_args(PromptSetKind)

#: the separator between documents of a text_stream before it is tokenized once
DOCUMENT_SEPARATOR = "\n\n"

#: the fewest tokens after BOS that make a repeat (a token, then its copy)
_MIN_REPEAT_BODY = 2


@dataclass(frozen=True, kw_only=True)
class PromptSet:
    """A tokenizer-independent description of a set of prompts."""

    name: str = field(metadata={"help": "short name; built-in names are used by the CLI"})
    description: str = field(metadata={"help": "one line saying what the prompts are for"})
    kind: PromptSetKind = field(metadata={"help": "how texts/sizes become prompts"})
    texts: tuple[str, ...] = field(
        default=(),
        metadata={"help": "source documents (text_stream) or one prompt per entry (texts)"},
    )
    n_prompts: int = field(
        default=0,
        metadata={"help": "number of prompts (text_stream, random_repeat, repeated_token)"},
    )
    seq_len: int = field(
        default=0,
        metadata={
            "help": "tokens per prompt including the BOS when one is prepended; for "
            "'texts' the maximum length (0 = no limit)"
        },
    )
    seed: int = field(default=0, metadata={"help": "seed of the random kinds"})
    start: int = field(
        default=0,
        metadata={
            "help": "text_stream: token offset of the first window, so that held-out sets "
            "cut from the same texts do not overlap the set that starts at 0"
        },
    )

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise HeadscopeError(f"a prompt set needs a non-empty name, got {self.name!r}")
        if not isinstance(self.description, str):
            raise HeadscopeError(f"prompt set '{self.name}': description must be a string")
        if self.kind not in PROMPT_SET_KINDS:
            raise HeadscopeError(
                f"prompt set '{self.name}': unknown kind {self.kind!r}; "
                f"use one of {', '.join(PROMPT_SET_KINDS)}"
            )
        if isinstance(self.texts, str) or not isinstance(self.texts, Sequence):
            raise HeadscopeError(
                f"prompt set '{self.name}': texts must be a sequence of strings, "
                f"not {type(self.texts).__name__}"
            )
        texts = tuple(self.texts)
        if not all(isinstance(t, str) for t in texts):
            raise HeadscopeError(f"prompt set '{self.name}': every entry of texts must be a string")
        object.__setattr__(self, "texts", texts)
        for option, flag in (
            ("n_prompts", "--n-prompts"), ("seq_len", "--seq-len"), ("start", "start"),
        ):  # fmt: skip
            value = getattr(self, option)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise HeadscopeError(
                    f"prompt set '{self.name}': {option} must be a non-negative integer, "
                    f"got {value!r}; check {flag}"
                )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise HeadscopeError(
                f"prompt set '{self.name}': seed must be a non-negative integer, got {self.seed!r}"
            )

    @property
    def content_hash(self) -> str:
        """sha256 (hex) of a canonical JSON of every field, texts included."""
        payload = json.dumps(
            dataclasses.asdict(self), sort_keys=True, ensure_ascii=False, separators=(",", ":")
        )
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()

    def tokenize(self, tokenizer: Any, *, bos_token_id: int | None) -> TokenizedPrompts:
        """Token tensors for ``tokenizer``; ``bos_token_id`` is prepended to each when not None.

        Raises ``HeadscopeError`` when the set would be empty or ``seq_len`` is too short.
        """
        if bos_token_id is not None:
            if isinstance(bos_token_id, bool) or not isinstance(bos_token_id, int):
                raise HeadscopeError(f"bos_token_id must be an int or None, got {bos_token_id!r}")
        bos = 0 if bos_token_id is None else 1
        if self.kind in RANDOM_KINDS:
            self._check_generated_size()
        if self.kind == "text_stream":
            bodies = self._text_stream_bodies(tokenizer, bos)
        elif self.kind == "texts":
            bodies = self._texts_bodies(tokenizer, bos)
        elif self.kind == "random_tokens":
            bodies = self._random_tokens_bodies(tokenizer, bos, bos_token_id)
        elif self.kind == "random_repeat":
            bodies = self._random_repeat_bodies(tokenizer, bos, bos_token_id)
        else:
            bodies = self._repeated_token_bodies(tokenizer, bos, bos_token_id)
        prefix = [] if bos_token_id is None else [bos_token_id]
        tokens = tuple(torch.tensor(prefix + list(body), dtype=torch.long) for body in bodies)
        return TokenizedPrompts(
            name=self.name,
            prompt_set_hash=self.content_hash,
            tokens=tokens,
            bos_prepended=bos_token_id is not None,
        )

    def _check_generated_size(self) -> None:
        """Refuse, before generating it, a set that cannot fit in memory (a token
        costs about 64 bytes while it is a Python int in a list, then a tensor)."""
        from headscope.checks import available_memory_bytes

        needed = self.n_prompts * self.seq_len * 64
        available = available_memory_bytes()
        if available is not None and needed > available // 2:
            raise HeadscopeError(
                f"prompt set '{self.name}' would hold {self.n_prompts} x {self.seq_len} tokens, "
                f"about {needed / 2**30:.1f} GiB while it is built, more than half of the "
                f"{available / 2**30:.1f} GiB available; use a smaller --n-prompts or --seq-len"
            )

    # -- one method per kind; each returns token-id lists without the BOS --------

    def _text_stream_bodies(self, tokenizer: Any, bos: int) -> list[list[int]]:
        if not self.texts:
            raise self._empty_error("it has no texts to cut windows from")
        if self.n_prompts == 0:
            raise self._empty_error("n_prompts is 0; give a positive --n-prompts")
        window = self._body_length(bos, minimum=1)
        stream = encode_text(tokenizer, DOCUMENT_SEPARATOR.join(self.texts))[self.start :]
        available = len(stream) // window
        if available < self.n_prompts:
            after = f" after token {self.start}" if self.start else ""
            raise HeadscopeError(
                f"prompt set '{self.name}' has only {available} windows of {window} tokens"
                f"{' (+ BOS)' if bos else ''} in its {len(stream)} tokens of text{after} but "
                f"{self.n_prompts} prompts were asked; "
                "use a smaller --n-prompts or --seq-len"
            )
        return [stream[i * window : (i + 1) * window] for i in range(self.n_prompts)]

    def _texts_bodies(self, tokenizer: Any, bos: int) -> list[list[int]]:
        if not self.texts:
            raise self._empty_error("it has no texts; give at least one prompt")
        limit = self._body_length(bos, minimum=1) if self.seq_len > 0 else None
        encoded = _encode_many(tokenizer, list(self.texts))
        bodies = [ids[:limit] for ids in encoded if ids]
        if not bodies:
            raise self._empty_error("every text tokenizes to nothing; give non-blank prompts")
        return bodies

    def _random_tokens_bodies(
        self, tokenizer: Any, bos: int, bos_token_id: int | None
    ) -> list[list[int]]:
        if self.n_prompts == 0:
            raise self._empty_error("n_prompts is 0; give a positive --n-prompts")
        length = self._body_length(bos, minimum=1)
        ordinary = ordinary_token_ids(tokenizer, also_exclude=bos_token_id)
        generator = torch.Generator().manual_seed(self.seed)
        picks = torch.randint(len(ordinary), (self.n_prompts, length), generator=generator)
        return ordinary[picks].tolist()

    def _random_repeat_bodies(
        self, tokenizer: Any, bos: int, bos_token_id: int | None
    ) -> list[list[int]]:
        if self.n_prompts == 0:
            raise self._empty_error("n_prompts is 0; give a positive --n-prompts")
        half = self._body_length(bos, minimum=_MIN_REPEAT_BODY) // 2
        ordinary = ordinary_token_ids(tokenizer, also_exclude=bos_token_id)
        generator = torch.Generator().manual_seed(self.seed)
        picks = torch.randint(len(ordinary), (self.n_prompts, half), generator=generator)
        first_halves = ordinary[picks]
        return torch.cat([first_halves, first_halves], dim=1).tolist()

    def _repeated_token_bodies(
        self, tokenizer: Any, bos: int, bos_token_id: int | None
    ) -> list[list[int]]:
        if self.n_prompts == 0:
            raise self._empty_error("n_prompts is 0; give a positive --n-prompts")
        length = self._body_length(bos, minimum=_MIN_REPEAT_BODY)
        ordinary = ordinary_token_ids(tokenizer, also_exclude=bos_token_id)
        generator = torch.Generator().manual_seed(self.seed)
        picks = torch.randint(len(ordinary), (self.n_prompts,), generator=generator)
        return [[int(token)] * length for token in ordinary[picks]]

    def _body_length(self, bos: int, *, minimum: int) -> int:
        """Tokens per prompt after the BOS; raises if ``seq_len`` leaves fewer than ``minimum``."""
        body = self.seq_len - bos
        if body < minimum:
            with_bos = " with the BOS" if bos else ""
            raise HeadscopeError(
                f"prompt set '{self.name}' ({self.kind}): seq_len {self.seq_len} is too short; "
                f"it needs at least {minimum + bos} tokens{with_bos}; raise --seq-len"
            )
        return body

    def _empty_error(self, reason: str) -> HeadscopeError:
        return HeadscopeError(f"prompt set '{self.name}' is empty: {reason}")


@dataclass(frozen=True, kw_only=True, eq=False)
class TokenizedPrompts:
    """The token ids one tokenizer made of a ``PromptSet``; lengths may differ (kind texts).

    Compared by identity (``eq=False``): tensors have no single truth value.
    """

    name: str
    prompt_set_hash: str
    tokens: tuple[torch.Tensor, ...]
    bos_prepended: bool

    def __post_init__(self) -> None:
        tokens = tuple(self.tokens)
        for i, t in enumerate(tokens):
            if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.dtype != torch.long:
                raise HeadscopeError(f"prompt {i} of '{self.name}' must be a 1-D int64 tensor")
            if t.numel() == 0:
                raise HeadscopeError(f"prompt {i} of '{self.name}' is empty")
        object.__setattr__(self, "tokens", tokens)

    @property
    def token_hash(self) -> str:
        """sha256 (hex) of every prompt's length and ids, so splits of one stream differ."""
        digest = hashlib.sha256()
        for t in self.tokens:
            digest.update(len(t).to_bytes(8, "little"))
            digest.update(t.cpu().numpy().astype("<i8").tobytes())
        return digest.hexdigest()

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def lengths(self) -> list[int]:
        """Tokens per prompt, BOS included, in prompt order."""
        return [len(t) for t in self.tokens]

    def first(self, n: int | None) -> TokenizedPrompts:
        """The first ``n`` prompts (all of them for None), for a cheaper run of a set."""
        if n is None or n >= len(self.tokens):
            return self
        if n < 1:
            raise HeadscopeError(f"need at least one prompt, got n = {n}")
        return dataclasses.replace(self, tokens=self.tokens[:n])

    def batches(self, batch_size: int) -> Iterator[tuple[list[int], torch.Tensor]]:
        """Yield (prompt indices, LongTensor [b, T]) grouping prompts of EQUAL length (no padding).

        Groups come in the order of their first prompt and indices ascend within a
        group, so a set of equal lengths is batched in prompt order (prompt 0 first)
        and every index is yielded exactly once.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise HeadscopeError(f"batch size must be a positive integer, got {batch_size!r}")
        groups: dict[int, list[int]] = {}
        for index, length in enumerate(self.lengths):
            groups.setdefault(length, []).append(index)
        for indices in groups.values():
            for start in range(0, len(indices), batch_size):
                chunk = indices[start : start + batch_size]
                yield chunk, torch.stack([self.tokens[i] for i in chunk])

    def padded(self, batch_size: int, pad_id: int) -> Iterator[PaddedBatch]:
        """Yield every prompt once, in right-padded batches of up to ``batch_size``.

        Prompts are sorted by length, longest first (ties by index), so a batch
        pads as little as possible and the batching, hence every sum over it, is
        the same on every run.
        """
        order = sorted(range(len(self.tokens)), key=lambda i: (-len(self.tokens[i]), i))
        for start in range(0, len(order), batch_size):
            indices = order[start : start + batch_size]
            yield PaddedBatch.from_sequences(indices, [self.tokens[i] for i in indices], pad_id)


@dataclass(frozen=True, kw_only=True, eq=False)
class PaddedBatch:
    """Prompts of unequal length right-padded into one tensor, with the mask of real tokens.

    Row r is prompt ``indices[r]``: ``tokens[r, :lengths[r]]`` are its ids and the
    rest of the row is the pad id; ``mask[r, t]`` is True on real tokens (as an
    HF ``attention_mask`` once ``.long()``). All on CPU.
    """

    indices: list[int]
    tokens: Tensor  # [batch, T] int64
    lengths: Tensor  # [batch] int64
    mask: Tensor  # [batch, T] bool

    @classmethod
    def from_sequences(
        cls, indices: Iterable[int], sequences: Sequence[Sequence[int] | Tensor], pad_id: int
    ) -> PaddedBatch:
        """Pad ``sequences`` (token ids, row by row; ``indices`` names each) with ``pad_id``."""
        lengths = torch.tensor([len(ids) for ids in sequences])
        tokens = torch.full((len(sequences), int(lengths.max())), pad_id, dtype=torch.int64)
        for row, ids in enumerate(sequences):
            tokens[row, : lengths[row]] = torch.as_tensor(ids)
        mask = torch.arange(tokens.shape[1])[None] < lengths[:, None]
        return cls(indices=list(indices), tokens=tokens, lengths=lengths, mask=mask)


def ordinary_token_ids(tokenizer: Any, *, also_exclude: int | None = None) -> torch.Tensor:
    """Every id in ``range(len(tokenizer))`` that is not a special token (ascending, int64).

    Random prompts must not contain BOS/EOS/PAD and the like: a stray BOS in the
    middle of a prompt resets many models' attention and would fake a sink.
    """
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    special.update(i for i, token in decoder.items() if getattr(token, "special", False))
    if also_exclude is not None:
        special.add(also_exclude)
    ordinary = [i for i in range(len(tokenizer)) if i not in special]
    if not ordinary:
        raise HeadscopeError("the tokenizer has no ordinary (non-special) tokens to sample from")
    return torch.tensor(ordinary, dtype=torch.long)


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """Token ids of one text, with no special tokens added and no length warning.

    ``verbose=False`` silences the "sequence length is longer than the specified
    maximum" warning: a text_stream is tokenized whole on purpose and cut later.
    """
    ids = tokenizer(text, add_special_tokens=False, verbose=False, return_attention_mask=False)[
        "input_ids"
    ]
    return [int(i) for i in ids]


def _encode_many(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Token ids of each text (one batched call; see ``encode_text``)."""
    batch = tokenizer(texts, add_special_tokens=False, verbose=False, return_attention_mask=False)[
        "input_ids"
    ]
    return [[int(i) for i in ids] for ids in batch]
