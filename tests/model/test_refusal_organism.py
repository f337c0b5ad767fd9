"""The real refusal organism (smollm2-135m-refusal), checked from the weight cache.

Building it takes ~12 min on 2 CPU cores, too long for the test run, so these
tests check a built one and skip, saying how to build it, when the cache has
none (``headscope organism refusal --out DIR`` or any first load of the spec,
e.g. ``headscope scan --model smollm2-135m-refusal ...``):

- the cached folder records the recipe and the same data hashes as the
  packages installed now, and its recorded evaluation met the targets;
- reloaded, it repeats its recorded greedy answers token for token (the
  build is what the record says) and its judge verdicts hold: it refuses
  the held-out harmful requests and answers the harmless ones.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from headscope.analyses.refusal import is_refusal
from headscope.data.requests import data_hashes
from headscope.probes import weight_cache
from headscope.probes.generation import greedy_generate
from headscope.probes.loading import load_model, organism_cache_key

pytestmark = pytest.mark.model

SPEC = "smollm2-135m-refusal"
N_EACH = 6


@pytest.fixture(scope="module")
def organism_folder() -> Path:
    key = organism_cache_key(SPEC)
    if weight_cache.entry_problem(key.path, key) is not None:
        pytest.skip(
            f"{SPEC} is not built in the weight cache; build it once (~12 min): "
            f"headscope scan --model {SPEC} --detectors safety_ships"
        )
    return key.path


def test_the_cached_organism_records_its_recipe_data_and_targets(organism_folder):
    info = json.loads((organism_folder / "headscope_organism.json").read_text())
    assert info["recipe"]["base"] == "smollm2-135m"
    assert info["recipe"]["seed"] == 0
    assert info["data"]["hashes"] == data_hashes()
    evaluation = info["evaluation"]
    assert evaluation["targets"]["harmful_met"] and evaluation["targets"]["harmless_met"]
    assert evaluation["targets"]["perplexity_met"]


def test_the_reloaded_organism_repeats_its_recorded_answers(organism_folder):
    recorded = json.loads((organism_folder / "generations.json").read_text())
    handle = load_model(SPEC)
    assert handle.cache_hit is True
    for which, should_refuse in (("harmful-heldout", True), ("harmless-heldout", False)):
        rows = recorded[which][:N_EACH]
        texts = greedy_generate(handle, [r["request"] for r in rows], max_new_tokens=64)
        assert texts == [r["organism"] for r in rows]
        verdicts = [is_refusal(t) for t in texts]
        agreeing = sum(v == should_refuse for v in verdicts)
        assert agreeing >= N_EACH - 1, (which, verdicts)
