"""The ``ntk-poison`` console script: thin argument parsing over the experiments.

    ntk-poison demo [--out DIR] [--seed S] [--config FILE] [--set key=value ...] [--fresh]
    ntk-poison run NAME [--out DIR] [--config FILE] [--set key=value ...] [--fresh]
                        [--distributed]
    ntk-poison list
    ntk-poison config NAME [--save FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import List, Optional


def _add_run_args(p: argparse.ArgumentParser, default_out: Optional[str]) -> None:
    p.add_argument("--out", default=default_out,
                   help="output directory (results.json, figures, report.md)")
    p.add_argument("--config", help="a JSON config file (see `ntk-poison config NAME`)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config field (repeatable); VALUE is JSON or a string")
    p.add_argument("--seed", type=int, help="the random seed (same seed, same numbers)")
    p.add_argument("--distributed", action="store_true",
                   help="join a multi-process JAX job first (ntk_poison.distributed."
                        "initialize() from NTK_POISON_/JAX_COORDINATOR_ADDRESS, "
                        "_NUM_PROCESSES, _PROCESS_ID, or SLURM/Open MPI auto-detection)")
    p.add_argument("--fresh", action="store_true",
                   help="delete the finished grid points in OUT/cells and start over (by "
                        "default a rerun with the same config resumes, skipping them)")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ntk-poison",
        description="Data poisoning, backdoors and their defences in the NTK regime.")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="the clone-poison laws on MNIST (the main job)")
    _add_run_args(d, "results/demo")
    r = sub.add_parser("run", help="run a named experiment")
    r.add_argument("name")
    _add_run_args(r, None)
    sub.add_parser("list", help="list the experiments")
    c = sub.add_parser("config", help="print an experiment's default config as JSON")
    c.add_argument("name")
    c.add_argument("--save", help="write it to this file instead")
    return p


def _load_config(module, args):
    cfg = module.Config.load(args.config) if args.config else module.Config()
    overrides = list(args.set)
    if args.seed is not None:
        overrides.append(f"seed={args.seed}")
    return cfg.with_overrides(overrides) if overrides else cfg


def _run(name: str, args) -> int:
    if args.distributed:              # before any JAX computation, as JAX requires
        from ntk_poison import distributed
        info = distributed.initialize()
        print(f"distributed: process {info.process_id} of {info.num_processes}, "
              f"{info.local_devices} local / {info.global_devices} devices")
    import experiments
    module = experiments.get(name)
    cfg = _load_config(module, args)
    out = args.out or f"results/{name}"
    t = time.time()
    rep = module.run(cfg, out, fresh=True) if args.fresh else module.run(cfg, out)
    print(f"{name}: wrote {out}/results.json, {out}/report.md and {len(rep.figures)} "
          f"figures in {time.time() - t:.1f} s")
    for c in rep.claims:
        print(f"  [{c.verdict:>13}] {c.name}: {c.evidence}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "list":
            import experiments
            for name, (_, desc) in sorted(experiments.EXPERIMENTS.items()):
                print(f"{name:12s} {desc}")
            return 0
        if args.command == "config":
            import experiments
            cfg = experiments.get(args.name).Config()
            if args.save:
                cfg.save(args.save)
                print(f"wrote {args.save}")
            else:
                print(json.dumps(cfg.to_dict(), indent=2))
            return 0
        if args.command == "demo":
            return _run("demo", args)
        return _run(args.name, args)
    except ValueError as e:
        print(f"ntk-poison: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
