"""Poison and backdoor detectors, one interface: ``detect(...) -> (scores, flagged)``.

* :class:`SpectralSignatures` (Tran, Li & Madry 2018): per-class top singular
  direction of training representations; any feature matrix
  (:mod:`~ntk_poison.defences.features`: kernel PCA, empirical NTK features).
* :class:`ActivationClustering` (Chen et al. 2019): per-class PCA then 2-means of
  the representations; the smaller cluster is flagged when under 35% of its class.
* :class:`CurvatureDetector`: the top eigenvalue of the loss's input Hessian at test
  inputs (THEORY.md section 2's spike), thresholded on clean inputs.
* :class:`EPIC` (Yang et al. 2022): per class, greedy facility-location medoids of
  per-example gradients; points alone in their cluster are dropped
  (:mod:`~ntk_poison.defences.epic`: :func:`epic_select`, the kernel-regime
  ``epic_krr`` / ``epic_flow`` and the training engine's ``epic_filter``).
* :mod:`~ntk_poison.defences.evaluate`: AUROC, TPR at a fixed FPR and confusion
  counts against the ground truth, e.g. an artefact's ``is_poison``.
"""

from ntk_poison.defences.activation_clustering import ActivationClustering
from ntk_poison.defences.base import Detector, class_ids
from ntk_poison.defences.curvature import CurvatureDetector
from ntk_poison.defences.epic import EPIC, epic_select
from ntk_poison.defences.evaluate import (auroc, confusion, evaluate, evaluate_artefact,
                                          tpr_at_fpr)
from ntk_poison.defences.features import empirical_ntk_features, kernel_pca_features
from ntk_poison.defences.spectral_signatures import SpectralSignatures

__all__ = ["Detector", "class_ids", "ActivationClustering", "CurvatureDetector",
           "SpectralSignatures", "EPIC", "epic_select", "auroc", "confusion", "evaluate",
           "evaluate_artefact", "tpr_at_fpr", "empirical_ntk_features", "kernel_pca_features"]
