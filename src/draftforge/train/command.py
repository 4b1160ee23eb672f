"""`draftforge train`: train an EAGLE-3 or DFlash draft from a run config (online target, or a feature
store), resuming from the run's latest checkpoint; alone, or on every rank under torchrun.

setup.py builds the run, trainer.py steps it, this module is the command: the CLI and
`pipeline.train` (demo, bundle) both go through `train`, so a run ends the same way in either."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from draftforge.config import RunConfig, load_config
from draftforge.train.setup import build_training
from draftforge.train.trainer import Trainer


def train(config: RunConfig, progress: bool = True, force: bool = False, fresh: bool = False,
          branch_from: str | None = None) -> tuple[Trainer, dict[str, Any]]:
    """Run `config` to its end, resuming from its out_dir's latest checkpoint (refused when `fresh`),
    else from `branch_from`, and leave the process group however it stops; (the trainer, fit's last
    metrics: {} when the run had finished before)."""
    trainer = build_training(config)
    try:
        if fresh and trainer.latest() is not None:
            raise SystemExit(f"{config.train.out_dir} already has checkpoints (--no-resume given)")
        trainer.resume(force=force, branch_from=branch_from)
        final = trainer.fit(progress=progress)
    finally:
        trainer.close()
    return trainer, final


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML run config (see recipes/); defaults train SmolLM2 on ShareGPT")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=200 train.lr=1e-4")
    parser.add_argument("--force", action="store_true", help="resume even if config, data or world size changed")
    parser.add_argument("--no-resume", action="store_true", help="refuse to start if out_dir has checkpoints")
    parser.add_argument("--branch-from", metavar="CHECKPOINT",
                        help="start from another run's checkpoint (its out_dir/checkpoints/step_N) when out_dir has "
                             "none: with train.schedule=wsd before the decay, a long run branches into shorter "
                             "ones, each exactly the run of its own length (benchmarks/tau_per_minute.py)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (logs still written)")


def run(args: argparse.Namespace) -> int:
    """Alone, or on every rank of `torchrun --nproc-per-node N -m draftforge.cli train ...`."""
    progress = not args.no_progress and os.environ.get("DRAFTFORGE_NO_PROGRESS") is None
    trainer, final = train(load_config(args.config, args.overrides), progress, args.force, args.no_resume,
                           args.branch_from)
    trainer.say(json.dumps({k: v for k, v in final.items() if not isinstance(v, list)}, indent=1))
    return 0
