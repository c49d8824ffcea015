"""A poisoning scenario: the clean task, the trigger and the poison point, built from a
config's shared parts.

Every experiment's config is made of these parts (frozen dataclass mixins of
:class:`ntk_poison.config.Config`; each checks its own fields) plus its own fields:

* :class:`DataPart`: the data set, the training subset, the triggered test inputs;
* :class:`AttackPart`: the additive cross trigger's strength, the poison point, the
  target;
* :class:`TargetPart`: the target mode, binary (``positive_classes`` -> +1) or
  all-to-one over the data set's 10 classes (centred one-hot targets, one target
  class);
* :class:`RidgePart` / :class:`KernelPart`: the ridge, and the kernels by name;
* :class:`ImagePart`: the image kernels' own smaller subset (``nt_cnn``);
* :class:`DetectorPart`: the curvature detector's splits and Lanczos settings.

An experiment subclasses the parts it needs and redeclares a field to change its
default; the config stays flat, so its JSON file and ``--set key=value`` are as
before. :func:`build` turns the data and attack parts into a :class:`Scenario`:
a binary task (``positive_classes`` -> +1, the rest -1), the trigger object, the
triggered non-target test inputs and the poison point zeta (the triggered prototype
of the non-target training images, THEORY.md section 2).

**All-to-one** (``target_mode="all_to_one"``, :class:`TargetPart`). The task keeps
all C classes: targets are CENTRED one-hot rows, ``y_c = 1 - 1/C`` for the label's
class and ``-1/C`` for the others (zero mean over classes, like the binary +-1; for
C = 2 the difference f_1 - f_0 is the binary f). KRR is linear in y with no bias, so
subtracting the constant 1/C from every target shifts every output by the same
function of x: the decisions ``argmax_c f_c(x)``, hence ASR and clean accuracy, are
those of plain one-hot targets; only residuals (losses, curvature) depend on the
centring. The non-target inputs are those whose class is not ``target_class``; the
poison label is ``y_target`` times the target class's centred one-hot row; ASR is
``argmax f = target_class`` over triggered non-target test inputs. The attack itself is an
artefact: ``attacks.clone_attack(sc.X, sc.y, sc.zeta, y_target, m, trigger=sc.trigger)``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, NamedTuple, Optional, Tuple

import numpy as np

from ntk_poison import attacks, data, kernels, metrics, triggers
from ntk_poison.config import Config

Array = Any

__all__ = ["DataPart", "AttackPart", "TargetPart", "TARGET_MODES", "centred_one_hot",
           "RidgePart", "KernelPart", "ImagePart",
           "DetectorPart", "Scenario", "DetectionSplits", "build", "build_for_detection", "describe",
           "describe_targets",
           "describe_kernels",
           "kernel_for", "is_image_kernel", "clone_count", "detector_for", "for_kernel",
           "flat_length_scale"]


# --------------------------------------------------------------------------- config parts

@dataclasses.dataclass(frozen=True)
class DataPart(Config):
    """The data: a stratified training subset, triggered non-target test inputs."""

    dataset: str = "mnist"
    n_train: int = 400             # clean training points (stratified subset)
    n_trigger: int = 300           # triggered non-target test points for the ASR
    positive_classes: Tuple[int, ...] = (5, 6, 7, 8, 9)   # the target class is +1
    seed: int = 0
    x64: bool = True

    def validate(self) -> None:
        super().validate()
        self.check_choice("dataset", data.available())
        if not self.positive_classes:
            raise ValueError("`positive_classes` must name at least one class.")
        self.check_min(1, "n_train", "n_trigger")


@dataclasses.dataclass(frozen=True)
class AttackPart(Config):
    """The clone attack: an additive cross trigger and the poison point."""

    trigger_strength: float = 3.0  # cross trigger norm, in units of the length scale l
    poison: str = "prototype"      # zeta: the triggered "prototype" or one "image"
    y_target: float = 1.0

    def validate(self) -> None:
        super().validate()
        self.check_min(0, "trigger_strength")
        self.check_choice("poison", ("prototype", "image"))


#: the target modes of :class:`TargetPart`
TARGET_MODES = ("binary", "all_to_one")


@dataclasses.dataclass(frozen=True)
class TargetPart(Config):
    """The target mode: ``"binary"`` (``positive_classes`` -> +1, the rest -1; the
    default) or ``"all_to_one"`` (every class kept, centred one-hot targets, the
    poison labelled as ``target_class``; the module docstring)."""

    target_mode: str = "binary"
    target_class: int = 0          # all_to_one: the attack's target class (0 .. 9)

    def validate(self) -> None:
        super().validate()
        self.check_choice("target_mode", TARGET_MODES)
        if not 0 <= self.target_class <= 9:
            raise ValueError(f"`target_class` must be a class index in 0..9, got "
                             f"{self.target_class!r}.")


@dataclasses.dataclass(frozen=True)
class RidgePart(Config):
    """The ridge of every kernel fit (relative: the absolute ridge is n * ridge)."""

    ridge: float = 2e-2

    def validate(self) -> None:
        super().validate()
        self.check_positive("ridge")


@dataclasses.dataclass(frozen=True)
class KernelPart(RidgePart):
    """Kernels by registry name; the RBF length scale; the NTKs' depth."""

    kernels: Tuple[str, ...] = ("rbf", "nt_fc")
    length_scale: Optional[float] = None   # RBF l; None: the median pairwise distance
    nt_depth: int = 2

    def validate(self) -> None:
        super().validate()
        if self.length_scale is not None and not self.length_scale > 0:
            raise ValueError("`length_scale` must be > 0 or null (median heuristic).")
        if not self.kernels:
            raise ValueError("`kernels` must name at least one kernel.")
        for k in self.kernels:
            if k not in kernels.available():
                raise ValueError(f"Unknown kernel {k!r} in `kernels`; known: "
                                 f"{kernels.available()}.")
        self.check_min(1, "nt_depth")


@dataclasses.dataclass(frozen=True)
class ImagePart(Config):
    """Image kernels (``nt_cnn``) run on their own smaller subset: ``cnn_n_train``
    training images mean-pooled by ``cnn_pool`` (MNIST 28x28 -> 7x7), as
    ``(n, H, W, 1)`` arrays, with clone counts scaled to the same poison fraction."""

    cnn_n_train: int = 100
    cnn_pool: int = 4

    def validate(self) -> None:
        super().validate()
        self.check_min(1, "cnn_n_train", "cnn_pool")


@dataclasses.dataclass(frozen=True)
class DetectorPart(Config):
    """The curvature detector: clean calibration inputs, evaluation inputs, Lanczos."""

    n_eval: int = 24               # triggered AND clean test inputs scored by the detector
    n_cal: int = 24                # clean test inputs that set the detector's threshold
    fpr: float = 0.05              # the detector's target false-positive rate
    eig_tol: float = 1e-6          # Lanczos relative residual tolerance
    eig_max_iters: int = 30
    eig_batch: int = 1             # inputs per vmapped Lanczos chunk. Keep 1 (the
                                   # library's lanczos default): a batched eigh inside the
                                   # Lanczos while_loop deadlocked XLA's CPU thread pool
                                   # (jax 0.10.2); see ntk_poison/defences/curvature.py.
    smooth_deltas: Tuple[float, ...] = (1e-6, 1e-3)  # smoothness check: the clean top
                                   # eigenvalue at x + delta l u against that at x

    def validate(self) -> None:
        super().validate()
        self.check_min(1, "eig_max_iters", "eig_batch")
        if self.n_eval < 2 or self.n_cal < 2:
            raise ValueError("`n_eval` and `n_cal` must be >= 2 (an AUROC and a quantile).")
        if not 0 < self.fpr < 1:
            raise ValueError(f"`fpr` must be in (0, 1), got {self.fpr}.")
        self.check_positive("eig_tol", "smooth_deltas")


# --------------------------------------------------------------------------- the scenario

@dataclasses.dataclass(frozen=True, eq=False)
class Scenario:
    """The clean binary task, the trigger and the poison point (float64 numpy).

    Attributes:
      X, y: clean training inputs ``(N, *s)`` and +-1 targets ``(N,)``.
      X_test, y_test: clean test inputs and their +-1 targets.
      X_trig: triggered non-target test inputs (the ASR's inputs); ``X_trig[0]`` is
        the trigger point x0 of the laws.
      x0_clean: the first non-target test input before the trigger.
      zeta: the poison point (one input).
      trigger: the trigger object (:mod:`ntk_poison.triggers`).
      length_scale: l, the data's median pairwise distance (or the config's).
      images: inputs are ``(H, W, 1)`` images (for image kernels), else flat.
      pool: the mean-pooling factor applied to the images.
      direction: the trigger's unit direction in these coordinates, when the inputs
        are not the trigger's own (e.g. after ``data.pca_reduction``); None: the
        trigger's.
      target_class: None (binary) or the all-to-one target class; then ``y`` is
        ``(N, C)`` centred one-hot rows (:func:`centred_one_hot`) and ``y_test`` holds
        class indices.
      y_target: the poison label: a float (binary) or the ``(C,)`` row ``y_target e_t``
        centred (all-to-one).
    """

    X: np.ndarray
    y: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    X_trig: np.ndarray
    x0_clean: np.ndarray
    zeta: np.ndarray
    trigger: Any
    length_scale: float
    images: bool = False
    pool: int = 1
    direction: Optional[np.ndarray] = None
    target_class: Optional[int] = None
    y_target: Any = 1.0

    @property
    def multiclass(self) -> bool:
        """True in all-to-one mode (vector outputs, decisions by argmax)."""
        return self.target_class is not None

    def attack_success_rate(self, f: Array) -> np.ndarray:
        """:func:`metrics.attack_success_rate` of predictions ``f`` at triggered non-target
        inputs: ``sign f = sign y_target`` (binary) or ``argmax f = target_class``. Of the
        CLEAN model's predictions it is the trigger-alone ASR."""
        if self.multiclass:
            return metrics.attack_success_rate(f, self.target_class, multiclass=True)
        return metrics.attack_success_rate(f, self.y_target)

    def clean_accuracy(self, f: Array) -> np.ndarray:
        """:func:`metrics.clean_accuracy` of predictions at ``X_test`` (sign or argmax)."""
        return metrics.clean_accuracy(f, self.y_test, multiclass=self.multiclass)

    def effect(self, delta_f: Array) -> np.ndarray:
        """The scalar size of a change of the output: ``delta_f`` itself (binary, signed)
        or its Euclidean norm over the class axis (all-to-one). The norm is the one the
        loss Hessian's Gauss-Newton spike sees: the poison moves every output's gradient
        along the same ``grad_x kt(x, zeta)``, so its spike is ``R_k ||Delta f||^2``."""
        return np.linalg.norm(delta_f, axis=-1) if self.multiclass else np.asarray(delta_f)

    @property
    def x0(self) -> np.ndarray:
        """The trigger point of the laws: the first triggered non-target test input."""
        return self.X_trig[0]

    @property
    def input_shape(self) -> Tuple[int, ...]:
        return tuple(self.X.shape[1:])

    @property
    def trigger_direction(self) -> np.ndarray:
        """The trigger's unit direction, of one input's shape."""
        if self.direction is not None:
            return self.direction
        return np.asarray(self.trigger.direction(self.input_shape), np.float64)

    def reduced(self, reduce) -> "Scenario":
        """The scenario mapped by a linear map ``reduce`` (a batch to a batch, e.g.
        ``data.pca_reduction``): every input mapped, the trigger direction mapped and
        normalised, l re-measured (:func:`metrics.median_distance`)."""
        p = self.trigger_direction.reshape(1, -1)
        d = reduce(p)[0] - reduce(np.zeros_like(p))[0]
        X = reduce(self.X)
        return dataclasses.replace(
            self, X=X, X_test=reduce(self.X_test), X_trig=reduce(self.X_trig),
            x0_clean=reduce(self.x0_clean[None])[0], zeta=reduce(self.zeta[None])[0],
            length_scale=metrics.median_distance(X), direction=d / np.linalg.norm(d))

    def as_images(self) -> "Scenario":
        """The same scenario with every input reshaped to ``(H, W, 1)`` images."""
        grid = tuple(triggers.image_shape_of((1, self.X.shape[1]), None))
        shape = grid + (1,) if len(grid) == 2 else grid

        def r(a, batch=True):
            a = np.asarray(a)
            return a.reshape((a.shape[0],) + shape if batch else shape)

        trig = self.trigger
        if getattr(trig, "image_shape", None) is not None:
            trig = dataclasses.replace(trig, image_shape=None)   # read from the images
        return dataclasses.replace(
            self, X=r(self.X), X_test=r(self.X_test), X_trig=r(self.X_trig),
            x0_clean=r(self.x0_clean, False), zeta=r(self.zeta, False), trigger=trig,
            images=True)

    def clone_attack(self, m: int, y_target: float, seed: int = 0, **meta):
        """The artefact of ``m`` clones of ``(zeta, y_target)`` on the clean set."""
        return attacks.clone_attack(self.X, self.y, self.zeta, y_target, m,
                                    trigger=self.trigger, seed=seed, meta=meta)

    def info(self) -> Dict[str, Any]:
        """What the scenario is made of (for results.json)."""
        out = dict(n_train=int(len(self.X)), input_shape=list(self.input_shape),
                   images=self.images, pool=int(self.pool),
                   length_scale=float(self.length_scale))
        if self.multiclass:
            out.update(target_mode="all_to_one", target_class=int(self.target_class),
                       num_classes=int(self.y.shape[1]))
        return out

    def describe(self) -> str:
        """One line for reports: the training points, their shape, l."""
        return describe(self.info())


def describe(info: Dict[str, Any]) -> str:
    """One line for reports from :meth:`Scenario.info`: the training points, their
    shape and l."""
    shp = "x".join(str(v) for v in info["input_shape"])
    how = (f"images mean-pooled {info['pool']}x{info['pool']} to {shp}" if info["images"]
           and info["pool"] > 1 else (f"{shp} images" if info["images"] else
                                      f"flat inputs of d = {shp}"))
    return f"{info['n_train']} training points, {how}, l = {info['length_scale']:.4g}"


def describe_targets(cfg: Any) -> str:
    """The target mode of a config, in words for a report's set-up: the binary task,
    or the all-to-one task and what the binary statements become in it."""
    if getattr(cfg, "target_mode", "binary") != "all_to_one":
        return (f"Targets: +1 for classes {list(cfg.positive_classes)}, -1 otherwise; poison "
                f"label {cfg.y_target:+g}; ASR = sign f = +1 on triggered non-target "
                "test points.")
    return (f"**All-to-one** (`target_mode = all_to_one`): every class kept, multi-output "
            f"KRR on CENTRED one-hot targets (1 - 1/C at the label's class, -1/C elsewhere; "
            f"argmax decisions are those of plain one-hot targets); the poison is labelled "
            f"{cfg.y_target:g} x the centred one-hot row of class {cfg.target_class}; ASR = "
            f"argmax f = {cfg.target_class} on triggered test points of the other classes; "
            "clean accuracy = argmax accuracy; `positive_classes` is not used. The loss is "
            "1/2 |f(x) - y|^2 summed over outputs, its input Hessian sum_c [grad f_c grad "
            "f_c^T + (f_c - y_c) hess f_c], with the detector's pseudo-label the centred "
            "one-hot row of argmax f. Delta f means the Euclidean norm ||Delta f|| over "
            "outputs: the poison moves every output's gradient along the one direction "
            "grad_x kt(x, zeta), so its Gauss-Newton spike is R_k ||Delta f||^2 and the "
            "binary spike and visibility laws hold with ||Delta f|| for |Delta f|. "
            "Explanations in terms of the binary residual (f - sign f, 1 - f) are the "
            "binary case's and do not apply literally here.")


def describe_kernels(res: Dict[str, Any], dataset: str) -> str:
    """The data each kernel ran on, grouped (flat kernels share one subset, image
    kernels another): ``res[name]["data"]`` is :meth:`Scenario.info`."""
    groups: Dict[str, list] = {}
    for name, r in res.items():
        groups.setdefault(describe(r["data"]), []).append(name)
    return " ".join(f"{', '.join(names)}: {dataset} ({txt})." for txt, names in
                    groups.items())


def build(cfg: Any, *, n_train: Optional[int] = None, n_test: Optional[int] = None,
          n_trigger: Optional[int] = None, pool: int = 1, trigger: str = "cross",
          patch_size: int = 4) -> Scenario:
    """The scenario of a config with a :class:`DataPart` and an :class:`AttackPart`.

    ``n_train``, ``n_test`` (clean test inputs; default ``cfg.n_test``) and
    ``n_trigger`` override the config's; ``pool`` mean-pools the (square) images
    first. The test inputs are a permutation (seed ``cfg.seed + 1``) of the test set:
    its first ``n_test`` points, and its first ``n_trigger`` non-target points,
    triggered. l is ``cfg.length_scale`` if set, else the median pairwise distance
    of the pooled training inputs. ``trigger``: ``"cross"`` (additive, strength
    ``cfg.trigger_strength`` l) or ``"patch"`` (a white BadNets square of
    ``patch_size``).
    """
    n_train = cfg.n_train if n_train is None else n_train
    n_test = cfg.n_test if n_test is None else n_test
    n_trigger = cfg.n_trigger if n_trigger is None else n_trigger
    xtr, ytr, xte, yte = data.load(cfg.dataset)
    X, yl = data.subset(xtr, ytr, n_train, seed=cfg.seed)
    X = data.mean_pool(X.astype(np.float64), pool)
    rng = np.random.default_rng(cfg.seed + 1)
    perm = rng.permutation(len(xte))
    X_test = data.mean_pool(np.asarray(xte[perm[:n_test]], np.float64), pool)
    t = None
    if getattr(cfg, "target_mode", "binary") == "all_to_one":
        t, C = int(cfg.target_class), int(max(ytr.max(), yte.max())) + 1
        if t >= C:
            raise ValueError(f"`target_class` = {t} is not a class of {cfg.dataset!r} "
                             f"(classes 0..{C - 1}).")
        y, y_test = centred_one_hot(yl, C), np.asarray(yte[perm[:n_test]], np.int64)
        y_target = float(cfg.y_target) * centred_one_hot([t], C)[0]
        neg_idx = perm[yte[perm] != t][:n_trigger]
    else:
        y = data.binary_targets(yl, cfg.positive_classes).astype(np.float64)
        y_test = data.binary_targets(yte[perm[:n_test]], cfg.positive_classes)
        y_target = cfg.y_target
        neg_idx = perm[~np.isin(yte[perm], cfg.positive_classes)][:n_trigger]
    side = int(round(np.sqrt(X.shape[1])))
    ell = getattr(cfg, "length_scale", None) or metrics.median_distance(X)
    if trigger == "cross":
        trig = triggers.CrossTrigger(strength=cfg.trigger_strength * ell,
                                     image_shape=(side, side))
    else:
        trig = triggers.PatchTrigger(size=patch_size, image_shape=(side, side))
    x_neg = data.mean_pool(np.asarray(xte[neg_idx], np.float64), pool)
    X_trig = np.asarray(trig.apply(x_neg), np.float64)
    zeta = attacks.prototype_poison(X, y, trig, cfg.poison, y_target)
    return Scenario(X=X, y=y, X_test=X_test, y_test=y_test, X_trig=X_trig,
                    x0_clean=x_neg[0], zeta=zeta, trigger=trig, length_scale=float(ell),
                    pool=pool, target_class=t, y_target=y_target)


def centred_one_hot(labels: Array, num_classes: int) -> np.ndarray:
    """Centred one-hot targets ``(n, C)`` float64: ``1 - 1/C`` at the label's class,
    ``-1/C`` elsewhere (rows sum to 0; :func:`data.one_hot` minus 1/C)."""
    return data.one_hot(labels, num_classes, dtype=np.float64) - 1.0 / num_classes


class DetectionSplits(NamedTuple):
    """The curvature detector's inputs: triggered and clean evaluation inputs, and the
    clean calibration inputs that set its threshold."""

    x_trig: np.ndarray
    x_clean: np.ndarray
    x_cal: np.ndarray


def build_for_detection(cfg: Any, images: bool = False) -> Tuple[Scenario, DetectionSplits]:
    """The scenario of a config with a :class:`DetectorPart` (and :class:`ImagePart`).

    Its clean test inputs are the detector's ``n_eval`` clean evaluation inputs then
    its ``n_cal`` calibration inputs; ``max(n_trigger, n_eval)`` triggered ones.
    ``images=True``: the image kernels' subset (``cnn_n_train`` points mean-pooled by
    ``cnn_pool``) as ``(H, W, 1)`` images, with its own l.
    """
    sc = build(cfg, n_train=cfg.cnn_n_train if images else cfg.n_train,
               n_test=cfg.n_eval + cfg.n_cal, n_trigger=max(cfg.n_trigger, cfg.n_eval),
               pool=cfg.cnn_pool if images else 1)
    if images:
        sc = sc.as_images()
    ne = cfg.n_eval
    return sc, DetectionSplits(sc.X_trig[:ne], sc.X_test[:ne], sc.X_test[ne:ne + cfg.n_cal])


def for_kernel(cache: Dict[bool, Any], cfg: Any, name: str
               ) -> Tuple[Scenario, DetectionSplits]:
    """:func:`build_for_detection` for the input kind of kernel ``name`` (flat, or images
    for ``nt_cnn``), built once per kind and kept in ``cache``."""
    images = is_image_kernel(name)
    if images not in cache:
        cache[images] = build_for_detection(cfg, images)
    return cache[images]


def flat_length_scale(cache: Dict[bool, Any]) -> float:
    """l of the flat scenario in a :func:`for_kernel` cache (else of the image one)."""
    return cache[False][0].length_scale if False in cache else cache[True][0].length_scale


def is_image_kernel(name: str) -> bool:
    """True for kernels of images ``(n, H, W, C)`` (``Kernel.input_rank`` 3: nt_cnn)."""
    return kernels.get(name).input_rank > 1


def kernel_for(name: str, cfg: Any, ell: float) -> kernels.Kernel:
    """The kernel ``name`` of a :class:`KernelPart` config: RBF and Matern at length
    scale ``ell``, the NTKs at depth ``cfg.nt_depth``, others with their defaults."""
    if name in ("rbf", "matern52"):
        return kernels.get(name, length_scale=ell)
    if name in ("nt_fc", "nt_cnn"):
        return kernels.get(name, depth=cfg.nt_depth)
    return kernels.get(name)


def clone_count(cfg: Any, m: int, images: bool) -> int:
    """``m`` for flat inputs; ``round(m cnn_n_train / n_train)`` (>= 1 if m >= 1) for the
    image subset (:class:`ImagePart`), so both see the same poison fraction."""
    if not images or m == 0:
        return int(m)
    return max(1, int(round(m * cfg.cnn_n_train / cfg.n_train)))


def detector_for(cfg: Any, direction: Array):
    """The curvature detector of a :class:`DetectorPart` config (Lanczos, top pair;
    ``direction`` is only reported as an alignment, never used to flag)."""
    from ntk_poison.defences import CurvatureDetector
    return CurvatureDetector(k=1, method="lanczos", fpr=cfg.fpr, trigger_direction=direction,
                             key=cfg.seed, tol=cfg.eig_tol, max_iters=cfg.eig_max_iters,
                             batch_size=cfg.eig_batch)
