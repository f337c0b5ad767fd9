"""Active and dormant heads across domains (Guo et al. 2024).

A head is *dormant* on a domain when it parks its attention on the sink
(first-token sink mass above ``sink_mass_threshold``, default 0.5) and its
output is small there; *active* otherwise. A head dormant on one domain and
active on another (prose vs code, say) is an *active-dormant* head: it
switches itself off by attending to the sink when its input is not its
business. The paper gives no thresholds; both are parameters.

Two protocols (``protocol``), both computed on every run; the table follows
the chosen one and its summary gives the count of both:

- ``"guo2024"`` (default), as Guo et al. (2024), "Active-Dormant Attention
  Heads: Mechanistically Demystifying Extreme-Token Phenomena in LLMs", define
  the quantities: the sink mass is the mean attention to key 0 over query rows
  t ≥ 1 (in a causal model query 0 can only attend to itself); the output is
  the head's contribution to the residual stream, ‖z_h W_O^h‖ (its slice of
  the output projection, bias left out), averaged over the same rows; and
  "small" compares the head with itself across domains: its output on the
  domain divided by its largest output over the scanned domains, below
  ``norm_ratio_threshold`` (default 0.5). Needs the streaming probe's
  ``output_norm_after_wo`` profile (every architecture whose output
  projection ``probes.sites`` finds).
- ``"headscope"`` (headscope's earlier rule): sink mass over every query row,
  query 0 included; the output norm ‖z_h‖ before W_O; "small" relative to the
  median head of the same layer on the same domain. In layers where most heads
  are sink-parked that median is itself a dormant head's, so few heads fall
  below half of it.

The table's score is the fraction of domains on which the head is dormant;
flagged heads are dormant on at least one domain and active on at least one.
Evidence holds every domain's sink mass, output norm and relative norm under
the table's protocol.

Definitions, defaults and our choices: docs/methods.md, "active_dormant".
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from headscope.errors import HeadscopeError, NotApplicable
from headscope.probes.streaming import OUTPUT_NORM_AFTER_WO
from headscope.tables import HeadTable

#: protocol name -> the one-line description recorded in the table
PROTOCOLS = {
    "guo2024": "Guo et al. 2024: sink mass over queries t >= 1, head output after W_O, "
    "each head against its own largest output over the domains",
    "headscope": "headscope's earlier rule: sink mass over all queries, output before W_O, "
    "against the layer's median head on the same domain",
}


def _after_first_query(stats, profile) -> np.ndarray:
    """Mean over real query rows t >= 1 (t >= 0 for an encoder) of a [layer, head,
    query] profile (itself a mean over the prompts long enough for each t)."""
    profile = profile.numpy()
    lengths = np.asarray(stats.lengths)
    counts = (lengths[:, None] > np.arange(profile.shape[-1])[None]).sum(0).astype(float)
    if getattr(stats, "causal", True):
        counts[0] = 0.0  # query 0 sees only itself
    return (profile * counts).sum(-1) / counts.sum()


def sink_and_output(stats, protocol: str) -> tuple[np.ndarray, np.ndarray]:
    """(sink mass, output norm), each [layer, head], of one domain under ``protocol``."""
    if protocol == "headscope":
        return stats.means["sink_mass"].numpy(), stats.means["output_norm"].numpy()
    profiles = getattr(stats, "profiles", {})
    if OUTPUT_NORM_AFTER_WO not in profiles:
        raise NotApplicable(
            "the guo2024 protocol needs each head's output after W_O, which the streaming "
            "probe records only where it finds the model's output projection"
        )
    return (
        _after_first_query(stats, profiles["sink_mass"]),
        _after_first_query(stats, profiles[OUTPUT_NORM_AFTER_WO]),
    )


def _dormancy(
    stats_by_domain: Mapping[str, object], protocol: str, sink_threshold: float, ratio: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(sink mass, output norm, relative norm, dormant), each [domain, layer, head]."""
    measured = [sink_and_output(stats_by_domain[d], protocol) for d in stats_by_domain]
    sink_mass = np.stack([m[0] for m in measured])
    output_norm = np.stack([m[1] for m in measured])
    if protocol == "headscope":
        reference = np.median(output_norm, axis=2, keepdims=True)  # the layer's median head
    else:
        reference = output_norm.max(axis=0, keepdims=True)  # the head's own largest output
    relative_norm = output_norm / np.where(reference > 0, reference, 1.0)
    dormant = (sink_mass > sink_threshold) & (relative_norm < ratio)
    return sink_mass, output_norm, relative_norm, dormant


def detect_active_dormant(
    stats_by_domain: Mapping[str, object],
    *,
    protocol: str = "guo2024",
    sink_mass_threshold: float = 0.5,
    norm_ratio_threshold: float = 0.5,
) -> HeadTable:
    """Heads dormant (sink-parked, small output) on some domains and active on others."""
    if protocol not in PROTOCOLS:
        raise HeadscopeError(
            f"unknown active_dormant protocol '{protocol}'; choose from {', '.join(PROTOCOLS)}"
        )
    if len(stats_by_domain) < 2:
        raise HeadscopeError(
            "active/dormant heads compare domains: scan at least two prompt sets "
            f"(got {list(stats_by_domain)})"
        )
    domains = list(stats_by_domain)
    first = stats_by_domain[domains[0]]
    sink_mass, output_norm, relative_norm, dormant = _dormancy(
        stats_by_domain, protocol, sink_mass_threshold, norm_ratio_threshold
    )
    fraction_dormant = dormant.mean(0)
    flagged = dormant.any(0) & ~dormant.all(0)
    by_protocol: dict[str, int | None] = {}
    for name in PROTOCOLS:  # every protocol's count, for the report to set side by side
        try:
            found = (
                dormant
                if name == protocol
                else _dormancy(stats_by_domain, name, sink_mass_threshold, norm_ratio_threshold)[3]
            )
            by_protocol[name] = int((found.any(0) & ~found.all(0)).sum())
        except NotApplicable:
            by_protocol[name] = None
    evidence = [
        {
            domain: {
                "sink_mass": float(sink_mass[d, layer, head]),
                "output_norm": float(output_norm[d, layer, head]),
                "relative_output_norm": float(relative_norm[d, layer, head]),
                "dormant": bool(dormant[d, layer, head]),
            }
            for d, domain in enumerate(domains)
        }
        for layer in range(first.n_layers)
        for head in range(first.n_heads)
    ]
    return HeadTable.from_matrix(
        fraction_dormant,
        flagged,
        evidence,
        prompt_set="+".join(domains),
        params={
            "protocol": protocol,
            "protocol_note": PROTOCOLS[protocol],
            "sink_mass_threshold": sink_mass_threshold,
            "norm_ratio_threshold": norm_ratio_threshold,
            "domains": domains,
            "score": "fraction of domains on which the head is dormant",
        },
        summary={
            "n_active_dormant": int(flagged.sum()),
            "n_active_dormant_by_protocol": by_protocol,
            **{f"n_dormant_on_{d}": int(dormant[i].sum()) for i, d in enumerate(domains)},
        },
        description="dormant (sink mass high, output small) on some domains, active on others",
    )
