"""Experiment scripts, each runnable as ``ntk-poison run NAME``.

An experiment is a module (or a package: ``__init__`` with the config and ``run``,
``claims``, ``figures``) with a validated ``Config`` dataclass made of the shared parts
of :mod:`ntk_poison.scenario` plus its own fields, and ``run(config, out_dir) ->
Report``. It is built from library calls only: no experiment imports another
experiment or a private name, and no library module imports an experiment.
"""

import importlib
from types import ModuleType
from typing import Dict, Tuple

#: name -> (module, one-line description)
EXPERIMENTS: Dict[str, Tuple[str, str]] = {
    "demo": ("experiments.demo",
             "clone-poison laws on MNIST: efficacy vs m, spike vs efficacy, near clones, ASR"),
    "lag": ("experiments.lag", "detectability lag: ASR vs curvature visibility, in m and in t"),
    "near_clone_invisible": ("experiments.near_clone_invisible", "near clones vs two detectors"),
    "defence": ("experiments.defence", "input-gradient penalty: capacity, contraction, "
                "high-pass filter, frontier; kernels vs finite erf nets"),
    "linear": ("experiments.linear", "backdoors in linear models (softmax, least squares) on "
               "MNIST: ASR vs input-Hessian overlap per epoch"),
    "backdoor_nets": ("experiments.backdoor_nets", "backdoors in CNNs trained for real: the "
                      "lag, augmentation, the penalty, the frontier, feature collapse"),
    "predict_asr": ("experiments.predict_asr", "a CNN's backdoor ASR predicted by the flow of "
                    "its analytic NTK, against trained nets of growing width"),
    "matrix": ("experiments.matrix", "every attack against every defence, in the kernel "
               "model and in a CNN: ASR beside the trigger alone, accuracy, detection"),
    "certify": ("experiments.certify", "certified (exact kernel certificates, AGT), reached "
                "and visible, against the poison budget"),
    "full_mnist": ("experiments.full_mnist", "KRR on all 60,000 MNIST images by "
                   "preconditioned CG (RBF, ReLU NTK), and the clone law at full scale "
                   "checked by CG refits"),
}


def get(name: str) -> ModuleType:
    if name not in EXPERIMENTS:
        raise ValueError(f"Unknown experiment {name!r}; known: {', '.join(sorted(EXPERIMENTS))}"
                         ". List them with `ntk-poison list`.")
    return importlib.import_module(EXPERIMENTS[name][0])
