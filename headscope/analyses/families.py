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
(and infinities) take the column median; every column is z-scored (features
live on unrelated scales and k-means is Euclidean).

Protocols (``protocol``; both are ours, no paper defines head families):

- ``"blocks"`` (default). Many columns say the same thing: ``first_token_sink``
  is ``sink_mass`` averaged per prompt instead of per token (identical when the
  prompts have equal lengths), and a first-token sink head also has a high
  ``max_prob``, a low ``entropy`` and a long ``mean_distance`` on every prompt
  set, so with one vote per column the sink decides the families. Hence:
  (1) *deduplicate*: statistics columns first, then tables, each in name
  order, a column whose |Pearson r| with a column already kept is at least
  ``DUPLICATE_R`` (0.98) is dropped (reported with what it duplicates);
  (2) *blocks*: the remaining columns are grouped by average-linkage
  clustering of 1 - |r|, cut so that a block's columns correlate by
  |r| >= ``BLOCK_R`` (0.7) on average; (3) *equal weights*: each z-scored
  column is divided by sqrt(its block's size), so every block has the same
  total variance, whatever the number of columns that measure it.
- ``"all"``: headscope's earlier protocol: every column z-scored and weighted
  equally, duplicates kept (the 43-column set of the README's first result).

k-means (``n_init=10``, ``random_state=seed``) runs for k in
2..``max_families`` unless ``n_families`` is given. k is the best mean
silhouette among the partitions that are stable and beyond chance (see
Stability below; choosing k by stability follows Ben-Hur et al. 2002 and
Lange et al. 2004), or the best silhouette overall when none is (or when
``n_bootstrap`` is 0); ``summary["k_choice"]`` says which. Families are then
renumbered by size (largest first), ties by their first (layer, head), so the
numbers do not depend on k-means' arbitrary labels. A head's score is its
silhouette value: how much closer it sits to its own family than to the
nearest other, in [-1, 1]. A family is named after its two most distinctive
features (largest |mean z|). A 2-D embedding (PCA with signs fixed so each
component's largest loading is positive, or t-SNE seeded) goes in the evidence
for plots.

Stability (``n_bootstrap`` replicates, 0 turns it off), for every k tried:

- *prompt bootstrap*: each prompt set's prompts are drawn with replacement
  and the features that per-prompt records allow are recomputed from them:
  ``sink_mass@S`` (token-weighted mean of the per-prompt α_0) and
  ``first_token_sink@S`` (prompt mean of α_0), from the statistics'
  per-prompt ``sink_alpha``, each only where the full-sample recomputation
  reproduces the stored column. Every other column is a prompt mean whose
  per-prompt values the scan does not keep, so it is held fixed: this
  bootstrap measures the prompt noise of the sink features only
  (``summary["resampled_features"]`` lists them). The replicate is
  z-scored and weighted like the original and clustered afresh;
- *head bootstrap* (in the spirit of Hennig 2007's ``clusterboot``): heads are
  drawn with replacement, k-means runs on the draw, and every head is assigned
  to the nearest of its centres, which measures whether the partition is a
  property of the point cloud or of k-means' arbitrary cuts.

Each replicate is compared with the full-data partition by the adjusted Rand
index (ARI, 0 for chance agreement, 1 for identical; Hubert & Arabie 1985),
summarised by its mean and 5th percentile, and each family by its best
Jaccard overlap with a replicate's families (Hennig: mean >= 0.75 stable,
<= 0.5 dissolved; at k = 2 a best-match Jaccard is lenient, so the
partition's mean ARI must also reach ``STABLE_ARI`` = 0.75 under each
bootstrap). A stable partition may still be an arbitrary cut of one
blob (k-means splits an elongated Gaussian the same way every time), so the
silhouette is also compared with a structureless control: ``N_NULL`` Gaussian
clouds with the same mean and covariance as the weighted features, clustered
with the same k. A family *survives* when its Jaccard is >= ``STABLE_JACCARD``
under both bootstraps, the partition is stable, and the partition's
silhouette exceeds the control's 95th percentile. Flagged heads are clear members (silhouette >=
``MEMBER_THRESHOLD`` = 0.25, a cut borrowed from Kaufman & Rousseeuw's reading
of mean silhouettes) of a surviving family; without bootstraps, every clear
member is flagged.
"""

from __future__ import annotations

import math
import warnings
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
PROTOCOLS = {
    "blocks": (
        "headscope (default): near-duplicate columns dropped (|r| >= 0.98), correlated "
        "columns grouped into blocks (|r| >= 0.7), every block weighted equally"
    ),
    "all": "headscope's earlier protocol: every column z-scored and weighted equally",
}
#: |Pearson r| from which a column duplicates one already kept ("blocks")
DUPLICATE_R = 0.98
#: mean |r| within a block of columns that count as one feature ("blocks")
BLOCK_R = 0.7
#: a family's mean best Jaccard over replicates from which it is stable (Hennig 2007)
STABLE_JACCARD = 0.75
#: mean ARI of the replicates from which a partition is stable (each bootstrap)
STABLE_ARI = 0.75
#: Gaussian control clouds per k (the silhouette's structureless reference)
N_NULL = 20
#: k-means restarts in each bootstrap replicate and control cloud
N_INIT_REPLICATE = 4


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


def _zscore(values: np.ndarray) -> np.ndarray:
    sd = values.std(0)
    return (values - values.mean(0)) / np.where(sd > 0, sd, 1.0)


def _feature_order(names: list[str], stat_names: set[str]) -> list[str]:
    """Deduplication priority: statistics columns first, then tables, by name."""
    return sorted(names, key=lambda n: (n not in stat_names, n))


def _deduplicate(
    values: np.ndarray, names: list[str], stat_names: set[str]
) -> tuple[list[str], dict[str, str]]:
    """Columns kept (in ``names`` order) and {dropped: the kept column it duplicates}."""
    r = np.abs(np.corrcoef(values, rowvar=False)).reshape(len(names), len(names))
    position = {n: i for i, n in enumerate(names)}
    kept: list[str] = []
    duplicates: dict[str, str] = {}
    for name in _feature_order(names, stat_names):
        i = position[name]
        match = next((k for k in kept if r[i, position[k]] >= DUPLICATE_R), None)
        if match is None:
            kept.append(name)
        else:
            duplicates[name] = match
    return [n for n in names if n in kept], duplicates


def _blocks(values: np.ndarray) -> np.ndarray:
    """Block number of each column: average linkage on 1 - |r|, cut at 1 - BLOCK_R."""
    d = values.shape[1]
    if d == 1:
        return np.zeros(1, dtype=int)
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import squareform

    distance = 1.0 - np.abs(np.corrcoef(values, rowvar=False))
    np.fill_diagonal(distance, 0.0)
    distance = np.clip((distance + distance.T) / 2, 0.0, None)
    tree = linkage(squareform(distance, checks=False), method="average")
    found = fcluster(tree, t=1.0 - BLOCK_R, criterion="distance")
    # number blocks by their first column, so the numbering follows the names
    order = {b: i for i, b in enumerate(dict.fromkeys(found.tolist()))}
    return np.array([order[b] for b in found.tolist()])


def _weights(blocks: np.ndarray) -> np.ndarray:
    """1 / sqrt(block size) per column: every block carries the same total variance."""
    sizes = np.bincount(blocks)
    return 1.0 / np.sqrt(sizes[blocks])


def _prompt_resamplers(
    stats_by_set: Mapping[str, Any], names: list[str], values: np.ndarray
) -> dict[str, tuple[str, np.ndarray, np.ndarray]]:
    """Columns recomputable from per-prompt records: {column: (set, α_0, lengths)}.

    α_0 is [prompt, layer x head]. A column qualifies only where recomputing it
    from all prompts reproduces the stored value (so a statistic defined
    otherwise, or a table run with another key, is held fixed instead).
    """
    out: dict[str, tuple[str, np.ndarray, np.ndarray]] = {}
    position = {n: i for i, n in enumerate(names)}
    for set_name in sorted(stats_by_set):
        stats = stats_by_set[set_name]
        alpha = getattr(stats, "sink_alpha", None)
        lengths = np.asarray(getattr(stats, "lengths", []), dtype=np.float64)
        if alpha is None or len(lengths) < 2:
            continue
        alpha = _array(alpha)
        if alpha.ndim != 4 or alpha.shape[0] != len(lengths) or alpha.shape[-1] < 1:
            continue
        alpha0 = alpha[..., 0].reshape(len(lengths), -1)
        if np.isnan(alpha0).any():
            continue
        for feature, weights in (("sink_mass", lengths), ("first_token_sink", None)):
            name = f"{feature}@{set_name}"
            if name not in position:
                continue
            recomputed = np.average(alpha0, axis=0, weights=weights)
            if np.allclose(recomputed, values[:, position[name]], rtol=1e-6, atol=1e-9):
                out[name] = (set_name, alpha0, lengths)
    return out


def _resampled_values(
    values: np.ndarray,
    names: list[str],
    resamplers: Mapping[str, tuple[str, np.ndarray, np.ndarray]],
    draws: Mapping[str, np.ndarray],
) -> np.ndarray:
    out = values.copy()
    position = {n: i for i, n in enumerate(names)}
    for name, (set_name, alpha0, lengths) in resamplers.items():
        drawn = draws[set_name]
        weights = lengths[drawn] if name.startswith("sink_mass@") else None
        out[:, position[name]] = np.average(alpha0[drawn], axis=0, weights=weights)
    return out


def _jaccards(reference: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per reference family: its best Jaccard overlap with a family of ``labels``."""
    out = np.zeros(int(reference.max()) + 1)
    for family in range(len(out)):
        mine = reference == family
        out[family] = max(
            (mine & (labels == other)).sum() / (mine | (labels == other)).sum()
            for other in np.unique(labels)
        )
    return out


def _stability(
    z: np.ndarray,
    reference: np.ndarray,
    k: int,
    *,
    design,
    prompt_draws: list[dict[str, np.ndarray]],
    head_draws: list[np.ndarray],
    seed: int,
) -> dict[str, Any]:
    """ARI and per-family Jaccard of the replicates against ``reference``."""
    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.metrics import adjusted_rand_score

    def fit(data: np.ndarray, b: int) -> KMeans:
        with warnings.catch_warnings():  # a draw of heads may hold fewer than k profiles
            warnings.simplefilter("ignore", ConvergenceWarning)
            return KMeans(n_clusters=k, n_init=N_INIT_REPLICATE, random_state=seed + b).fit(data)

    out: dict[str, Any] = {}
    schemes = {
        "prompt": [fit(design(draws), b).labels_ for b, draws in enumerate(prompt_draws)],
        "head": [fit(z[rows], b).predict(z) for b, rows in enumerate(head_draws)],
    }
    for scheme, replicates in schemes.items():
        if not replicates:
            continue
        ari = np.array([adjusted_rand_score(reference, labels) for labels in replicates])
        jaccard = np.array([_jaccards(reference, labels) for labels in replicates])
        out[scheme] = {
            "ari_mean": float(ari.mean()),
            "ari_p5": float(np.percentile(ari, 5)),
            "jaccard": [float(j) for j in jaccard.mean(0)],
        }
    return out


def _null_silhouettes(z: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Silhouettes of k-means on Gaussian clouds with the mean and covariance of ``z``."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    rng = np.random.default_rng(seed)
    cov = np.atleast_2d(np.cov(z, rowvar=False))
    out = []
    for b in range(N_NULL):
        cloud = rng.multivariate_normal(z.mean(0), cov, size=len(z), method="eigh")
        labels = KMeans(n_clusters=k, n_init=N_INIT_REPLICATE, random_state=seed + b).fit_predict(
            cloud
        )
        out.append(silhouette_score(cloud, labels) if len(np.unique(labels)) > 1 else 0.0)
    return np.array(out)


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


def _partition_stable(entry: Mapping[str, Any]) -> bool:
    """Beyond the Gaussian control, and mean ARI >= STABLE_ARI under every bootstrap run."""
    schemes = entry["jaccard"]
    return entry["silhouette"] > entry["null_silhouette_p95"] and all(
        entry[f"{s}_ari_mean"] >= STABLE_ARI for s in schemes
    )


def _verdict(surviving: list[int], k: int, beyond_chance: bool | None, unstable: list[str]) -> str:
    if beyond_chance is None:
        return "stability not assessed (n_bootstrap=0)"
    if surviving:
        listed = ", ".join(str(f) for f in surviving)
        return f"{len(surviving)} of {k} families survive (family {listed})"
    if not beyond_chance:
        return (
            f"no family survives: the k = {k} silhouette does not exceed that of a "
            "structureless Gaussian cloud with the same covariance"
        )
    if unstable:
        return (
            f"no family survives: the k = {k} partition is unstable under the "
            f"{' and '.join(unstable)} bootstrap (mean ARI < {STABLE_ARI})"
        )
    return f"no family survives: none of the k = {k} families is stable under both bootstraps"


def detect_head_families(
    tables: Iterable[Any],
    stats_by_set: Mapping[str, Any],
    *,
    protocol: str = "blocks",
    n_families: int | None = None,
    max_families: int = 8,
    n_bootstrap: int = 50,
    seed: int = 0,
    embedding: str = "pca",
) -> HeadTable:
    """Cluster all heads on their feature profiles (see the module docstring)."""
    from sklearn.metrics import silhouette_samples, silhouette_score

    if protocol not in PROTOCOLS:
        raise HeadscopeError(f"unknown protocol {protocol!r}: use one of {list(PROTOCOLS)}")
    if embedding not in EMBEDDINGS:
        raise HeadscopeError(f"unknown embedding {embedding!r}: use one of {list(EMBEDDINGS)}")
    if n_bootstrap < 0:
        raise HeadscopeError(f"n_bootstrap must be 0 (off) or more, got {n_bootstrap}")
    raw, dropped = _raw_features(tables, stats_by_set)
    n = len(raw)
    if n < 3:
        raise HeadscopeError(f"head families need at least 3 heads, the model has {n}")
    if raw.shape[1] == 0:
        raise HeadscopeError(
            "no usable feature for head families: every column is constant or missing"
        )
    stat_names = {f"{f}@{s}" for f in STAT_FEATURES for s in stats_by_set}
    names = list(raw.columns)
    filled = raw.fillna(raw.median()).to_numpy()
    if protocol == "blocks":
        names, duplicates = _deduplicate(filled, names, stat_names)
        dropped["duplicate"] = duplicates
        filled = raw[names].fillna(raw[names].median()).to_numpy()
        blocks = _blocks(filled)
    else:
        blocks = np.arange(len(names))
    imputed = raw[names].isna().to_numpy()
    weights = _weights(blocks)
    values = filled
    unweighted = _zscore(values)
    z = unweighted * weights
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

    resamplers = _prompt_resamplers(stats_by_set, names, values)
    rng = np.random.default_rng(seed)
    sets = sorted({set_name for set_name, _, _ in resamplers.values()})
    n_prompts = {s: len(stats_by_set[s].lengths) for s in sets}
    prompt_draws = (
        [{s: rng.integers(0, n_prompts[s], n_prompts[s]) for s in sets} for _ in range(n_bootstrap)]
        if resamplers
        else []
    )
    head_draws = [rng.integers(0, n, n) for _ in range(n_bootstrap)]

    def design(draws: Mapping[str, np.ndarray]) -> np.ndarray:
        return _zscore(_resampled_values(values, names, resamplers, draws)) * weights

    by_k: dict[int, float] = {}
    stability: dict[int, dict[str, Any]] = {}
    fits: dict[int, np.ndarray] = {}
    best: tuple[float, int] | None = None
    for k in candidates:
        labels = _kmeans(z, k, seed)
        if len(np.unique(labels)) < 2:
            continue
        labels = _relabel(labels)
        fits[k] = labels
        by_k[k] = float(silhouette_score(z, labels))
        if n_bootstrap:
            found = _stability(
                z, labels, k, design=design, prompt_draws=prompt_draws,
                head_draws=head_draws, seed=seed,
            )  # fmt: skip
            null = _null_silhouettes(z, k, seed)
            stability[k] = {
                "silhouette": by_k[k],
                "null_silhouette_mean": float(null.mean()),
                "null_silhouette_p95": float(np.percentile(null, 95)),
                **{
                    f"{scheme}_{key}": value
                    for scheme, entry in found.items()
                    for key, value in entry.items()
                    if key != "jaccard"
                },
                "jaccard": {scheme: entry["jaccard"] for scheme, entry in found.items()},
            }
        if best is None or by_k[k] > best[0] + 1e-12:
            best = (by_k[k], k)
    if best is None:
        raise HeadscopeError("k-means found a single family: the heads' profiles do not separate")
    _, k = best
    k_choice = "given" if n_families is not None else "best silhouette"
    stable_k = [c for c in stability if _partition_stable(stability[c])]
    if n_families is None and n_bootstrap:
        if stable_k:
            k = max(stable_k, key=lambda c: (by_k[c], -c))
            k_choice = "best silhouette among stable partitions beyond chance"
        else:
            k_choice = "best silhouette (no k gives a stable partition beyond chance)"
    labels = fits[k]
    scores = silhouette_samples(z, labels)
    coords, explained = _embed(z, embedding, seed)
    families = _describe(unweighted, labels, names, raw.index)
    beyond_chance: bool | None = None
    surviving: list[int] = []
    unstable: list[str] = []
    if n_bootstrap:
        chosen = stability[k]
        beyond_chance = chosen["silhouette"] > chosen["null_silhouette_p95"]
        unstable = [s for s in chosen["jaccard"] if chosen[f"{s}_ari_mean"] < STABLE_ARI]
        for entry in families:
            jaccard = {s: j[entry["family"]] for s, j in chosen["jaccard"].items()}
            entry["jaccard"] = jaccard
            entry["stable"] = min(jaccard.values()) >= STABLE_JACCARD
            entry["survives"] = bool(entry["stable"] and beyond_chance and not unstable)
            if entry["survives"]:
                surviving.append(entry["family"])
    member = scores >= MEMBER_THRESHOLD
    if n_bootstrap:
        member &= np.isin(labels, surviving)
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
        "k_choice": k_choice,
        "families": families,
        "dropped_features": dropped,
        "n_clear_members": int((scores >= MEMBER_THRESHOLD).sum()),
        "n_blocks": int(blocks.max()) + 1,
    }
    if n_bootstrap:
        summary |= {
            "stability_by_k": stability,
            "stable_k": stable_k,
            "beyond_chance": bool(beyond_chance),
            "surviving_families": surviving,
            "resampled_features": sorted(resamplers),
            "verdict": _verdict(surviving, k, beyond_chance, unstable),
        }
    if explained is not None:
        summary["explained_variance"] = explained
    return HeadTable.from_matrix(
        scores.reshape(shape),
        member.reshape(shape),
        evidence,
        prompt_set="+".join(sorted(stats_by_set)) if stats_by_set else "tables",
        params={
            "protocol": protocol,
            "protocol_note": PROTOCOLS[protocol],
            "n_families": n_families,
            "max_families": max_families,
            "n_bootstrap": n_bootstrap,
            "seed": seed,
            "embedding": embedding,
            "features": names,
            "blocks": [
                [name for name, b in zip(names, blocks, strict=True) if b == block]
                for block in range(int(blocks.max()) + 1)
            ],
            "member_threshold": MEMBER_THRESHOLD,
            "stable_jaccard": STABLE_JACCARD,
            "stable_ari": STABLE_ARI,
            "score": "silhouette value of the head in its family",
        },
        summary=summary,
        description="k-means families of heads over z-scored statistics and role scores",
    )


def run_statistics(run: Any) -> dict[str, Any]:
    """The streaming statistics a run stored, as the attributes this analysis reads.

    ``run`` is an opened run (``headscope.runs.open_run``). Per prompt set:
    ``means``, ``lengths``, ``sink_alpha``, ``causal`` (from the manifest),
    ``n_layers``, ``n_heads``; enough to rerun the families without the model.
    """
    import types

    tensors = run.tensors()
    arch = (run.manifest.get("model") or {}).get("arch") or {}
    out: dict[str, Any] = {}
    sets = sorted({k.split("/")[0] for k in tensors if k.count("/") == 2 and "/streaming/" in k})
    for set_name in sets:
        prefix = f"{set_name}/streaming/"
        mine = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        alpha = mine["sink_alpha"]
        out[set_name] = types.SimpleNamespace(
            prompt_set=set_name,
            causal=bool(arch.get("causal", True)),
            n_layers=int(alpha.shape[1]),
            n_heads=int(alpha.shape[2]),
            lengths=[int(n) for n in mine["lengths"].tolist()],
            sink_alpha=alpha,
            means={k[len("mean_") :]: v for k, v in mine.items() if k.startswith("mean_")},
        )
    return out


def families_from_run(path: Any, **params: Any) -> HeadTable:
    """Rerun ``head_families`` on a run folder's tables and statistics (no model).

    ``params`` are the detector's keywords (``protocol="all"``, ``n_bootstrap=100``).
    """
    from headscope.analyses import get_detector
    from headscope.runs import open_run

    run = open_run(path)
    tables = [t for t in run.head_tables() if t.group != "families"]
    return get_detector("head_families").run_tables(tables, run_statistics(run), **params)
