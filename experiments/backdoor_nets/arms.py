"""The defence arms of backdoor_nets: names and what they mean."""

from __future__ import annotations

from typing import Tuple

import numpy as np


def parse_arm(arm: str) -> Tuple[bool, float]:
    """``"none" | "aug" | "pen@K" | "aug+pen@K"`` -> (augment?, kappa)."""
    a = str(arm)
    aug, rest = (True, a[4:]) if a.startswith("aug+") else (a == "aug", a)
    if rest in ("none", "aug") and not a.startswith("aug+"):
        return aug, 0.0
    if rest.startswith("pen@"):
        try:
            k = float(rest[4:])
        except ValueError:
            k = -1.0
        if k > 0 and np.isfinite(k):
            return aug, k
    raise ValueError(f"`arms` entry {arm!r} is not an arm: use 'none', 'aug', 'pen@K' or "
                     "'aug+pen@K' with K > 0 (e.g. 'aug+pen@0.1').")
