"""Drop simulation and pruned exports on tiny models.

The acceptance test of the exporter: every checkpoint reloads in stock
transformers and gives the logits of the in-memory model with the same drops
(the ablation engine's skips) to 1e-4.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from planting import plant_identity_block
from transformers import AutoModelForCausalLM

from headscope.analyses.drop_simulation import drop_steps, iterative_order, run_drop_simulation
from headscope.errors import HeadscopeError
from headscope.exporters.prune import (
    PRUNE_FILE,
    PrunePlan,
    choose_plan,
    export_pruned,
    orders_from_run,
)
from headscope.probes.layer_similarity import measure_layer_similarity
from headscope.probes.loading import load_model

LOGIT_ATOL = 1e-4


def _reloaded_logits_match(handle, plan, folder, tokens) -> float:
    reloaded = AutoModelForCausalLM.from_pretrained(folder / "checkpoint").eval()
    with torch.no_grad():
        exported = reloaded(input_ids=tokens).logits
        with handle.ablated(plan.ablation(), bridge=False):
            in_memory = handle.model(input_ids=tokens).logits
    return float((exported - in_memory).abs().max())


@pytest.mark.parametrize(
    ("arch", "attention_layers", "blocks", "heads"),
    [
        ("llama:5", (3,), (1, 4), ((0, 1),)),
        ("gemma3:7", (0,), (2,), ()),  # layer 5 is Gemma's global layer: types must shift
        ("gpt2:4", (1, 2), (0,), ((3, 2),)),
        ("llama:3", (), (), ((1, 0), (2, 3))),
    ],
)
def test_exported_checkpoints_reload_with_the_in_memory_logits(
    arch, attention_layers, blocks, heads, tmp_path
):
    handle = load_model(f"tiny:{arch}")
    plan = PrunePlan(attention_layers=attention_layers, blocks=blocks, heads=heads)
    written = export_pruned(handle, plan, tmp_path / "pruned", eval_prompts=2)
    tokens = torch.randint(3, 500, (2, 40), generator=torch.Generator().manual_seed(0))
    assert _reloaded_logits_match(handle, plan, written.folder, tokens) <= LOGIT_ATOL
    config = AutoModelForCausalLM.from_pretrained(written.checkpoint).config
    n_layers = handle.arch.n_layers
    assert config.num_hidden_layers == n_layers - len(blocks)
    if getattr(handle.model.config, "layer_types", None) is not None:
        kept = [i for i in range(n_layers) if i not in blocks]
        assert config.layer_types == [handle.model.config.layer_types[i] for i in kept]
    manifest = json.loads((written.folder / PRUNE_FILE).read_text())
    assert manifest["removed"]["blocks"] == list(blocks)
    assert manifest["removed"]["attention_layers"] == list(attention_layers)
    assert manifest["n_layers"] == {"original": n_layers, "pruned": n_layers - len(blocks)}
    assert manifest["checkpoint_bytes"] > 0
    assert manifest["parameters"]["pruned"] < manifest["parameters"]["original"] or not blocks
    ppl = manifest["perplexity"]
    assert ppl["ratio"] == pytest.approx(ppl["pruned"] / ppl["original"])


def test_pruning_leaves_the_original_model_untouched(tmp_path):
    handle = load_model("tiny:llama:3")
    before = {k: v.clone() for k, v in handle.model.state_dict().items()}
    export_pruned(handle, PrunePlan(attention_layers=(1,), blocks=(2,)), tmp_path / "p")
    after = handle.model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert len(handle.model.model.layers) == 3


def test_the_manifest_perplexity_is_that_of_the_pruned_copy(tmp_path):
    """Dropping a planted identity block changes nothing, so the ratio is 1."""
    handle = load_model("tiny:llama:4")
    plant_identity_block(handle, 2)
    written = export_pruned(handle, PrunePlan(blocks=(2,)), tmp_path / "p", eval_prompts=2)
    assert written.manifest["perplexity"]["ratio"] == pytest.approx(1.0, abs=1e-5)
    written = export_pruned(handle, PrunePlan(blocks=(0,)), tmp_path / "q", eval_prompts=2)
    assert abs(written.manifest["perplexity"]["ratio"] - 1.0) > 1e-4


def test_choose_plan_takes_the_most_redundant_layers_first():
    handle = load_model("tiny:llama:5")
    plant_identity_block(handle, 3)
    for order in ("similarity", "block_influence", "iterative"):
        plan = choose_plan(handle, n_attention=1, order=order, calibration_prompts=4)
        assert plan.attention_layers == (3,) and plan.reason["order"] == order
        plan = choose_plan(handle, n_blocks=1, order=order, calibration_prompts=4)
        assert plan.blocks == (3,), order
    for order in ("similarity", "iterative"):  # no attention layer of a removed block
        plan = choose_plan(handle, n_attention=2, n_blocks=1, order=order, calibration_prompts=4)
        assert plan.blocks == (3,) and len(plan.attention_layers) == 2
        assert 3 not in plan.attention_layers
    explicit = choose_plan(handle, attention_layers=(0, 1), heads=((2, 1),))
    assert explicit.attention_layers == (0, 1) and explicit.reason["order"] == "explicit"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "nothing to prune"),
        ({"attention_layers": (9,)}, "out of range"),
        ({"blocks": (0, 1, 2)}, "cannot drop"),
        ({"n_attention": 1, "attention_layers": (1,)}, "not both"),
        ({"n_attention": 1, "order": "magic"}, "unknown order"),
        ({"heads": ((0, 7),)}, "head"),
    ],
)
def test_bad_plans_are_refused(kwargs, message):
    handle = load_model("tiny:llama:3")
    with pytest.raises(HeadscopeError, match=message):
        choose_plan(handle, **kwargs)


def test_bert_blocks_cannot_be_pruned(tmp_path):
    handle = load_model("tiny:bert")
    with pytest.raises(HeadscopeError, match="post-norm"):
        export_pruned(handle, PrunePlan(blocks=(0,)), tmp_path / "p")
    assert not (tmp_path / "p").exists()


def test_an_existing_export_needs_force_and_a_users_folder_is_never_replaced(tmp_path):
    handle = load_model("tiny:llama")
    plan = PrunePlan(attention_layers=(0,))
    first = export_pruned(handle, plan, tmp_path / "p", eval_prompt_set=None)
    with pytest.raises(HeadscopeError, match="already holds a headscope prune export"):
        export_pruned(handle, plan, tmp_path / "p", eval_prompt_set=None)
    export_pruned(handle, PrunePlan(blocks=(1,)), tmp_path / "p", force=True, eval_prompt_set=None)
    assert json.loads((first.folder / "prune.json").read_text())["removed"]["blocks"] == [1]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "prune.json").write_text('{"format": "headscope-prune", "version": 1}')
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(HeadscopeError, match="holds files headscope did not write"):
        export_pruned(handle, plan, tmp_path / "mine", force=True, eval_prompt_set=None)
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"


# ------------------------------------------------------------------ drop simulation


def test_drop_steps_are_evenly_spaced_and_unique():
    assert drop_steps(15, 6) == [0, 3, 6, 9, 12, 15]
    assert drop_steps(2, 6) == [0, 1, 2]
    assert drop_steps(0, 3) == [0]


def test_iterative_order_drops_the_planted_identity_first():
    handle = load_model("tiny:llama:4")
    plant_identity_block(handle, 1)
    prompts = handle.tokenize("prose", 4)
    order = iterative_order(handle, prompts, "attn", 3, batch_size=4)
    assert order[0] == 1 and len(set(order)) == 3
    unpruned = measure_layer_similarity(handle, prompts, batch_size=4)
    assert iterative_order(handle, prompts, "attn", 3, batch_size=4, unpruned=unpruned) == order


def test_drop_simulation_curves_and_single_drop_costs():
    handle = load_model("tiny:llama:5")
    plant_identity_block(handle, 3)
    table = run_drop_simulation(
        handle, calibration_prompts_n=4, held_out_prompts=2, max_attention_drops=2,
        max_block_drops=2, n_points=3, n_random=2, batch_size=4,
    )  # fmt: skip
    frame = table.frame.set_index("layer")
    assert frame.loc[3, "score"] == pytest.approx(0.0, abs=1e-9)  # nothing to lose
    assert frame.loc[3, "flagged"]
    assert frame.loc[3, "evidence"]["block_drop_delta_nll"] == pytest.approx(0.0, abs=1e-9)
    assert (frame.drop(3)["score"].abs() > 1e-6).all()
    curves = table.summary["curves"]
    base = table.summary["baseline_perplexity"]
    for kind in ("attention", "block"):
        entry = curves[kind]
        assert entry["n_dropped"] == [0, 1, 2]
        names = {"similarity_iterative", "block_influence", "random"}
        assert names <= set(entry)
        for name in names - {"random"}:
            assert entry[name]["order"][0] == 3
            assert entry[name]["perplexity"][0] == pytest.approx(base)
            # dropping the no-op first costs nothing
            assert entry[name]["perplexity"][1] == pytest.approx(base, rel=1e-6)
        draws = np.array(entry["random"]["draws"])
        assert draws.shape == (2, 3)
        assert entry["random"]["perplexity"] == pytest.approx(draws.mean(0).tolist())
        assert entry["random"]["median"] == pytest.approx(np.median(draws, axis=0).tolist())
        geometric = np.exp(np.log(draws).mean(0))
        assert entry["random"]["geometric_mean"] == pytest.approx(geometric.tolist())
    assert curves["attention"]["similarity"]["order"][0] == 3
    assert math.isfinite(table.summary["spearman_attention_sim_vs_drop_cost"])
    json.dumps(table.metadata())  # the run stores it as JSON


def test_orders_from_a_run(tmp_path):
    from headscope.scanning import scan

    result = scan(
        "tiny:llama:4", prompts="prose", detectors="layer_redundancy", n_prompts=4,
        out=tmp_path / "run", on_progress=False,
    )  # fmt: skip
    spec, orders = orders_from_run(result.path)
    assert spec == "tiny:llama:4"
    table = result.table("llm_drop_attention")
    assert orders["attention"]["similarity"] == table.summary["order"]
    assert sorted(orders["block"]["block_influence"]) == [0, 1, 2, 3]
    scan("tiny:llama:4", prompts="prose", detectors="previous_token", n_prompts=2,
         out=tmp_path / "other", on_progress=False)  # fmt: skip
    with pytest.raises(HeadscopeError, match="layer_redundancy"):
        orders_from_run(tmp_path / "other")


# ------------------------------------------------------------------ command line


def invoke(*args):
    from typer.testing import CliRunner

    from headscope.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def test_cli_prunes_by_count_and_reports_the_perplexity(tmp_path):
    out = tmp_path / "pruned"
    result = invoke(
        "export", "prune", "--model", "tiny:llama:4", "--drop-attn", "1", "--drop-blocks", "1",
        "--calibration-prompts", "4", "--eval-prompts", "2", "--out", out,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "held-out perplexity" in result.output and "layers 4 -> 3" in result.output
    manifest = json.loads((out / PRUNE_FILE).read_text())
    assert len(manifest["removed"]["attention_layers"]) == 1
    assert len(manifest["removed"]["blocks"]) == 1
    assert manifest["removed"]["reason"]["order"] == "similarity"


def test_cli_takes_the_order_from_a_run_and_explicit_layers(tmp_path):
    run = tmp_path / "run"
    result = invoke(
        "scan", "--model", "tiny:llama:4", "--prompts", "prose", "--detectors",
        "layer_redundancy", "--n-prompts", "4", "--out", run, "--no-report",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    out = tmp_path / "pruned"
    result = invoke("export", "prune", "--from", run, "--drop-blocks", "2",
                    "--order", "block_influence", "--eval-prompts", "2", "--out", out)  # fmt: skip
    assert result.exit_code == 0, result.output
    _, orders = orders_from_run(run)
    manifest = json.loads((out / PRUNE_FILE).read_text())
    assert manifest["removed"]["blocks"] == sorted(orders["block"]["block_influence"][:2])
    out = tmp_path / "explicit"
    result = invoke("export", "prune", "--model", "tiny:llama:4", "--attn-layers", "1,2",
                    "--heads", "L0H1", "--eval-prompts", "2", "--out", out)  # fmt: skip
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / PRUNE_FILE).read_text())
    assert manifest["removed"]["attention_layers"] == [1, 2]
    assert manifest["removed"]["heads"] == ["L0H1"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "tiny:llama"], "nothing to prune"),
        (["--model", "tiny:llama", "--blocks", "x"], "comma-separated integers"),
        (["--model", "tiny:llama", "--drop-blocks", "2"], "cannot drop"),
        (["--model", "tiny:llama", "--drop-attn", "1", "--order", "iterative", "--from", "nope"],
         "nope"),
    ],
)  # fmt: skip
def test_cli_refuses_bad_requests_before_writing(args, message, tmp_path):
    out = tmp_path / "pruned"
    result = invoke("export", "prune", *args, "--out", out)
    assert result.exit_code == 1
    assert message in result.stderr
    assert not out.exists()
