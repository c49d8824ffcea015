"""Every experiment's config: bad values raise a ValueError that names the field.

The checks are built from ``ntk_poison.config.Config``'s helpers and the shared parts
of ``ntk_poison.scenario`` (each part checks its own fields); this walks each
experiment through the shared fields and its own, and checks that the defaults and a JSON round trip pass.
"""

import dataclasses
import math

import pytest

from experiments import defence, demo, lag, linear, near_clone_invisible as nci
from experiments import predict_asr
from ntk_poison.config import Config

CONFIGS = {"demo": demo.Config, "lag": lag.Config, "near_clone_invisible": nci.Config,
           "defence": defence.Config, "linear": linear.Config,
           "predict_asr": predict_asr.Config}

# (field, bad value, text the message must contain), for every config with that field
SHARED = [
    ("dataset", "cifar-1000", "dataset"),
    ("positive_classes", (), "positive_classes"),
    ("trigger_strength", -1.0, "trigger_strength"),
    ("poison", "mixture", "poison"),
    ("ridge", 0.0, "ridge"),
    ("ridge", -1e-3, "ridge"),
    ("ridge", math.nan, "ridge"),
    ("length_scale", -2.0, "length_scale"),
    ("kernels", (), "kernels"),
    ("kernels", ("rbf", "nope"), "Unknown kernel 'nope'"),
    ("n_train", 0, "n_train"),
]

OWN = {
    "demo": [("trigger", "blend", "trigger"), ("r_min", 5.0, "r_min"),
             ("near_clone_m", -1, "near_clone_m"), ("pool", 0, "pool")],
    "lag": [("n_eval", 1, "n_eval"), ("fpr", 1.0, "fpr"), ("eig_tol", 0.0, "eig_tol"),
            ("smooth_deltas", (1e-3, 0.0), "smooth_deltas"), ("flow_m", -1, "flow_m"),
            ("t_min", 1e5, "t_min"), ("visibility_factor", 0.5, "visibility_factor"),
            ("cnn_pool", 0, "cnn_pool")],
    "near_clone_invisible": [("m", 0, "m"), ("kpca_components", 10 ** 6, "kpca_components"),
                             ("auroc_tol", 0.6, "auroc_tol"),
                             ("ss_multiplier", -1.0, "ss_multiplier"),
                             ("eig_batch", 0, "eig_batch")],
    "defence": [("dim", 1, "dim"), ("n_filter_dirs", 7, "n_filter_dirs"),
                ("kappas", (), "kappas"), ("kappas", (1.0, 0.1), "kappas"),
                ("net_kappas", (0.1, -1.0), "net_kappas"), ("widths", (128, 0), "widths"),
                ("weak_m", -1, "weak_m"), ("fit_growth_max", 0.0, "fit_growth_max"),
                ("augment_sigma", 0.0, "augment_sigma")],
    "linear": [("target_class", 10, "target_class"), ("train_subset", -1, "train_subset"),
               ("poison_counts", (), "poison_counts"),
               ("poison_counts", (60, 6), "poison_counts"),
               ("poison_counts", (0, 6), "poison_counts"),
               ("models", ("softmax", "hinge"), "models"),
               ("epochs", 0, "epochs"), ("batch_size", -1, "batch_size"),
               ("lr_squares", 0.0, "lr_squares"), ("n_hessian", 0, "n_hessian"),
               ("overlap_rise", 0.5, "overlap_rise"), ("align_factor", 0.0, "align_factor"),
               ("init_scale", -1.0, "init_scale")],
    "predict_asr": [("target_class", 10, "target_class"), ("pool", 0, "pool"),
                    ("poison_counts", (4, 2), "poison_counts"),
                    ("poison_counts", (0, 2), "poison_counts"), ("widths", (8,), "widths"),
                    ("widths", (32, 8), "widths"), ("net_seeds", (1, 1), "net_seeds"),
                    ("net_seeds", (1, 0, 1), "net_seeds"), ("lr", 0.0, "lr"),
                    ("steps", 0, "steps"), ("asr_tol", 0.0, "asr_tol")],
}

CASES = [(name, f, v, msg) for name, cls in CONFIGS.items()
         for f, v, msg in SHARED + OWN[name]
         if f in {fld.name for fld in dataclasses.fields(cls)}]


@pytest.mark.parametrize("name,field,value,msg", CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[2]!r}" for c in CASES])
def test_bad_value_names_the_field(name, field, value, msg):
    want = f"`{msg}`" if msg == field else msg          # the field's name, in backticks
    with pytest.raises(ValueError, match=want):
        CONFIGS[name](**{field: value})


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_defaults_pass_and_round_trip(name, tmp_path):
    cfg = CONFIGS[name]()
    assert CONFIGS[name].load(cfg.save(tmp_path / "c.json")) == cfg


def test_check_helpers():
    @dataclasses.dataclass(frozen=True)
    class C(Config):
        a: int = 1
        b: float = 0.5
        xs: tuple = (1.0, 2.0)
        s: str = "x"

    c = C()
    c.check_min(1, "a")
    c.check_positive("b", "xs")
    c.check_choice("s", ("x", "y"))
    with pytest.raises(ValueError, match=r"`a` must be >= 2, got 1"):
        c.check_min(2, "a")
    with pytest.raises(ValueError, match=r"every value of `xs` must be > 0"):
        C(xs=(1.0, -1.0)).check_positive("xs")
    with pytest.raises(ValueError, match=r"`xs` must not be empty"):
        C(xs=()).check_positive("xs")
    C(xs=()).check_positive("xs", allow_empty=True)
    with pytest.raises(ValueError, match=r"`b` must be > 0, got nan"):
        C(b=math.nan).check_positive("b")
    with pytest.raises(ValueError, match=r"`s` must be one of \['x', 'y'\], got 'z'"):
        C(s="z").check_choice("s", ("x", "y"))
