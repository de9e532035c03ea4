"""Expert statistics from a routing trace alone, for models whose weights are not here
(Mixtral-sized specs in the simulator).

Importance is the calibration run's definition (`measures.importance_from`) on the trace's
routed tokens and router weights. Similarity is a routing proxy, labelled
"trace-routing (proxy)": per layer, each expert's column of per-token router weights over
the trace (0 where the token did not route to it), and the cosine between two experts'
columns. It says how often two experts are chosen for the same tokens with similar weight,
which is only a stand-in for what System 2 wants (how alike their outputs are); with top-k
routing co-selected experts may be complements rather than substitutes. Use output
similarity (`calibration.py`) wherever the weights exist.
"""

from __future__ import annotations

import numpy as np

from d2moe.experts.measures import cosine_gram, importance_from
from d2moe.policies.stats import ExpertStats

TRACE_SOURCE = "trace-routing (proxy)"


def stats_from_trace(trace: object) -> ExpertStats:
    """ExpertStats of a `d2moe.traces.Trace`: importance [L][E] and the routing proxy of
    similarity [L][E][E] (see the module docstring)."""
    experts = np.asarray(trace.experts, dtype=np.int64)  # [n, L, k]
    weights = np.asarray(trace.weights, dtype=np.float64)  # [n, L, k]
    n, L, k = experts.shape
    E = int(trace.num_experts)
    layer = np.broadcast_to(np.arange(L, dtype=np.int64)[None, :, None], (n, L, k))
    cell = (layer * E + experts).reshape(-1)  # one bin per (layer, expert)
    counts = np.bincount(cell, minlength=L * E).reshape(L, E)
    sums = np.bincount(cell, weights=weights.reshape(-1), minlength=L * E).reshape(L, E)
    importance = importance_from(counts, sums, np.full(L, n))
    # Gram matrix of the per-token router-weight columns: Σ_t w_te w_tf over every pair of
    # slots (i, j) of a token, the pair (i, i) giving the diagonal Σ_t w_te²
    pair = ((layer[:, :, :, None] * E + experts[:, :, :, None]) * E
            + experts[:, :, None, :])  # [n, L, k, k]
    prod = weights[:, :, :, None] * weights[:, :, None, :]
    gram = np.bincount(pair.reshape(-1), weights=prod.reshape(-1),
                       minlength=L * E * E).reshape(L, E, E)
    similarity = cosine_gram(gram)
    meta = {"trace": getattr(trace, "path", None) or "", "spec": str(trace.spec_name),
            "tokens": int(n), "top_k": int(k)}
    return ExpertStats.from_lists(importance, similarity, source=TRACE_SOURCE, meta=meta)
