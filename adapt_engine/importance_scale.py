"""How raw layer importances become the ``I_j`` of the per-layer sparsity shift ``A·I_j``.

* ``max`` (the paper's): ``I = (r − mean r) / max |r − mean r|``. One outlier layer (SmolLM2's first layer
  has cosine −0.008 while the others sit in [−0.98, −0.83]) takes I = 1 and squeezes every other layer
  into a sliver near 0.
* ``robust``: centre on the median and scale by three robust standard deviations,
  ``z = (r − median r) / (3 · 1.4826 · MAD)`` with ``MAD = median |r − median r|``; clip z to [−1, 1]
  (an outlier saturates at ±1 instead of setting the scale), then subtract the mean so the shift sums to 0.
  A MAD of 0 (most layers equal) falls back to ``max``.
* ``rank``: ``I_j = 2·rank_j/(n−1) − 1`` with average ranks for ties: evenly spread in [−1, 1], mean 0,
  only the order of the layers matters.
"""

from __future__ import annotations

import torch

from .args import IMPORTANCE_SCALES
from .importance import normalize_importance

_MAD_TO_SIGMA = 1.4826  # MAD of a normal distribution times this is its standard deviation
_ROBUST_SIGMAS = 3.0


def scale_importance(raw: torch.Tensor, method: str = "max") -> torch.Tensor:
    """Normalised layer importance by ``method`` (see the module doc); zeros if all layers are equal."""
    if method not in IMPORTANCE_SCALES:
        raise ValueError(f"--importance-scale must be one of {', '.join(IMPORTANCE_SCALES)}, got '{method}'")
    raw = raw.double()
    n = raw.numel()
    if method == "max" or n < 2:
        return normalize_importance(raw).float()
    if method == "robust":
        centred = raw - raw.median()
        mad = centred.abs().median()
        if not mad > 0:
            return normalize_importance(raw).float()
        z = (centred / (_ROBUST_SIGMAS * _MAD_TO_SIGMA * mad)).clamp(-1.0, 1.0)
        return (z - z.mean()).float()
    # rank: average rank of ties, so equal importances get equal I
    order = raw.argsort()
    ranks = torch.empty(n, dtype=torch.float64)
    ranks[order] = torch.arange(n, dtype=torch.float64)
    for value in raw.unique():
        tied = raw == value
        ranks[tied] = ranks[tied].mean()
    return (2.0 * ranks / (n - 1) - 1.0).float()
