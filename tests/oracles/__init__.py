"""Independent numpy references for the ntk-poison test suite.

Nothing here imports ``ntk_poison``: every function is written from the closed form
or the recursion it names, in float64 numpy, so the tests compare the library against
something it could disagree with.

* :mod:`.closed_forms` - RBF / linear / Matern-5/2 Gram matrices, and kernel ridge
  regression with the RBF kernel (fit, prediction, input gradient, input Hessian).
* :mod:`.arccos` - the arc-cosine (Cho & Saul 2009) NNGP / NTK recursion of a fully
  connected ReLU network in the NTK parameterisation of neural-tangents.
* :mod:`.finite_diff` - central finite differences (with Richardson extrapolation)
  for gradients and Jacobians of numpy functions.
* :mod:`.util` - relative errors and machine epsilons for dtype-aware tolerances.
"""

from . import arccos, closed_forms, finite_diff, util  # noqa: F401
