"""Certified bounds on poisoning (issue 14; THEORY.md section 5).

* :mod:`~ntk_poison.certify.kernel`: exact certificates of kernel models (KRR and
  kernel flow are linear in the labels): label-flip and label-change bounds, the
  certified radius and accuracy, per-class margins, the clone attack's worst case
  over a candidate set, and the joint (one flip set) certificate as a MILP.
* :mod:`~ntk_poison.certify.agt`: Abstract Gradient Training (Sosnin et al.): interval
  bounds on every parameter that training can reach when up to k points per batch are
  poisoned (features within eps, label flips, regression labels), and the certified
  accuracy, MSE, constant predictions and backdoor ASR bound they imply.
"""

from ntk_poison.certify.kernel import (MILP_MAX_VARIABLES, CloneWorstCase,
                                       JointCertificate, certified_accuracy,
                                       certified_radius, class_margin_bounds,
                                       clone_worst_case, joint_flip_certificate,
                                       joint_flip_solution, kernel_weights,
                                       label_change_bounds, label_flip_bounds)
from ntk_poison.certify import agt

__all__ = ["agt", "MILP_MAX_VARIABLES", "CloneWorstCase", "JointCertificate",
           "certified_accuracy", "certified_radius", "class_margin_bounds",
           "clone_worst_case", "joint_flip_certificate", "joint_flip_solution",
           "kernel_weights", "label_change_bounds", "label_flip_bounds"]
