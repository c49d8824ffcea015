"""Certified bounds on poisoning (issue 14; THEORY.md section 5).

* :mod:`~ntk_poison.certify.kernel`: exact certificates of kernel models (KRR and
  kernel flow are linear in the labels): label-flip and label-change bounds, the
  certified radius and accuracy, per-class margins, the clone attack's worst case
  over a candidate set, and the joint (one flip set) certificate as a MILP.
"""

from ntk_poison.certify.kernel import (MILP_MAX_VARIABLES, CloneWorstCase,
                                       JointCertificate, certified_accuracy,
                                       certified_radius, class_margin_bounds,
                                       clone_worst_case, joint_flip_certificate,
                                       joint_flip_solution, kernel_weights,
                                       label_change_bounds, label_flip_bounds)
# from ntk_poison.certify.agt import ...

__all__ = ["MILP_MAX_VARIABLES", "CloneWorstCase", "JointCertificate",
           "certified_accuracy", "certified_radius", "class_margin_bounds",
           "clone_worst_case", "joint_flip_certificate", "joint_flip_solution",
           "kernel_weights", "label_change_bounds", "label_flip_bounds"]
