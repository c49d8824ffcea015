"""Deprecated: the clone clusters moved to :mod:`ntk_poison.attacks`, the trigger
patterns to :mod:`ntk_poison.triggers` (old names kept for one release).

====================  =====================================
old name              new name
====================  =====================================
``clone_cluster``     ``attacks.clone_cluster``
``near_clone``        ``attacks.near_clone``
``cross_pattern``     ``triggers.cross_pattern``
``apply_additive``    ``triggers.apply_additive``
``patch_trigger``     ``triggers.patch_mask``
``apply_patch``       ``triggers.apply_patch``
====================  =====================================
"""

from __future__ import annotations

import importlib
import warnings

__all__ = ["clone_cluster", "near_clone", "patch_trigger", "apply_patch", "cross_pattern",
           "apply_additive"]

_MOVED = {"clone_cluster": ("attacks", "clone_cluster"),
          "near_clone": ("attacks", "near_clone"),
          "cross_pattern": ("triggers", "cross_pattern"),
          "apply_additive": ("triggers", "apply_additive"),
          "patch_trigger": ("triggers", "patch_mask"),
          "apply_patch": ("triggers", "apply_patch")}


def __getattr__(name: str):
    if name in _MOVED:
        mod, new = _MOVED[name]
        warnings.warn(f"ntk_poison.poison.{name} moved to ntk_poison.{mod}.{new}; the old "
                      "name is a deprecated alias and goes in the next release.",
                      DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(f"ntk_poison.{mod}"), new)
    raise AttributeError(f"module 'ntk_poison.poison' has no attribute {name!r}")
