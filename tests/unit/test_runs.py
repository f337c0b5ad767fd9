"""The run folder format: exact round trips, atomic writes, safe --force, clear errors."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import safetensors.torch
import torch

from headscope.errors import HeadscopeError
from headscope.outputs import check_output_folder
from headscope.runs import (
    RUN_FOLDER,
    SCHEMA_VERSION,
    Run,
    list_runs,
    open_run,
    write_run,
)
from headscope.tables import HeadTable, LayerTable


def make_head_table(detector: str, prompt_set: str, seed: int = 0) -> HeadTable:
    rng = np.random.default_rng(seed)
    scores = rng.random((3, 4))
    scores[1, 2] = np.nan  # a head the detector could not score keeps its NaN
    flagged = scores > 0.5
    evidence = [
        {"alpha": float(s), "positions": [i, i + 1], "note": f"row {i}"}
        for i, s in enumerate(scores.ravel())
    ]
    return HeadTable.from_matrix(
        scores,
        flagged,
        evidence=evidence,
        detector=detector,
        prompt_set=prompt_set,
        params={"threshold": 0.5, "window": [1, 2]},
        summary={"rate": float(flagged.mean())},
        description=f"{detector} test table",
    )


def make_layer_table() -> LayerTable:
    frame = pd.DataFrame(
        {
            "layer": [2, 0, 1],  # deliberately not sorted: row order must survive
            "score": [0.9, 0.1, 0.4],
            "flagged": [True, False, False],
            "evidence": [{"cos": 0.9}, {}, {"cos": 0.4, "pairs": [[0, 1]]}],
        }
    )
    return LayerTable(
        detector="redundancy",
        prompt_set="prose",
        frame=frame,
        n_layers=3,
        params={"metric": "cosine"},
        summary={"mean": 0.466},
    )


def write_small_run(out, **kwargs):
    defaults = {
        "manifest": {"model": {"spec": "tiny:llama"}, "timing": {"total_s": 1.5}},
        "head_tables": [make_head_table("induction", "random-repeat")],
    }
    return write_run(out, **{**defaults, **kwargs})


def test_round_trip_is_exact(tmp_path):
    heads = [make_head_table("induction", "random-repeat", 0), make_head_table("sink", "prose", 1)]
    layers = [make_layer_table()]
    tensors = {
        "prose/sink_alpha_by_key": torch.arange(12, dtype=torch.float32).reshape(3, 4).T,
        "prose/counts": torch.tensor([1, 2, 3], dtype=torch.int64),
    }
    samples = {"prose": {"tokens": torch.tensor([5, 6, 7]), "patterns": torch.rand(3, 4, 3, 3)}}
    manifest = {"model": {"spec": "tiny:llama", "arch": {"n_layers": 3}}, "timing": {"s": 2.0}}

    out = write_run(
        tmp_path / "runs" / "demo",
        manifest=manifest,
        head_tables=heads,
        layer_tables=layers,
        tensors=tensors,
        samples=samples,
    )
    assert out == (tmp_path / "runs" / "demo").resolve()
    assert sorted(p.name for p in out.iterdir()) == [
        "heads.parquet",
        "layers.parquet",
        "manifest.json",
        "samples",
        "stats.safetensors",
    ]

    run = open_run(out)
    assert isinstance(run, Run) and run.name == "demo"
    assert run.manifest["schema_version"] == SCHEMA_VERSION
    assert run.manifest["model"] == manifest["model"]
    assert run.manifest["timing"] == {"s": 2.0}
    assert set(run.manifest["versions"]) == {
        "headscope",
        "python",
        "torch",
        "transformers",
        "transformer_lens",
    }
    assert run.manifest["created"].endswith("+00:00")
    assert [t["kind"] for t in run.manifest["tables"]] == ["head", "head", "layer"]
    assert run.manifest["tables"][0]["n_heads"] == 4

    loaded = run.head_tables()
    assert len(loaded) == 2
    for original, back in zip(heads, loaded, strict=True):
        pd.testing.assert_frame_equal(back.frame, original.frame)
        assert back.frame["layer"].dtype == np.int64 and back.frame["head"].dtype == np.int64
        assert back.frame["score"].dtype == np.float64 and back.frame["flagged"].dtype == bool
        assert (back.detector, back.prompt_set) == (original.detector, original.prompt_set)
        assert (back.n_layers, back.n_heads) == (3, 4)
        assert back.params == original.params
        assert back.summary == original.summary
        assert back.description == original.description
    assert np.isnan(loaded[0].score(1, 2))

    (layer_back,) = run.layer_tables()
    pd.testing.assert_frame_equal(layer_back.frame, layers[0].frame)
    assert layer_back.frame["layer"].tolist() == [2, 0, 1]
    assert (layer_back.n_layers, layer_back.params) == (3, {"metric": "cosine"})

    stored = run.tensors()
    assert set(stored) == set(tensors)
    for name, tensor in tensors.items():
        assert torch.equal(stored[name], tensor) and stored[name].dtype == tensor.dtype

    assert run.sample_names() == ["prose"]
    sample = run.samples("prose")
    assert torch.equal(sample["tokens"], samples["prose"]["tokens"])
    assert torch.equal(sample["patterns"], samples["prose"]["patterns"])

    assert run.head_table("sink").prompt_set == "prose"
    assert run.head_table("induction", "random-repeat").detector == "induction"
    html = run._repr_html_()
    assert "tiny:llama" in html and "induction" in html and "random-repeat" in html


def test_run_without_layers_tensors_or_samples(tmp_path):
    run = open_run(write_small_run(tmp_path / "small"))
    assert not (run.path / "layers.parquet").exists()
    assert run.layer_tables() == []
    assert run.tensors() == {}
    assert run.sample_names() == []


def test_head_table_lookup_errors_list_what_exists(tmp_path):
    heads = [make_head_table("induction", "a"), make_head_table("induction", "b")]
    run = open_run(write_run(tmp_path / "r", manifest={}, head_tables=heads))
    with pytest.raises(HeadscopeError, match=r"no head table for copying.*induction/a"):
        run.head_table("copying")
    with pytest.raises(HeadscopeError, match="several head tables"):
        run.head_table("induction")
    assert run.head_table("induction", "b").prompt_set == "b"
    with pytest.raises(HeadscopeError, match="no sample 'x'"):
        run.samples("x")


def test_primary_prompt_set_picks_among_several(tmp_path):
    heads = [make_head_table("induction", "a"), make_head_table("induction", "b")]
    manifest = {"detectors": [{"name": "induction", "primary_prompt_set": "b"}]}
    run = open_run(write_run(tmp_path / "r", manifest=manifest, head_tables=heads))
    assert run.head_table("induction").prompt_set == "b"


def test_duplicate_tables_are_refused_before_writing(tmp_path):
    table = make_head_table("induction", "a")
    with pytest.raises(HeadscopeError, match="two head tables"):
        write_run(tmp_path / "r", manifest={}, head_tables=[table, table])
    assert list(tmp_path.iterdir()) == []


def test_check_output_folder_refuses_existing_run_without_force(tmp_path):
    out = write_small_run(tmp_path / "x")
    with pytest.raises(HeadscopeError, match="already holds a headscope run; pass --force") as info:
        check_run(out, force=False)
    assert str(out) in str(info.value)
    assert check_run(out, force=True) == out
    assert check_run(tmp_path / "new", force=False) == (tmp_path / "new").resolve()


def test_check_output_folder_never_allows_replacing_a_non_run(tmp_path):
    folder = tmp_path / "thesis"
    folder.mkdir()
    (folder / "chapter1.tex").write_text("precious")
    a_file = tmp_path / "notes.txt"
    a_file.write_text("precious")
    for target in (folder, a_file):
        for force in (False, True):
            with pytest.raises(HeadscopeError, match="not a headscope run"):
                check_run(target, force=force)
        with pytest.raises(HeadscopeError, match="not a headscope run"):
            write_small_run(target, force=True)
    assert (folder / "chapter1.tex").read_text() == "precious"
    assert a_file.read_text() == "precious"


def test_an_empty_folder_is_used_without_force(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert check_run(empty, force=False) == empty.resolve()
    write_small_run(empty)
    assert open_run(empty).head_table("induction").n_heads == 4


def test_force_replaces_an_existing_run(tmp_path):
    out = write_small_run(tmp_path / "x", manifest={"model": {"spec": "old"}})
    (out / "stats.safetensors").write_bytes(b"leftover from the old run")
    with pytest.raises(HeadscopeError, match="already holds a headscope run"):
        write_small_run(out, manifest={"model": {"spec": "new"}})
    write_small_run(
        out,
        manifest={"model": {"spec": "new"}},
        head_tables=[make_head_table("sink", "p")],
        force=True,
    )
    run = open_run(out)
    assert run.manifest["model"]["spec"] == "new"
    assert [t.detector for t in run.head_tables()] == ["sink"]
    assert not (out / "stats.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]  # old copy deleted


def test_failure_while_writing_leaves_nothing(tmp_path, monkeypatch):
    def broken_save(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken_save)
    with pytest.raises(RuntimeError, match="disk full"):
        write_small_run(tmp_path / "x", tensors={"a": torch.zeros(2)})
    assert list(tmp_path.iterdir()) == []


def test_failed_forced_write_keeps_the_old_run(tmp_path, monkeypatch):
    out = write_small_run(tmp_path / "x", manifest={"model": {"spec": "old"}})

    def broken_save(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken_save)
    with pytest.raises(RuntimeError):
        write_small_run(out, force=True, tensors={"a": torch.zeros(2)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]
    assert open_run(out).manifest["model"]["spec"] == "old"


def test_sample_names_must_be_plain(tmp_path):
    with pytest.raises(HeadscopeError, match="not a plain file name"):
        write_small_run(tmp_path / "x", samples={"../escape": {"a": torch.zeros(1)}})
    assert list(tmp_path.iterdir()) == []


def test_open_run_errors_name_the_path(tmp_path):
    missing = tmp_path / "missing"
    with pytest.raises(HeadscopeError, match="does not exist") as info:
        open_run(missing)
    assert str(missing) in str(info.value)

    no_manifest = tmp_path / "no_manifest"
    no_manifest.mkdir()
    with pytest.raises(HeadscopeError, match="no manifest.json") as info:
        open_run(no_manifest)
    assert str(no_manifest) in str(info.value)

    corrupt = write_small_run(tmp_path / "corrupt")
    (corrupt / "manifest.json").write_text("{not json")
    with pytest.raises(HeadscopeError, match="not readable JSON") as info:
        open_run(corrupt)
    assert str(corrupt) in str(info.value)

    newer = write_small_run(tmp_path / "newer")
    manifest = json.loads((newer / "manifest.json").read_text())
    manifest["schema_version"] = SCHEMA_VERSION + 1
    (newer / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(HeadscopeError, match="upgrade headscope") as info:
        open_run(newer)
    assert str(newer) in str(info.value)

    bad_parquet = write_small_run(tmp_path / "bad_parquet")
    (bad_parquet / "heads.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(HeadscopeError, match="not a readable Parquet file") as info:
        open_run(bad_parquet)
    assert str(bad_parquet) in str(info.value)

    lost_parquet = write_small_run(tmp_path / "lost_parquet")
    (lost_parquet / "heads.parquet").unlink()
    with pytest.raises(HeadscopeError, match="has no heads.parquet"):
        open_run(lost_parquet)


def test_corrupt_tensor_file_raises_headscope_error(tmp_path):
    out = write_small_run(tmp_path / "x", tensors={"a": torch.ones(3)})
    (out / "stats.safetensors").write_bytes(b"garbage")
    with pytest.raises(HeadscopeError, match="not a readable safetensors file"):
        open_run(out).tensors()


def test_list_runs_sorts_newest_first_and_skips_bad_and_partial(tmp_path):
    root = tmp_path / "runs"
    for name, created in (("old", "2024-01-01"), ("newest", "2024-03-01"), ("mid", "2024-02-01")):
        write_small_run(
            root / name, manifest={"created": f"{created}T00:00:00+00:00", "model": {"spec": name}}
        )
    bad = write_small_run(root / "bad")
    (bad / "manifest.json").write_text("[[[")
    write_small_run(root / ".half.partial-1234")
    (root / "not_a_run").mkdir()
    (root / "stray.txt").write_text("x")

    found = list_runs(root)
    assert [s.name for s in found] == ["newest", "mid", "old"]
    assert found[0].model == "newest"
    assert found[0].created == "2024-03-01T00:00:00+00:00"
    assert found[0].detectors == ["induction"]
    assert found[0].prompt_sets == ["random-repeat"]
    assert found[0].path == root / "newest"
    assert list_runs(tmp_path / "nowhere") == []


def test_headscope_scan_is_the_function_and_scanning_the_module():
    """``headscope.scan`` is only the function; the module is ``headscope.scanning``."""
    import importlib.util

    import headscope
    import headscope.scanning

    assert headscope.scan is headscope.scanning.scan
    assert importlib.util.find_spec("headscope.scan") is None
    result = headscope.scan(
        "tiny:llama", prompts="prose", detectors="first_token_sink", n_prompts=2,
        on_progress=False,
    )  # fmt: skip
    assert type(result).__name__ == "ScanResult"


def check_run(out, *, force: bool):
    return check_output_folder(out, RUN_FOLDER, force=force)
