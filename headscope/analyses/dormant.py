"""Active and dormant heads across domains (Guo et al. 2024).

A head is *dormant* on a domain when it parks its attention on the sink
(first-token sink mass above ``sink_mass_threshold``, default 0.5) and its
output is small there; *active* otherwise. A head dormant on one domain and
active on another (prose vs code, say) is an *active-dormant* head: it
switches itself off by attending to the sink when its input is not its
business.

"Output is small" needs a scale; the paper gives no threshold. Ours: the head's
mean output norm ‖Σ_j A_ij v_j‖ (before the output projection, averaged over
query positions) divided by the median of that quantity over the heads of its
layer on the same domain, below ``norm_ratio_threshold`` (default 0.5). Both
thresholds are parameters.

The table's score is the fraction of domains on which the head is dormant;
flagged heads are dormant on at least one domain and active on at least one.
Evidence holds every domain's sink mass, output norm and relative norm.

Definitions, defaults and our choices: docs/methods.md, "active_dormant".
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from headscope.errors import HeadscopeError
from headscope.tables import HeadTable


def detect_active_dormant(
    stats_by_domain: Mapping[str, object],
    *,
    sink_mass_threshold: float = 0.5,
    norm_ratio_threshold: float = 0.5,
) -> HeadTable:
    """Heads dormant (sink-parked, small output) on some domains and active on others."""
    if len(stats_by_domain) < 2:
        raise HeadscopeError(
            "active/dormant heads compare domains: scan at least two prompt sets "
            f"(got {list(stats_by_domain)})"
        )
    domains = list(stats_by_domain)
    first = stats_by_domain[domains[0]]
    sink_mass = np.stack([stats_by_domain[d].means["sink_mass"].numpy() for d in domains])
    output_norm = np.stack([stats_by_domain[d].means["output_norm"].numpy() for d in domains])
    layer_median = np.median(output_norm, axis=2, keepdims=True)
    relative_norm = output_norm / np.where(layer_median > 0, layer_median, 1.0)
    dormant = (sink_mass > sink_mass_threshold) & (relative_norm < norm_ratio_threshold)
    fraction_dormant = dormant.mean(0)
    flagged = dormant.any(0) & ~dormant.all(0)
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
            "sink_mass_threshold": sink_mass_threshold,
            "norm_ratio_threshold": norm_ratio_threshold,
            "domains": domains,
            "score": "fraction of domains on which the head is dormant",
        },
        summary={
            "n_active_dormant": int(flagged.sum()),
            **{f"n_dormant_on_{d}": int(dormant[i].sum()) for i, d in enumerate(domains)},
        },
        description="dormant (sink mass high, output small) on some domains, active on others",
    )
