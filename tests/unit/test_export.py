"""Head-ablation exports: baked checkpoint, JSON spec through TransformerLens hooks, CLI."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
import torch
from typer.testing import CliRunner

from headscope.cli import app
from headscope.errors import HeadscopeError
from headscope.exporters.ablation import (
    bake_zero_ablation,
    export_ablation,
    heads_from_run,
    read_spec,
)
from headscope.probes.ablation import Ablation, mean_ablation
from headscope.probes.loading import load_model

TOKENS = torch.tensor([[1, 50, 60, 70, 80, 90, 100, 110], [1, 9, 8, 7, 6, 5, 4, 3]])
runner = CliRunner()


HIDDEN = ("headscope", "headscope.ablation_spec", "headscope.exporters.transformer_lens_hooks")


def load_hooks_module(folder):
    """Import the exported standalone hooks file the way a user would, headscope unimportable:
    it must take the spec module from beside it."""
    saved = {name: sys.modules.get(name) for name in HIDDEN}
    sys.modules.update(dict.fromkeys(HIDDEN))  # None: `import headscope...` raises ImportError
    try:
        spec = importlib.util.spec_from_file_location(
            "exported_hooks", folder / "transformer_lens_hooks.py"
        )
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        for name, value in saved.items():
            if value is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = value
    assert module.ablation_spec.__file__ == str(folder / "ablation_spec.py")
    return module


def ablated_logits(handle, ablation):
    with handle.ablated(ablation), torch.no_grad():
        return handle.model(TOKENS).logits


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3"])
def test_baked_checkpoint_reloads_in_stock_transformers_with_the_ablated_logits(arch, tmp_path):
    from transformers import AutoModelForCausalLM

    handle = load_model(f"tiny:{arch}")
    ablation = Ablation(method="zero", heads=((0, 1), (1, 0), (1, 3)))
    expected = ablated_logits(handle, ablation)
    written = export_ablation(handle, ablation, tmp_path / "export")
    reloaded = AutoModelForCausalLM.from_pretrained(written.checkpoint).eval()
    with torch.no_grad():
        got = reloaded(TOKENS).logits
        plain = handle.model(TOKENS).logits
    assert (got - expected).abs().max() <= 1e-4
    assert (got - plain).abs().max() > 1e-3  # the ablation is really in the weights


def test_json_spec_through_the_exported_hooks_gives_the_same_logits(tmp_path):
    handle = load_model("tiny:llama")
    for method, ablation in (
        ("zero", Ablation(method="zero", heads=((1, 2), (0, 0)))),
        ("mean", mean_ablation(handle, [(1, 2), (0, 0)], n_prompts=3, per_position=True)),
        ("query_scale", Ablation(method="query_scale", heads=((1, 1),))),
    ):
        expected = ablated_logits(handle, ablation)
        written = export_ablation(handle, ablation, tmp_path / method)
        spec = json.loads(written.spec.read_text())
        hooks = load_hooks_module(written.folder).ablation_hooks(spec, handle.bridge)
        with handle.bridge.hooks(fwd_hooks=hooks), torch.no_grad():
            got = handle.bridge(TOKENS)
        assert (got - expected).abs().max() <= 1e-4, method
        assert (written.checkpoint is not None) == (method == "zero")


def test_baking_touches_only_the_ablated_heads_output_columns():
    """GQA: head 0 and head 1 share KV head 0; zeroing head 0 leaves head 1's columns and
    every K/V weight as they were."""
    handle = load_model("tiny:llama")
    baked = bake_zero_ablation(handle, Ablation(heads=((1, 0),)))
    original = handle.model.model.layers[1].self_attn
    edited = baked.model.layers[1].self_attn
    assert torch.all(edited.o_proj.weight[:, :16] == 0)
    assert torch.equal(edited.o_proj.weight[:, 16:], original.o_proj.weight[:, 16:])
    for name in ("q_proj", "k_proj", "v_proj"):
        assert torch.equal(getattr(edited, name).weight, getattr(original, name).weight)
    assert not torch.all(original.o_proj.weight[:, :16] == 0)  # the handle's model is a copy


def test_spec_file_has_the_model_and_reference_and_reads_back(tmp_path):
    handle = load_model("tiny:llama")
    written = export_ablation(handle, mean_ablation(handle, [(1, 1)], n_prompts=2), tmp_path / "m")
    spec = read_spec(written.folder)
    assert spec["format"] == "headscope-ablation" and spec["version"] == 1
    assert spec["model"]["spec"] == "tiny:llama" and spec["model"]["n_heads"] == 4
    assert spec["head_names"] == ["L1H1"] and spec["method"] == "mean"
    assert (
        spec["reference"]["prompt_set"] == "prose"
        and len(spec["reference"]["values"]["L1H1"]) == 16
    )


def test_bad_exports_write_nothing(tmp_path):
    handle = load_model("tiny:llama")
    with pytest.raises(HeadscopeError, match="outside this model"):
        export_ablation(handle, Ablation(heads=((7, 0),)), tmp_path / "bad")
    with pytest.raises(HeadscopeError, match="only zero ablation can be baked"):
        export_ablation(
            handle, Ablation(method="query_scale", heads=((0, 0),)), tmp_path / "q", checkpoint=True
        )
    with pytest.raises(HeadscopeError, match="whole block cannot be baked"):
        export_ablation(handle, Ablation(skip=(("block", 0),)), tmp_path / "b")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    for force in (False, True):
        with pytest.raises(HeadscopeError, match="already exists and is not a headscope"):
            export_ablation(handle, Ablation(heads=((0, 0),)), tmp_path / "taken", force=force)
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["keep.txt"]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_cli_exports_heads_given_by_name(tmp_path):
    out = tmp_path / "ablation"
    result = invoke("export", "ablation", "L1H0,L0H2", "--model", "tiny:llama", "--out", out)
    assert result.exit_code == 0, result.output
    spec = json.loads((out / "ablation.json").read_text())
    assert spec["heads"] == [[1, 0], [0, 2]] and spec["method"] == "zero"
    assert (out / "checkpoint" / "config.json").is_file()
    assert (out / "transformer_lens_hooks.py").is_file()
    assert (out / "ablation_spec.py").is_file()


def test_exported_modules_are_headscopes_own_and_stand_alone(tmp_path):
    from headscope import ablation_spec
    from headscope.exporters import transformer_lens_hooks

    written = export_ablation(
        load_model("tiny:llama"), Ablation(method="query_scale", heads=((0, 1),)), tmp_path / "x"
    )
    for module in (ablation_spec, transformer_lens_hooks):
        name = module.__name__.rsplit(".", 1)[1] + ".py"
        assert (written.folder / name).read_bytes() == open(module.__file__, "rb").read()
    hooks = load_hooks_module(written.folder)
    assert hooks.ablation_spec.head_name(3, 5) == "L3H5"
    with pytest.raises(ValueError, match=r"^malformed head 'L3X5'; write heads as L<layer>H<head>"):
        hooks.ablation_spec.parse_head_name("L3X5")
    spec = json.loads(written.spec.read_text())
    assert [name for name, _ in hooks.ablation_hooks(spec, object())] == ["blocks.0.attn.hook_q"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["L1X0"], "malformed head 'L1X0'"),
        (["L1H9"], "L1H9 are outside this model"),
        ([], "give the heads"),
        (["L0H0", "--method", "scramble"], "unknown ablation method"),
    ],
)
def test_cli_rejects_bad_heads_before_writing(tmp_path, args, message):
    out = tmp_path / "ablation"
    result = invoke("export", "ablation", *args, "--model", "tiny:llama", "--out", out)
    assert result.exit_code == 1
    assert type(result.exception) is SystemExit, repr(result.exception)  # not an uncaught error
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], lines
    assert "internal error" not in lines[0], lines[0]
    assert not out.exists()


def test_cli_takes_the_top_heads_of_a_run(tmp_path):
    run = tmp_path / "run"
    scan = invoke(
        "scan", "--model", "tiny:llama", "--prompts", "prose", "--detectors", "previous_token",
        "--n-prompts", "3", "--seq-len", "12", "--out", run, "--no-report",
    )  # fmt: skip
    assert scan.exit_code == 0, scan.output
    model, expected = heads_from_run(run, "previous_token", top=2)
    assert model == "tiny:llama" and len(expected) == 2
    out = tmp_path / "export"
    result = invoke(
        "export", "ablation", "--from", run, "--role", "previous_token", "--top", "2",
        "--method", "mean", "--reference-prompts", "2", "--out", out,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    spec = json.loads((out / "ablation.json").read_text())
    assert [tuple(h) for h in spec["heads"]] == list(expected)
    assert not (out / "checkpoint").exists()  # mean ablation has no weight-only form
    missing = invoke("export", "ablation", "--from", run, "--role", "induction", "--out", out)
    assert missing.exit_code == 1 and "no head table for induction" in missing.stderr
