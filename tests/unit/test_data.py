"""Prompt sets: counts, lengths, BOS handling, determinism, hashes, batching, files, errors."""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging

import pytest
import torch

from headscope.data import (
    PromptSet,
    TokenizedPrompts,
    builtin_prompt_sets,
    get_prompt_set,
    prompt_set_from_file,
)
from headscope.errors import HeadscopeError
from headscope.probes.tiny_tokenizer import tiny_tokenizer

BUILTIN_NAMES = (
    "prose", "prose-heldout", "prose-long", "prose-book", "code", "random-tokens",
    "random-repeat", "repeated-token", "ordinal",
)  # fmt: skip


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def bos(tok):
    assert tok.bos_token_id is not None
    return tok.bos_token_id


@pytest.fixture(scope="module")
def tokenized_builtins(tok, bos):
    """(name, with_bos) -> TokenizedPrompts for every built-in set, tokenized once."""
    return {
        (name, with_bos): get_prompt_set(name).tokenize(tok, bos_token_id=bos if with_bos else None)
        for name in BUILTIN_NAMES
        for with_bos in (True, False)
    }


def _stream(tok, texts):
    joined = "\n\n".join(texts)
    return tok(joined, add_special_tokens=False)["input_ids"]


# -- built-in sets ---------------------------------------------------------------


def test_builtin_names_and_descriptions():
    described = builtin_prompt_sets()
    assert tuple(described) == BUILTIN_NAMES
    for name, description in described.items():
        assert description and "\n" not in description
        prompt_set = get_prompt_set(name)
        assert prompt_set.name == name
        assert prompt_set.description == description


def test_builtin_defaults():
    expected = {
        "prose": ("text_stream", 128, 64, 0),
        "code": ("text_stream", 64, 64, 0),
        "random-tokens": ("random_tokens", 64, 64, 0),
        "random-repeat": ("random_repeat", 64, 65, 0),
        "repeated-token": ("repeated_token", 32, 64, 0),
        "ordinal": ("texts", 0, 0, 0),
        "prose-heldout": ("text_stream", 32, 256, 0),
        "prose-long": ("text_stream", 2, 2048, 0),
        "prose-book": ("text_stream", 1, 16384, 0),
    }
    for name, (kind, n_prompts, seq_len, seed) in expected.items():
        ps = get_prompt_set(name)
        assert (ps.kind, ps.n_prompts, ps.seq_len, ps.seed) == (kind, n_prompts, seq_len, seed)
    assert len(get_prompt_set("ordinal").texts) >= 20
    assert len(get_prompt_set("code").texts) >= 10


@pytest.mark.parametrize("with_bos", [True, False], ids=["bos", "no-bos"])
@pytest.mark.parametrize("name", BUILTIN_NAMES)
def test_builtin_counts_lengths_and_bos(tokenized_builtins, bos, name, with_bos):
    ps = get_prompt_set(name)
    prompts = tokenized_builtins[(name, with_bos)]
    extra = 1 if with_bos else 0
    assert prompts.name == name
    assert prompts.prompt_set_hash == ps.content_hash
    assert prompts.bos_prepended is with_bos
    if ps.kind == "texts":
        assert len(prompts) == len(ps.texts)
        assert min(prompts.lengths) >= 2 + extra
    else:
        assert len(prompts) == ps.n_prompts
    if ps.kind in ("text_stream", "repeated_token", "random_tokens"):
        assert set(prompts.lengths) == {ps.seq_len}
    if ps.kind == "random_repeat":
        assert set(prompts.lengths) == {extra + 2 * ((ps.seq_len - extra) // 2)}
    for t in prompts.tokens:
        assert t.dtype == torch.long and t.dim() == 1
        if with_bos:
            assert t[0].item() == bos
            assert (t == bos).sum().item() == 1  # BOS only at position 0
        else:
            assert bos not in t.tolist()


def test_random_repeat_lengths_match_default_design(tokenized_builtins):
    assert set(tokenized_builtins[("random-repeat", True)].lengths) == {65}  # BOS + 32 + 32
    assert set(tokenized_builtins[("random-repeat", False)].lengths) == {64}


def test_prose_is_pydoc_topics_sorted():
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    assert get_prompt_set("prose").texts == tuple(topics[k] for k in sorted(topics))


@pytest.mark.parametrize("with_bos", [True, False], ids=["bos", "no-bos"])
def test_prose_windows_are_consecutive_pieces_of_one_stream(tok, tokenized_builtins, with_bos):
    ps = get_prompt_set("prose")
    prompts = tokenized_builtins[("prose", with_bos)]
    bodies = [t[1:] if with_bos else t for t in prompts.tokens]
    window = ps.seq_len - (1 if with_bos else 0)
    assert all(len(b) == window for b in bodies)
    stream = _stream(tok, ps.texts)
    assert torch.cat(bodies).tolist() == stream[: window * ps.n_prompts]


def test_text_stream_is_not_truncated_by_model_max_length_and_does_not_warn():
    tok = tiny_tokenizer()  # fresh: the warning is emitted at most once per tokenizer
    tok.model_max_length = 16
    ps = PromptSet(
        name="s",
        description="d",
        kind="text_stream",
        texts=get_prompt_set("prose").texts[:3],
        n_prompts=4,
        seq_len=17,
    )
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("transformers")
    level = logger.level  # other imports (TransformerLens) raise it to ERROR
    logger.setLevel(logging.WARNING)
    logger.addHandler(handler)
    try:
        prompts = ps.tokenize(tok, bos_token_id=tok.bos_token_id)
        control = tiny_tokenizer()
        control.model_max_length = 16
        control("word " * 40, add_special_tokens=False)  # the warning this test must see
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    messages = [r.getMessage() for r in records]
    assert len([m for m in messages if "maximum sequence length" in m]) == 1
    assert len(prompts) == 4 and set(prompts.lengths) == {17}


def test_tokenizer_special_tokens_are_never_added(tok, bos):
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    backend = tok.backend_tokenizer.__class__.from_str(tok.backend_tokenizer.to_str())
    backend.post_processor = TemplateProcessing(
        single="<|bos|> $A <|eos|>",
        special_tokens=[("<|bos|>", bos), ("<|eos|>", tok.eos_token_id)],
    )
    adding = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>"
    )
    assert adding("one, two")["input_ids"][0] == bos  # the tokenizer would add BOS by default
    without = get_prompt_set("ordinal").tokenize(adding, bos_token_id=None)
    with_bos = get_prompt_set("ordinal").tokenize(adding, bos_token_id=bos)
    for a, b in zip(without.tokens, with_bos.tokens, strict=True):
        assert bos not in a.tolist() and tok.eos_token_id not in a.tolist()
        assert b.tolist() == [bos, *a.tolist()]


# -- random kinds -------------------------------------------------------------------


@pytest.mark.parametrize("with_bos", [True, False], ids=["bos", "no-bos"])
def test_random_repeat_halves_equal_and_ordinary(tok, tokenized_builtins, with_bos):
    prompts = tokenized_builtins[("random-repeat", with_bos)]
    special = set(tok.all_special_ids)
    firsts = []
    for t in prompts.tokens:
        body = t[1:] if with_bos else t
        half = len(body) // 2
        assert half == 32
        assert torch.equal(body[:half], body[half:])
        assert not special & set(body.tolist())
        assert 0 <= body.min().item() and body.max().item() < len(tok)
        firsts.append(tuple(body[:half].tolist()))
    assert len(set(firsts)) == len(firsts)  # prompts differ from each other
    assert len(set(firsts[0])) > 16  # tokens within a half are not all the same


def test_repeated_token_is_one_ordinary_token(tok, tokenized_builtins, bos):
    prompts = tokenized_builtins[("repeated-token", True)]
    special = set(tok.all_special_ids)
    chosen = []
    for t in prompts.tokens:
        body = t[1:]
        assert len(set(body.tolist())) == 1
        assert body[0].item() not in special
        chosen.append(body[0].item())
    assert len(set(chosen)) > 1


@pytest.mark.parametrize("with_bos", [True, False], ids=["bos", "no-bos"])
def test_random_tokens_are_uniform_ordinary_tokens_without_structure(
    tok, tokenized_builtins, with_bos
):
    prompts = tokenized_builtins[("random-tokens", with_bos)]
    special = set(tok.all_special_ids)
    bodies = torch.stack([t[1:] if with_bos else t for t in prompts.tokens])
    assert bodies.shape == (64, 64 - int(with_bos))
    assert not special & set(bodies.flatten().tolist())
    half = bodies.shape[1] // 2
    # not the random-repeat design: no prompt repeats its first half
    assert not any(torch.equal(b[:half], b[half : 2 * half]) for b in bodies)
    # i.i.d. uniform: about as many distinct tokens as draws from a large vocabulary
    drawn = bodies.flatten()
    assert len(set(drawn.tolist())) > 0.5 * min(len(drawn), len(tok) - len(special))


def test_prose_book_is_one_text_past_the_other_prose_sets():
    book = get_prompt_set("prose-book")
    assert (book.n_prompts, book.seq_len) == (1, 16384)
    long = get_prompt_set("prose-long")
    assert book.start >= long.start + long.n_prompts * long.seq_len


@pytest.mark.parametrize("name", ["random-tokens", "random-repeat", "repeated-token"])
def test_random_kinds_are_deterministic_per_seed(tok, bos, name):
    first = get_prompt_set(name).tokenize(tok, bos_token_id=bos)
    again = get_prompt_set(name).tokenize(tok, bos_token_id=bos)
    other = get_prompt_set(name, seed=1).tokenize(tok, bos_token_id=bos)
    assert first.token_hash == again.token_hash
    assert all(torch.equal(a, b) for a, b in zip(first.tokens, again.tokens, strict=True))
    assert first.token_hash != other.token_hash
    assert any(not torch.equal(a, b) for a, b in zip(first.tokens, other.tokens, strict=True))


def test_text_sets_are_deterministic(tok, bos, tokenized_builtins):
    again = get_prompt_set("prose").tokenize(tok, bos_token_id=bos)
    assert again.token_hash == tokenized_builtins[("prose", True)].token_hash
    assert (
        tokenized_builtins[("prose", True)].token_hash
        != tokenized_builtins[("prose", False)].token_hash
    )


# -- texts kind -----------------------------------------------------------------------


def test_texts_truncate_to_seq_len_including_bos(tok, bos):
    full = get_prompt_set("ordinal").tokenize(tok, bos_token_id=bos)
    short = get_prompt_set("ordinal", seq_len=4).tokenize(tok, bos_token_id=bos)
    assert max(full.lengths) > 4
    assert set(short.lengths) == {4}
    for f, s in zip(full.tokens, short.tokens, strict=True):
        assert s.tolist() == f[:4].tolist()
    no_bos = get_prompt_set("ordinal", seq_len=4).tokenize(tok, bos_token_id=None)
    assert set(no_bos.lengths) == {4}
    assert [t.tolist() for t in no_bos.tokens] == [f[1:5].tolist() for f in full.tokens]


def test_texts_drop_prompts_that_tokenize_to_nothing(tok, bos):
    ps = PromptSet(name="t", description="d", kind="texts", texts=("hello", "", "world"))
    prompts = ps.tokenize(tok, bos_token_id=bos)
    assert len(prompts) == 2
    assert tok.decode(prompts.tokens[1][1:]) == "world"


def test_held_out_prose_sets_start_past_the_prose_set():
    tok = tiny_tokenizer()
    sets = {
        name: get_prompt_set(name).tokenize(tok, bos_token_id=0)
        for name in ("prose", "prose-heldout", "prose-long")
    }
    stream = _stream(tok, get_prompt_set("prose").texts)
    spans = {}
    for name, prompts in sets.items():
        start = get_prompt_set(name).start
        body = len(prompts.tokens[0]) - 1
        assert prompts.tokens[0][1:].tolist() == stream[start : start + body]
        spans[name] = (start, start + body * len(prompts))
    ordered = sorted(spans.values())
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in itertools.pairwise(ordered))


def test_start_beyond_the_stream_is_a_clear_error():
    too_far = dataclasses.replace(get_prompt_set("prose"), start=10_000_000)
    with pytest.raises(HeadscopeError, match="after token 10000000"):
        too_far.tokenize(tiny_tokenizer(), bos_token_id=0)


# -- hashes -------------------------------------------------------------------------------


def test_content_hash_covers_every_field():
    base = PromptSet(
        name="x", description="d", kind="text_stream", texts=("a", "b"), n_prompts=3, seq_len=8,
        seed=1,
    )  # fmt: skip
    changes = {
        "name": "y",
        "description": "e",
        "kind": "texts",
        "texts": ("a", "c"),
        "n_prompts": 4,
        "seq_len": 9,
        "seed": 2,
        "start": 3,
    }
    assert {f.name for f in dataclasses.fields(PromptSet)} == set(changes)
    hashes = {base.content_hash} | {
        dataclasses.replace(base, **{k: v}).content_hash for k, v in changes.items()
    }
    assert len(hashes) == 1 + len(changes)
    assert dataclasses.replace(base).content_hash == base.content_hash
    assert len(base.content_hash) == 64 and set(base.content_hash) <= set("0123456789abcdef")
    # joined texts that concatenate alike still hash apart
    assert dataclasses.replace(base, texts=("ab",)).content_hash != base.content_hash


def test_token_hash_distinguishes_splits_of_one_stream():
    def prompts(*rows):
        return TokenizedPrompts(
            name="p", prompt_set_hash="h", tokens=tuple(torch.tensor(r) for r in rows),
            bos_prepended=False,
        )  # fmt: skip

    assert prompts([1, 2], [3]).token_hash == prompts([1, 2], [3]).token_hash
    assert prompts([1, 2], [3]).token_hash != prompts([1], [2, 3]).token_hash
    assert prompts([1, 2], [3]).token_hash != prompts([1, 2], [4]).token_hash


def test_tokenized_prompts_rejects_bad_tensors():
    with pytest.raises(HeadscopeError, match="1-D int64"):
        TokenizedPrompts(
            name="p", prompt_set_hash="h", tokens=(torch.zeros(2, 2, dtype=torch.long),),
            bos_prepended=False,
        )  # fmt: skip
    with pytest.raises(HeadscopeError, match="1-D int64"):
        TokenizedPrompts(
            name="p", prompt_set_hash="h", tokens=(torch.zeros(3),), bos_prepended=False
        )


# -- batches --------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_size", [1, 3, 100])
def test_batches_cover_each_index_once_with_equal_lengths(tokenized_builtins, batch_size):
    prompts = tokenized_builtins[("ordinal", True)]
    assert len(set(prompts.lengths)) > 1  # the test needs unequal lengths
    seen = []
    for indices, batch in prompts.batches(batch_size):
        assert 1 <= len(indices) <= batch_size
        assert batch.dtype == torch.long
        assert batch.shape == (len(indices), prompts.lengths[indices[0]])
        for row, index in zip(batch, indices, strict=True):
            assert torch.equal(row, prompts.tokens[index])
        seen.extend(indices)
    assert sorted(seen) == list(range(len(prompts)))
    again = [(i, b.tolist()) for i, b in prompts.batches(batch_size)]
    assert again == [(i, b.tolist()) for i, b in prompts.batches(batch_size)]


def test_batches_of_equal_lengths_keep_prompt_order(tokenized_builtins):
    prompts = tokenized_builtins[("prose", True)]
    batches = list(prompts.batches(48))
    assert [len(i) for i, _ in batches] == [48, 48, 32]
    assert [i for indices, _ in batches for i in indices] == list(range(128))


def test_batches_reject_bad_batch_size(tokenized_builtins):
    with pytest.raises(HeadscopeError, match="batch size"):
        next(tokenized_builtins[("prose", True)].batches(0))


@pytest.mark.parametrize("batch_size", [1, 3, 100])
def test_padded_batches_are_longest_first_right_padded_and_masked(tokenized_builtins, batch_size):
    prompts = tokenized_builtins[("ordinal", True)]
    order = sorted(range(len(prompts)), key=lambda i: (-prompts.lengths[i], i))
    seen = []
    for batch in prompts.padded(batch_size, pad_id=-1):
        assert 1 <= len(batch.indices) <= batch_size
        width = max(prompts.lengths[i] for i in batch.indices)
        assert batch.tokens.shape == batch.mask.shape == (len(batch.indices), width)
        assert batch.tokens.dtype == torch.int64 and batch.mask.dtype == torch.bool
        assert batch.lengths.tolist() == [prompts.lengths[i] for i in batch.indices]
        for row, index in enumerate(batch.indices):
            length = prompts.lengths[index]
            assert torch.equal(batch.tokens[row, :length], prompts.tokens[index])
            assert (batch.tokens[row, length:] == -1).all()
            assert batch.mask[row].tolist() == [True] * length + [False] * (width - length)
        seen.extend(batch.indices)
    assert seen == order  # every prompt once, longest first, ties in prompt order


# -- overrides and name resolution -------------------------------------------------------------


def test_overrides_apply_where_the_kind_uses_them():
    rr = get_prompt_set("random-repeat", n_prompts=3, seq_len=11, seed=5)
    assert (rr.n_prompts, rr.seq_len, rr.seed) == (3, 11, 5)
    prose = get_prompt_set("prose", n_prompts=7, seq_len=32, seed=9)
    assert (prose.n_prompts, prose.seq_len, prose.seed) == (7, 32, 0)
    ordinal = get_prompt_set("ordinal", n_prompts=7, seq_len=32)
    assert (ordinal.n_prompts, ordinal.seq_len) == (0, 32)
    assert get_prompt_set("prose", n_prompts=None) == get_prompt_set("prose")


def test_unknown_name_lists_builtins_and_file_formats(tmp_path):
    with pytest.raises(HeadscopeError) as info:
        get_prompt_set("nonsense")
    message = str(info.value)
    assert "unknown prompt set 'nonsense'" in message
    assert all(name in message for name in BUILTIN_NAMES)
    assert ".txt" in message and ".jsonl" in message and "\n" not in message
    with pytest.raises(HeadscopeError, match="unknown prompt set"):
        get_prompt_set(str(tmp_path))  # a directory is not a prompt file
    with pytest.raises(HeadscopeError, match="does not exist"):
        get_prompt_set(str(tmp_path / "missing.txt"))


# -- files ---------------------------------------------------------------------------------------


def test_txt_file_one_prompt_per_nonempty_line(tmp_path, tok, bos):
    path = tmp_path / "my_prompts.txt"
    path.write_text("The cat sat on the mat.\n\n   \nA second prompt here\r\nthird\n", "utf-8")
    ps = prompt_set_from_file(path)
    assert ps.name == "my_prompts" and ps.kind == "texts"
    assert ps.texts == ("The cat sat on the mat.", "A second prompt here", "third")
    prompts = ps.tokenize(tok, bos_token_id=bos)
    assert len(prompts) == 3
    assert tok.decode(prompts.tokens[0][1:]) == "The cat sat on the mat."
    via_name = get_prompt_set(str(path), seq_len=3, n_prompts=50)
    assert via_name.texts == ps.texts and via_name.seq_len == 3
    assert set(via_name.tokenize(tok, bos_token_id=bos).lengths) == {3}


def test_jsonl_file_reads_text_fields(tmp_path, tok):
    path = tmp_path / "set.jsonl"
    rows = [{"text": "hello world", "id": 1}, {"text": "  "}, {"text": "Thursday, Friday"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", "utf-8")
    ps = get_prompt_set(str(path))
    assert ps.name == "set"
    assert ps.texts == ("hello world", "Thursday, Friday")
    assert len(ps.tokenize(tok, bos_token_id=None)) == 2


@pytest.mark.parametrize(
    ("filename", "content", "match"),
    [
        ("empty.txt", "\n  \n\n", "has no prompts"),
        ("empty.jsonl", "", "has no prompts"),
        ("blank_texts.jsonl", '{"text": ""}\n', "has no prompts"),
        ("bad.jsonl", '{"text": "ok"}\n{not json\n', "line 2 is not valid JSON"),
        ("notext.jsonl", '{"prompt": "x"}\n', 'line 1 needs an object with a string "text"'),
        ("list.jsonl", '["x"]\n', "line 1 needs an object"),
        ("prompts.csv", "a,b\n", "must end in .txt"),
    ],
)
def test_bad_files_raise_naming_the_file(tmp_path, filename, content, match):
    path = tmp_path / filename
    path.write_text(content, "utf-8")
    with pytest.raises(HeadscopeError, match=match) as info:
        prompt_set_from_file(path)
    assert str(path) in str(info.value)


def test_undecodable_file_raises(tmp_path):
    path = tmp_path / "latin.txt"
    path.write_bytes(b"caf\xe9\n")
    with pytest.raises(HeadscopeError, match="cannot read prompt file") as info:
        prompt_set_from_file(path)
    assert str(path) in str(info.value)


# -- errors ----------------------------------------------------------------------------------------


def test_too_few_windows_says_how_many_are_available(tok, bos):
    text = "the quick brown fox jumps over the lazy dog " * 20
    ps = PromptSet(
        name="small", description="d", kind="text_stream", texts=(text,), n_prompts=1000, seq_len=9
    )
    available = len(_stream(tok, ps.texts)) // 8
    with pytest.raises(HeadscopeError) as info:
        ps.tokenize(tok, bos_token_id=bos)
    message = str(info.value)
    assert f"only {available} windows" in message
    assert "--n-prompts" in message and "--seq-len" in message and "\n" not in message
    assert len(dataclasses.replace(ps, n_prompts=available).tokenize(tok, bos_token_id=bos)) == (
        available
    )


@pytest.mark.parametrize(
    "name", ["prose", "code", "random-tokens", "random-repeat", "repeated-token"]
)
def test_zero_prompts_is_empty(tok, bos, name):
    with pytest.raises(HeadscopeError, match=f"prompt set '{name}' is empty: n_prompts is 0"):
        get_prompt_set(name, n_prompts=0).tokenize(tok, bos_token_id=bos)


@pytest.mark.parametrize(
    ("kind", "texts"),
    [("text_stream", ()), ("texts", ()), ("texts", ("", ""))],
)
def test_no_texts_is_empty(tok, bos, kind, texts):
    ps = PromptSet(name="void", description="d", kind=kind, texts=texts, n_prompts=4, seq_len=8)
    with pytest.raises(HeadscopeError, match="prompt set 'void' is empty: "):
        ps.tokenize(tok, bos_token_id=bos)


@pytest.mark.parametrize(
    ("name", "seq_len", "with_bos"),
    [
        ("random-repeat", 2, True),
        ("random-repeat", 1, False),
        ("repeated-token", 2, True),
        ("prose", 1, True),
        ("prose", 0, False),
    ],
)
def test_seq_len_too_short(tok, bos, name, seq_len, with_bos):
    ps = get_prompt_set(name, seq_len=seq_len)
    with pytest.raises(HeadscopeError, match=f"seq_len {seq_len} is too short"):
        ps.tokenize(tok, bos_token_id=bos if with_bos else None)


def test_shortest_valid_seq_len(tok, bos):
    prompts = get_prompt_set("random-repeat", seq_len=3, n_prompts=2).tokenize(
        tok, bos_token_id=bos
    )
    assert [t[1].item() == t[2].item() for t in prompts.tokens] == [True, True]


@pytest.mark.parametrize(
    ("field", "value"),
    [("n_prompts", -1), ("seq_len", -5), ("seed", -1), ("n_prompts", 1.5), ("seq_len", True)],
)
def test_construction_rejects_bad_numbers(field, value):
    with pytest.raises(HeadscopeError, match=field):
        PromptSet(name="x", description="d", kind="texts", texts=("a",), **{field: value})


def test_construction_rejects_bad_kind_name_and_texts():
    with pytest.raises(HeadscopeError, match="unknown kind"):
        PromptSet(name="x", description="d", kind="stream")
    with pytest.raises(HeadscopeError, match="non-empty name"):
        PromptSet(name=" ", description="d", kind="texts", texts=("a",))
    with pytest.raises(HeadscopeError, match="sequence of strings"):
        PromptSet(name="x", description="d", kind="texts", texts="abc")
    with pytest.raises(HeadscopeError, match="must be a string"):
        PromptSet(name="x", description="d", kind="texts", texts=("a", 3))
    as_list = PromptSet(name="x", description="d", kind="texts", texts=["a", "b"])
    assert as_list.texts == ("a", "b")
    assert hash(as_list) == hash(
        PromptSet(name="x", description="d", kind="texts", texts=("a", "b"))
    )


def test_override_validation_goes_through_post_init():
    with pytest.raises(HeadscopeError, match="n_prompts must be a non-negative integer"):
        get_prompt_set("prose", n_prompts=-3)
