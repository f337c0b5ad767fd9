"""Head families: k-means clusters of heads over their statistics and role scores.

Each detector asks one question of each head (is it a sink? a previous-token
head?). A family view asks the converse: which heads *behave alike* over
everything the scan measured? Heads that share a family share a profile (say,
parked on the first token with low entropy and a small output), so a family is
a role the detectors may not have a name for, and a head that fits no family
well (low silhouette) is an odd one out worth a look. It is a pure analysis of
what a scan already produced: no model is run.

Features, one column per feature and prompt set, named ``<feature>@<set>``:

- from each ``StreamingStatistics`` (token-weighted means over query rows):
  ``entropy`` divided by the mean of log(number of visible keys) over the same
  rows (causal: key count i+1 at position i, so Σ_prompts log(L!) / Σ L;
  bidirectional: log L per row), so 1 is "as diffuse as uniform attention" on
  any prompt length; ``mean_distance`` divided by the mean prompt length;
  ``sink_mass``; ``max_prob``; and ``output_norm`` as log1p (norms span orders
  of magnitude across heads; a log keeps a few loud heads from owning an axis).
- from each ``HeadTable`` given (not ``LayerTable``s, not an earlier
  ``head_families`` table): its score, named ``<detector>@<prompt_set>``.

Columns that are all missing or constant are dropped; remaining missing values
(and infinities) take the column median. Features are z-scored before k-means,
since they live on unrelated scales (a norm, a fraction, a normalised
entropy) and k-means is Euclidean: unscaled, the widest feature would decide
the families alone.

k-means (``n_init=10``, ``random_state=seed``) picks k in 2..``max_families``
by the best mean silhouette unless ``n_families`` is given; families are then
renumbered by size (largest first), ties by their first (layer, head), so the
numbers do not depend on k-means' arbitrary labels. A head's score is its
silhouette value: how much closer it sits to its own family than to the
nearest other, in [-1, 1]. Flagged heads (score >= 0.25) are clear members; the
cut is ours, borrowed from Kaufman & Rousseeuw's reading of mean silhouettes
(at or below 0.25: "no substantial structure") and applied per head. A family
is named after its two most distinctive features (largest |mean z|). A 2-D
embedding (PCA with signs fixed so each component's largest loading is
positive, or t-SNE seeded) goes in the evidence for plots.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import pandas as pd

from headscope.ablation_spec import head_name
from headscope.errors import HeadscopeError
from headscope.tables import HeadTable

STAT_FEATURES = ("entropy", "mean_distance", "sink_mass", "max_prob", "output_norm")
#: silhouette value from which a head counts as a clear member of its family
MEMBER_THRESHOLD = 0.25
EMBEDDINGS = ("pca", "tsne")
MAX_LISTED = 12  # members listed per family in the summary


def _array(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value, dtype=np.float64)


def _log_visible_keys(lengths: list[int], causal: bool) -> float:
    """Mean over all query rows of log(number of keys the row sees)."""
    lengths = [int(n) for n in lengths if int(n) > 0]
    if not lengths:
        return 0.0
    total = sum(math.lgamma(n + 1) if causal else n * math.log(n) for n in lengths)
    return total / sum(lengths)


def _stat_columns(name: str, stats: Any) -> dict[str, np.ndarray]:
    lengths = list(getattr(stats, "lengths", []))
    if not lengths:
        raise HeadscopeError(f"prompt set {name!r} has no prompts: rescan it with some")
    means = stats.means
    out: dict[str, np.ndarray] = {}
    for feature in STAT_FEATURES:
        if feature not in means:
            continue
        values = _array(means[feature])
        if feature == "entropy":
            scale = _log_visible_keys(lengths, bool(getattr(stats, "causal", True)))
            values = values / scale if scale > 0 else values
        elif feature == "mean_distance":
            values = values / float(np.mean(lengths))
        elif feature == "output_norm":
            values = np.log1p(values)
        out[f"{feature}@{name}"] = values
    return out


def _raw_features(
    tables: Iterable[Any], stats_by_set: Mapping[str, Any]
) -> tuple[pd.DataFrame, dict[str, list[str]]]:
    """All candidate columns before cleaning, and the shape check."""
    if isinstance(tables, Mapping):
        tables = tables.values()
    shapes: dict[str, tuple[int, int]] = {}
    columns: dict[str, np.ndarray] = {}

    def add(name: str, values: np.ndarray) -> None:
        if name in columns and not np.array_equal(columns[name], values, equal_nan=True):
            raise HeadscopeError(f"two different inputs give feature {name!r}: pass one of them")
        columns[name] = values

    for set_name in sorted(stats_by_set):
        stats = stats_by_set[set_name]
        shapes[f"statistics {set_name!r}"] = (int(stats.n_layers), int(stats.n_heads))
        for name, values in _stat_columns(set_name, stats).items():
            add(name, values)
    for table in tables:
        if not isinstance(table, HeadTable) or table.group == "families":
            continue
        name = f"{table.detector}@{table.prompt_set}"
        shapes[f"table {name!r}"] = (table.n_layers, table.n_heads)
        add(name, table.matrix())
    if not shapes:
        raise HeadscopeError("head families need statistics or head tables: scan first")
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{k}: {v[0]}x{v[1]}" for k, v in sorted(shapes.items()))
        raise HeadscopeError(f"inputs disagree on the model's layers x heads ({listed})")
    n_layers, n_heads = next(iter(shapes.values()))
    index = pd.MultiIndex.from_product([range(n_layers), range(n_heads)], names=["layer", "head"])
    raw = pd.DataFrame(index=index)
    dropped: dict[str, list[str]] = {"all_missing": [], "constant": []}
    for name in sorted(columns):
        values = columns[name]
        if values.shape != (n_layers, n_heads):
            raise HeadscopeError(
                f"feature {name!r} has shape {values.shape}, expected {(n_layers, n_heads)}"
            )
        values = np.where(np.isfinite(values), values, np.nan).ravel()
        present = values[~np.isnan(values)]
        if present.size == 0:
            dropped["all_missing"].append(name)
        elif np.ptp(present) <= 1e-12 * max(1.0, float(np.abs(present).max())):
            dropped["constant"].append(name)
        else:
            raw[name] = values
    return raw, dropped


def head_features(tables: Iterable[Any], stats_by_set: Mapping[str, Any]) -> pd.DataFrame:
    """Every head's feature profile: rows (layer, head), columns ``<feature>@<set>``.

    Constant and all-missing columns are dropped, other gaps take the column median.
    """
    raw, _ = _raw_features(tables, stats_by_set)
    return raw.fillna(raw.median())


def _kmeans(z: np.ndarray, k: int, seed: int) -> np.ndarray:
    from sklearn.cluster import KMeans

    return KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(z)


def _relabel(labels: np.ndarray) -> np.ndarray:
    """Number families by size (largest first), ties by their first row."""
    found = np.unique(labels)
    order = sorted(found, key=lambda c: (-int((labels == c).sum()), int(np.argmax(labels == c))))
    mapping = {int(old): new for new, old in enumerate(order)}
    return np.array([mapping[int(c)] for c in labels])


def _embed(z: np.ndarray, embedding: str, seed: int) -> tuple[np.ndarray, list[float] | None]:
    n, d = z.shape
    if embedding == "tsne":
        from sklearn.manifold import TSNE

        tsne = TSNE(n_components=2, perplexity=float(min(30, n - 1)), random_state=seed)
        return tsne.fit_transform(z), None
    from sklearn.decomposition import PCA

    m = min(2, d)
    pca = PCA(n_components=m, svd_solver="full").fit(z)
    components = pca.components_.copy()
    for i, row in enumerate(components):
        if row[np.argmax(np.abs(row))] < 0:
            components[i] = -row
    coords = np.zeros((n, 2))
    coords[:, :m] = (z - pca.mean_) @ components.T
    ratio = [float(r) for r in pca.explained_variance_ratio_] + [0.0] * (2 - m)
    return coords, ratio


def _describe(z: np.ndarray, labels: np.ndarray, names: list[str], index) -> list[dict]:
    """Per family: size, defining features (top 3 by |mean z|), a name, members."""
    families = []
    for family in range(int(labels.max()) + 1):
        members = np.flatnonzero(labels == family)
        mean_z = z[members].mean(0)
        top = sorted(range(len(names)), key=lambda i: -abs(mean_z[i]))[:3]
        defining = [
            {"feature": names[i], "direction": "high" if mean_z[i] >= 0 else "low",
             "mean_z": float(mean_z[i])}
            for i in top
        ]  # fmt: skip
        families.append(
            {
                "family": family,
                "size": int(members.size),
                "name": ", ".join(f"{d['direction']} {d['feature']}" for d in defining[:2]),
                "defining": defining,
                "members": [head_name(*index[i]) for i in members[:MAX_LISTED]],
            }
        )
    counts = Counter(entry["name"] for entry in families)
    for entry in families:
        if counts[entry["name"]] > 1:
            entry["name"] += f" [family {entry['family']}]"
    return families


def detect_head_families(
    tables: Iterable[Any],
    stats_by_set: Mapping[str, Any],
    *,
    n_families: int | None = None,
    max_families: int = 8,
    seed: int = 0,
    embedding: str = "pca",
) -> HeadTable:
    """Cluster all heads on their feature profiles (see the module docstring)."""
    from sklearn.metrics import silhouette_samples, silhouette_score

    if embedding not in EMBEDDINGS:
        raise HeadscopeError(f"unknown embedding {embedding!r}: use one of {list(EMBEDDINGS)}")
    raw, dropped = _raw_features(tables, stats_by_set)
    n = len(raw)
    if n < 3:
        raise HeadscopeError(f"head families need at least 3 heads, the model has {n}")
    if raw.shape[1] == 0:
        raise HeadscopeError(
            "no usable feature for head families: every column is constant or missing"
        )
    imputed = raw.isna().to_numpy()
    features = raw.fillna(raw.median())
    names = list(features.columns)
    values = features.to_numpy()
    z = (values - values.mean(0)) / values.std(0)
    distinct = len(np.unique(z, axis=0))
    if n_families is not None:
        if not 2 <= n_families <= n - 1:
            raise HeadscopeError(f"n_families must be in 2..{n - 1} (heads - 1), got {n_families}")
        if n_families > distinct:
            raise HeadscopeError(
                f"n_families {n_families} exceeds the {distinct} distinct head profiles"
            )
        candidates = [n_families]
    else:
        if max_families < 2:
            raise HeadscopeError(f"max_families must be at least 2, got {max_families}")
        candidates = list(range(2, min(max_families, n - 1, distinct) + 1))
    by_k: dict[int, float] = {}
    best: tuple[float, int, np.ndarray] | None = None
    for k in candidates:
        labels = _kmeans(z, k, seed)
        if len(np.unique(labels)) < 2:
            continue
        by_k[k] = float(silhouette_score(z, labels))
        if best is None or by_k[k] > best[0] + 1e-12:
            best = (by_k[k], k, labels)
    if best is None:
        raise HeadscopeError("k-means found a single family: the heads' profiles do not separate")
    _, k, labels = best
    labels = _relabel(labels)
    scores = silhouette_samples(z, labels)
    coords, explained = _embed(z, embedding, seed)
    families = _describe(z, labels, names, raw.index)
    evidence = [
        {
            "family": int(labels[row]),
            "family_name": families[labels[row]]["name"],
            "x": float(coords[row, 0]),
            "y": float(coords[row, 1]),
            "features": {name: float(values[row, j]) for j, name in enumerate(names)},
            "imputed": [name for j, name in enumerate(names) if imputed[row, j]],
        }
        for row in range(n)
    ]
    shape = raw.index.levshape
    summary: dict[str, Any] = {
        "n_families": int(k),
        "silhouette": float(scores.mean()),
        "silhouette_by_k": by_k,
        "families": families,
        "dropped_features": dropped,
        "n_clear_members": int((scores >= MEMBER_THRESHOLD).sum()),
    }
    if explained is not None:
        summary["explained_variance"] = explained
    return HeadTable.from_matrix(
        scores.reshape(shape),
        (scores >= MEMBER_THRESHOLD).reshape(shape),
        evidence,
        prompt_set="+".join(sorted(stats_by_set)) if stats_by_set else "tables",
        params={
            "n_families": n_families,
            "max_families": max_families,
            "seed": seed,
            "embedding": embedding,
            "features": names,
            "member_threshold": MEMBER_THRESHOLD,
            "score": "silhouette value of the head in its family",
        },
        summary=summary,
        description="k-means families of heads over z-scored statistics and role scores",
    )
