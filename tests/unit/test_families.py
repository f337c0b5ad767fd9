"""Head families on synthetic scans: planted groups, stability, input hygiene, errors.

No model runs: statistics are stand-ins with the attributes the analysis reads
(``means``, ``lengths``, ``causal``, ``n_layers``, ``n_heads``) and role scores
are HeadTables built from arrays.
"""

from __future__ import annotations

import json
import math
import types

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import adjusted_rand_score

from headscope.ablation_spec import parse_head_name
from headscope.analyses import get_detector
from headscope.analyses.families import (
    PROTOCOLS,
    _relabel,
    detect_head_families,
    head_features,
)
from headscope.errors import HeadscopeError
from headscope.tables import HeadTable, LayerTable, evidence_to_json

N_LAYERS, N_HEADS = 4, 6
LENGTHS = [20, 30]
# planted groups with distinct sizes (10 / 8 / 6), so family numbers are known
SIZES = {"sink": 10, "previous": 8, "diffuse": 6}
PROFILES = {  # entropy (nats), max_prob, sink_mass, mean_distance, output_norm, prev, sink score
    "sink": (0.3, 0.9, 0.9, 12.0, 0.5, 0.05, 0.9),
    "previous": (0.5, 0.8, 0.05, 1.0, 8.0, 0.85, 0.05),
    "diffuse": (2.5, 0.1, 0.1, 8.0, 4.0, 0.1, 0.1),
}


def _stats(prompt_set: str, means: dict[str, np.ndarray], *, lengths=LENGTHS, causal=True):
    n_layers, n_heads = next(iter(means.values())).shape
    return types.SimpleNamespace(
        prompt_set=prompt_set,
        causal=causal,
        n_layers=n_layers,
        n_heads=n_heads,
        lengths=list(lengths),
        means={k: torch.tensor(v, dtype=torch.float64) for k, v in means.items()},
    )


def _table(detector: str, scores: np.ndarray, prompt_set: str = "prose") -> HeadTable:
    return HeadTable.from_matrix(
        scores, scores > 0.5, detector=detector, prompt_set=prompt_set, summary={}
    )


def _planted(seed: int = 0, noise: float = 0.01):
    """Stats on one set plus two role tables; returns (tables, stats_by_set, groups[L, H])."""
    rng = np.random.default_rng(seed)
    groups = rng.permutation(np.repeat(list(SIZES), list(SIZES.values()))).reshape(
        N_LAYERS, N_HEADS
    )
    columns = np.array([PROFILES[g] for g in groups.ravel()]).reshape(N_LAYERS, N_HEADS, -1)
    columns = columns * (1 + noise * rng.standard_normal(columns.shape))
    names = ("entropy", "max_prob", "sink_mass", "mean_distance", "output_norm")
    stats = {"prose": _stats("prose", {n: columns[..., i] for i, n in enumerate(names)})}
    tables = [
        _table("previous_token", columns[..., 5]),
        _table("first_token_sink", columns[..., 6]),
    ]
    return tables, stats, groups


def _labels(table: HeadTable) -> np.ndarray:
    return np.array([e["family"] for e in table.frame["evidence"]])


def test_defaults_come_from_the_signature():
    assert get_detector("head_families").defaults == {
        "protocol": "blocks",
        "n_families": None,
        "n_bootstrap": 50,
        "max_families": 8,
        "seed": 0,
        "embedding": "pca",
    }


def test_features_are_normalised_and_named():
    tables, stats, _ = _planted()
    frame = head_features(tables, stats)
    assert list(frame.index.names) == ["layer", "head"]
    assert len(frame) == N_LAYERS * N_HEADS
    assert list(frame.columns) == [
        "entropy@prose",
        "first_token_sink@prose",
        "max_prob@prose",
        "mean_distance@prose",
        "output_norm@prose",
        "previous_token@prose",
        "sink_mass@prose",
    ]
    means = {k: v.numpy().ravel() for k, v in stats["prose"].means.items()}
    causal_scale = (math.lgamma(21) + math.lgamma(31)) / 50  # mean of log(i + 1) over rows
    np.testing.assert_allclose(frame["entropy@prose"], means["entropy"] / causal_scale)
    np.testing.assert_allclose(frame["mean_distance@prose"], means["mean_distance"] / 25)
    np.testing.assert_allclose(frame["output_norm@prose"], np.log1p(means["output_norm"]))
    np.testing.assert_allclose(frame["sink_mass@prose"], means["sink_mass"])
    np.testing.assert_allclose(frame["previous_token@prose"], tables[0].matrix().ravel())

    bidirectional = _stats("code", {"entropy": np.arange(24.0).reshape(4, 6)}, causal=False)
    frame = head_features([], {"code": bidirectional})
    scale = (20 * math.log(20) + 30 * math.log(30)) / 50
    np.testing.assert_allclose(frame["entropy@code"], np.arange(24.0) / scale)


def test_planted_families_are_recovered():
    tables, stats, groups = _planted()
    table = get_detector("head_families").run_tables(tables, stats, n_bootstrap=20)
    assert (table.detector, table.group) == ("head_families", "families")
    assert table.prompt_set == "prose"
    summary = table.summary
    assert summary["n_families"] == 3
    assert set(summary["silhouette_by_k"]) == set(range(2, 9))
    assert max(summary["silhouette_by_k"], key=summary["silhouette_by_k"].get) == 3
    labels = _labels(table)
    assert adjusted_rand_score(groups.ravel(), labels) == 1.0
    # numbered by size: family 0 is the 10 sink heads, 1 the previous-token heads
    for family, group in enumerate(SIZES):
        assert set(groups.ravel()[labels == family]) == {group}
    assert [f["size"] for f in summary["families"]] == list(SIZES.values())
    assert table.frame["flagged"].all() and summary["silhouette"] > 0.8
    np.testing.assert_allclose(table.frame["score"].mean(), summary["silhouette"])
    sink = summary["families"][0]
    assert len(sink["defining"]) == 3 and len(sink["name"].split(", ")) == 2
    assert sink["defining"][0]["direction"] in ("high", "low")
    assert "high sink_mass@prose" in sink["name"] or "high first_token_sink@prose" in sink["name"]
    diffuse = summary["families"][2]["name"]
    assert "high entropy@prose" in diffuse or "low max_prob@prose" in diffuse
    assert len({f["name"] for f in summary["families"]}) == 3
    members = sink["members"]
    assert len(members) == 10 and all(groups[parse_head_name(m)] == "sink" for m in members)
    first = table.frame["evidence"][0]
    assert set(first) >= {"family", "family_name", "x", "y", "features"}
    assert set(first["features"]) == set(table.params["features"])
    # three planted families span a plane: the 2-D embedding keeps almost all the variance
    first, second = summary["explained_variance"]
    assert first >= second > 0.05 and first + second > 0.99
    json.dumps(table.metadata())
    evidence_to_json(first)


def _with_prompts(tables, stats, *, n_prompts=16, sd=0.05, seed=0):
    """Give the planted set per-prompt α_0 around each head's sink mass (unequal lengths)."""
    rng = np.random.default_rng(seed + 100)
    prose = stats["prose"]
    sink = prose.means["sink_mass"].numpy()
    lengths = rng.integers(20, 40, n_prompts)
    alpha = np.clip(sink[None] + sd * rng.standard_normal((n_prompts, *sink.shape)), 0, 1)
    prose.lengths = [int(n) for n in lengths]
    prose.sink_alpha = torch.tensor(alpha[..., None])  # [prompt, layer, head, key]
    prose.means["sink_mass"] = torch.tensor(np.average(alpha, axis=0, weights=lengths))
    tables = [tables[0], _table("first_token_sink", alpha.mean(0))]
    return tables, stats


def _structureless(seed: int):
    """Every feature independent noise; α_0 i.i.d. per prompt, so no head has a sink of its own."""
    rng = np.random.default_rng(seed)
    alpha = rng.uniform(0, 1, (16, N_LAYERS, N_HEADS))
    means = {n: rng.standard_normal((N_LAYERS, N_HEADS)) for n in ("entropy", "mean_distance")}
    means["max_prob"] = rng.uniform(0, 1, (N_LAYERS, N_HEADS))
    means["output_norm"] = rng.exponential(1.0, (N_LAYERS, N_HEADS))
    means["sink_mass"] = alpha.mean(0)
    prose = _stats("prose", means, lengths=[30] * 16)
    prose.sink_alpha = torch.tensor(alpha[..., None])
    tables = [_table("previous_token", rng.standard_normal((N_LAYERS, N_HEADS)))]
    return tables, {"prose": prose}


def test_duplicates_dropped_and_blocks_weighted_equally():
    tables, stats = _with_prompts(*_planted()[:2])
    table = detect_head_families(tables, stats, n_bootstrap=0)
    duplicates = table.summary["dropped_features"]["duplicate"]
    # first_token_sink is sink_mass averaged per prompt: the same column, dropped
    assert duplicates["first_token_sink@prose"] == "sink_mass@prose"
    assert "first_token_sink@prose" not in table.params["features"]
    blocks = table.params["blocks"]
    assert sorted(sum(blocks, [])) == sorted(table.params["features"])
    assert table.summary["n_blocks"] == len(blocks)
    assert (table.params["protocol"], table.params["protocol_note"]) == (
        "blocks", PROTOCOLS["blocks"],
    )  # fmt: skip
    legacy = detect_head_families(tables, stats, protocol="all", n_bootstrap=0)
    assert "first_token_sink@prose" in legacy.params["features"]
    assert legacy.params["blocks"] == [[name] for name in legacy.params["features"]]
    assert "duplicate" not in legacy.summary["dropped_features"]

    # one property written into five correlated columns, another into one column:
    # the old protocol lets the five outvote the one, blocks give both one vote
    rng = np.random.default_rng(0)
    a = np.repeat([0.0, 1.0], 12)
    b = np.tile([0.0, 1.0], 12)
    copies = {
        f"a{i}": (a + 0.25 * rng.standard_normal(24)).reshape(N_LAYERS, N_HEADS) for i in range(5)
    }
    one = (b + 0.05 * rng.standard_normal(24)).reshape(N_LAYERS, N_HEADS)
    planted = [_table(name, v) for name, v in copies.items()] + [_table("b", one)]
    blocked = detect_head_families(planted, {}, n_families=2, n_bootstrap=0)
    assert sorted(map(sorted, blocked.params["blocks"])) == [
        ["a0@prose", "a1@prose", "a2@prose", "a3@prose", "a4@prose"], ["b@prose"],
    ]  # fmt: skip
    old = detect_head_families(planted, {}, n_families=2, protocol="all", n_bootstrap=0)
    assert adjusted_rand_score(a, _labels(old)) == 1.0
    assert adjusted_rand_score(b, _labels(blocked)) == 1.0
    best = detect_head_families(planted, {}, n_bootstrap=0)
    assert best.summary["n_families"] == 4  # both properties, as four equal corners


def test_planted_families_are_stable_under_both_bootstraps():
    tables, stats, groups = _planted()
    tables, stats = _with_prompts(tables, stats)
    table = detect_head_families(tables, stats, n_bootstrap=20)
    summary = table.summary
    assert summary["n_families"] == 3
    assert adjusted_rand_score(groups.ravel(), _labels(table)) == 1.0
    assert summary["resampled_features"] == ["sink_mass@prose"]
    three = summary["stability_by_k"][3]
    for scheme in ("prompt", "head"):
        assert three[f"{scheme}_ari_mean"] > 0.95 and three[f"{scheme}_ari_p5"] > 0.9
        assert min(three["jaccard"][scheme]) > 0.9
    assert three["silhouette"] > three["null_silhouette_p95"] + 0.3
    assert summary["beyond_chance"] and summary["surviving_families"] == [0, 1, 2]
    assert all(f["survives"] for f in summary["families"])
    assert summary["verdict"] == "3 of 3 families survive (family 0, 1, 2)"
    assert summary["k_choice"] == "best silhouette among stable partitions beyond chance"
    assert table.frame["flagged"].all()
    json.dumps(table.metadata())
    from rich.console import Console

    from headscope.report import _families

    console = Console(record=True, width=200)
    console.print(_families(table))
    text = console.export_text()
    assert "3 of 3 families survive" in text and text.count("(survives)") == 3


@pytest.mark.parametrize("seed", [0, 1])
def test_a_structureless_control_has_no_family(seed):
    tables, stats = _structureless(seed)
    table = detect_head_families(tables, stats, n_bootstrap=20, seed=seed)
    summary = table.summary
    assert summary["resampled_features"] == ["sink_mass@prose"]
    assert summary["surviving_families"] == [] and not table.frame["flagged"].any()
    assert summary["verdict"].startswith("no family survives")
    for entry in summary["stability_by_k"].values():
        # no k gives a partition that both bootstraps reproduce
        assert min(entry["prompt_ari_mean"], entry["head_ari_mean"]) < 0.65
        assert entry["silhouette"] < entry["null_silhouette_p95"] + 0.05


def test_prompt_noise_shows_in_the_prompt_bootstrap_only():
    """Sink levels planted 0.1 apart but per-prompt α_0 spread 0.3 (four prompts):
    the prompt bootstrap reshuffles the sink split, the head bootstrap cannot see why."""
    rng = np.random.default_rng(3)
    level = np.repeat([0.4, 0.5], 12)
    alpha = np.clip(level[None] + 0.3 * rng.standard_normal((4, 24)), 0, 1)
    prose = _stats("prose", {"sink_mass": alpha.mean(0).reshape(N_LAYERS, N_HEADS)},
                   lengths=[30] * 4)  # fmt: skip
    prose.sink_alpha = torch.tensor(alpha.reshape(4, N_LAYERS, N_HEADS, 1))
    table = detect_head_families([], {"prose": prose}, n_families=2, n_bootstrap=20)
    two = table.summary["stability_by_k"][2]
    assert two["prompt_ari_mean"] < 0.5 < 0.8 < two["head_ari_mean"]
    assert table.summary["surviving_families"] == []
    assert table.summary["verdict"].endswith(
        "unstable under the prompt bootstrap (mean ARI < 0.75)"
    )


def test_given_number_of_families():
    tables, stats, _ = _planted()
    table = detect_head_families(tables, stats, n_families=2, n_bootstrap=0)
    assert table.summary["n_families"] == 2
    assert list(table.summary["silhouette_by_k"]) == [2]
    assert set(_labels(table)) == {0, 1}
    assert table.params["n_families"] == 2


def _assert_same(a: HeadTable, b: HeadTable) -> None:
    pd.testing.assert_frame_equal(a.frame, b.frame)
    assert a.metadata() == b.metadata()


def test_same_seed_same_result_and_input_order_does_not_matter():
    tables, stats, _ = _planted(noise=0.2)  # noisy enough that k-means has choices
    reference = detect_head_families(tables, stats, seed=3, n_bootstrap=5)
    _assert_same(reference, detect_head_families(tables, stats, seed=3, n_bootstrap=5))
    more_stats = {**stats, "code": _planted(seed=1, noise=0.2)[1]["prose"]}
    forward = detect_head_families(tables, more_stats, seed=3, n_bootstrap=5)
    backward = detect_head_families(
        tables[::-1], dict(reversed(more_stats.items())), seed=3, n_bootstrap=5
    )
    _assert_same(forward, backward)
    assert forward.prompt_set == "code+prose"


def test_relabelling_ignores_kmeans_numbering():
    labels = np.array([2, 2, 0, 1, 1, 1, 0, 2, 1])  # sizes: 1 -> 4, 2 -> 3, 0 -> 2
    expected = np.array([1, 1, 2, 0, 0, 0, 2, 1, 0])
    np.testing.assert_array_equal(_relabel(labels), expected)
    permuted = np.array([5, 9, 7])[labels]
    np.testing.assert_array_equal(_relabel(permuted), expected)
    ties = np.array([4, 4, 3, 3])  # equal sizes: the family seen first gets 0
    np.testing.assert_array_equal(_relabel(ties), [0, 0, 1, 1])


def test_layer_tables_and_earlier_families_are_ignored():
    tables, stats, _ = _planted()
    families = get_detector("head_families")
    reference = families.run_tables(tables, stats, n_bootstrap=0)
    layer_table = LayerTable(
        frame=pd.DataFrame(
            {
                "layer": range(N_LAYERS),
                "score": np.arange(N_LAYERS, dtype=float),
                "flagged": False,
                "evidence": [{}] * N_LAYERS,
            }
        ),
        n_layers=N_LAYERS,
        detector="residual_peak",
        prompt_set="prose",
    )
    again = families.run_tables([layer_table, reference, *tables], stats, n_bootstrap=0)
    _assert_same(reference, again)
    assert not any(name.startswith("head_families") for name in again.params["features"])


def test_missing_values_filled_and_constant_columns_dropped():
    tables, stats, _ = _planted()
    gappy = tables[0].matrix().copy()
    gappy[0, :3] = np.nan
    gappy[1, 0] = np.inf
    extra = [
        _table("induction", gappy),
        _table("duplicate_token", np.full((N_LAYERS, N_HEADS), 0.3)),
        _table("successor", np.full((N_LAYERS, N_HEADS), np.nan)),
    ]
    frame = head_features(tables + extra, stats)
    assert not frame.isna().any().any()
    assert "duplicate_token@prose" not in frame and "successor@prose" not in frame
    finite = gappy[np.isfinite(gappy)]
    assert frame.loc[(0, 0), "induction@prose"] == pytest.approx(np.median(finite))
    assert frame.loc[(1, 0), "induction@prose"] == pytest.approx(np.median(finite))
    table = detect_head_families(tables + extra, stats, n_bootstrap=0)
    assert table.summary["dropped_features"] == {
        "all_missing": ["successor@prose"],
        "constant": ["duplicate_token@prose"],
        # near-copies (|r| >= 0.98): statistics are kept before tables, then by name
        "duplicate": {
            "first_token_sink@prose": "sink_mass@prose",
            "max_prob@prose": "entropy@prose",
            "previous_token@prose": "induction@prose",
        },
    }
    evidence = table.frame["evidence"]
    assert evidence[0]["imputed"] == ["induction@prose"] and evidence[5]["imputed"] == []


def test_tables_alone_are_enough():
    tables, _, _ = _planted()
    table = detect_head_families(tables, {}, n_bootstrap=0)
    assert table.prompt_set == "tables"
    assert table.params["features"] == ["first_token_sink@prose", "previous_token@prose"]
    one = detect_head_families(
        tables[:1], {}, n_bootstrap=0
    )  # a single feature: the embedding's y is 0
    assert one.params["features"] == ["previous_token@prose"]
    assert all(e["y"] == 0 for e in one.frame["evidence"])
    assert one.summary["explained_variance"] == pytest.approx([1.0, 0.0])


def test_errors():
    tables, stats, _ = _planted()
    with pytest.raises(HeadscopeError, match="disagree"):
        detect_head_families([_table("induction", np.zeros((3, N_HEADS)))], stats)
    with pytest.raises(HeadscopeError, match="statistics or head tables"):
        head_features([], {})
    with pytest.raises(HeadscopeError, match="at least 3 heads"):
        detect_head_families([_table("induction", np.array([[0.1, 0.9]]))], {})
    for bad in (1, N_LAYERS * N_HEADS):
        with pytest.raises(HeadscopeError, match="n_families"):
            detect_head_families(tables, stats, n_families=bad)
    with pytest.raises(HeadscopeError, match="max_families"):
        detect_head_families(tables, stats, max_families=1)
    with pytest.raises(HeadscopeError, match="embedding"):
        detect_head_families(tables, stats, embedding="umap")
    with pytest.raises(HeadscopeError, match="protocol 'sun2024'.*blocks"):
        detect_head_families(tables, stats, protocol="sun2024")
    with pytest.raises(HeadscopeError, match="n_bootstrap"):
        detect_head_families(tables, stats, n_bootstrap=-1)
    with pytest.raises(HeadscopeError, match="no usable feature"):
        detect_head_families([_table("induction", np.ones((N_LAYERS, N_HEADS)))], {})
    with pytest.raises(HeadscopeError, match="no prompts"):
        head_features([], {"prose": _stats("prose", {"entropy": np.ones((2, 2))}, lengths=[])})


def test_tsne_embedding_is_seeded():
    tables, stats, groups = _planted()
    a = detect_head_families(tables, stats, embedding="tsne", seed=1, n_bootstrap=0)
    b = detect_head_families(tables, stats, embedding="tsne", seed=1, n_bootstrap=0)
    _assert_same(a, b)
    assert "explained_variance" not in a.summary
    xy = np.array([[e["x"], e["y"]] for e in a.frame["evidence"]])
    assert np.isfinite(xy).all() and xy.std(0).min() > 0
    assert adjusted_rand_score(groups.ravel(), _labels(a)) == 1.0


def test_a_scan_runs_families_last_on_every_other_table(tmp_path):
    """Wired into the scan: the family features include the other detectors' scores."""
    from headscope.runs import open_run
    from headscope.scanning import scan

    result = scan(
        "tiny:llama:3", prompts="prose,code", detectors="previous_token,head_families,successor",
        n_prompts=4, out=tmp_path / "run", on_progress=False,
    )  # fmt: skip
    table = open_run(result.path).head_table("head_families")
    features = table.params["features"]
    assert "previous_token@prose" in features and "successor@ordinal" in features
    assert "entropy@code" in features  # a families scan captures the statistics too
    assert len(table.frame) == 3 * 4
    assert {"family", "x", "y"} <= set(table.frame["evidence"][0])


def test_families_alone_still_have_the_streaming_statistics():
    from headscope.scanning import scan

    result = scan(
        "tiny:llama:3", prompts="prose", detectors="head_families", n_prompts=4,
        on_progress=False,
    )  # fmt: skip
    features = result.head_table("head_families").params["features"]
    assert "entropy@prose" in features and "sink_mass@prose" in features


def test_a_detector_cannot_take_a_table_name_already_taken():
    from headscope.analyses.registry import Detector, register_detector

    with pytest.raises(ValueError, match="already taken"):
        register_detector(
            Detector(
                name="another_redundancy", role="x", group="redundancy",
                function=get_detector("layer_redundancy").function,
                primary_prompt_set="prose", description="x", capture="model",
                tables=("llm_drop_block",),
            )
        )  # fmt: skip


def test_families_rerun_from_a_run_folder(tiny_run):
    """A run's stored statistics and tables are enough to rerun the families (no model)."""
    from headscope.analyses.families import families_from_run

    table = families_from_run(tiny_run, n_bootstrap=5, protocol="blocks")
    assert (table.detector, table.prompt_set) == ("head_families", "prose")
    duplicates = table.summary["dropped_features"]["duplicate"]
    # equal-length prompts: the first-token sink score is the sink mass itself
    assert duplicates["first_token_sink@prose"] == "sink_mass@prose"
    assert table.summary["resampled_features"] == ["sink_mass@prose"]
    legacy = families_from_run(tiny_run, n_bootstrap=0, protocol="all")
    assert "first_token_sink@prose" in legacy.params["features"]
