"""``python -m hpt_fast.train [CONFIG.yaml] [key=value ...]``: run HPT (or a baseline).

With no arguments it runs the embedded default: the synthetic arithmetic task and a tiny Qwen2
model built on the spot (hpt_fast.toy), no download, a few minutes on a 2-core CPU.
Under ``torchrun --nproc_per_node N -m hpt_fast.train ...`` (or the ``deepspeed`` launcher) each
process is one rank.
"""
from __future__ import annotations

import argparse
import logging
import sys

from hpt_fast.checkpoint import CheckpointError
from hpt_fast.config import Config, ConfigError, load_config
from hpt_fast.data import DataError
from hpt_fast.toy import use_toy
from hpt_fast.trainer import Trainer, leave_process_group

_KIND = {ConfigError: "config", DataError: "data", CheckpointError: "checkpoint"}


def run_config(args: list[str]) -> Config:
    """The run's config from the command line's arguments: an optional YAML config's path first,
    then key=value overrides (the embedded default's toy model and data filled in where named).
    Raises ConfigError."""
    path = args[0] if args and "=" not in args[0] else None
    return use_toy(load_config(path, args[1:] if path else args))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hpt_fast.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("args", nargs="*", help="an optional YAML config, then key=value overrides")
    # the deepspeed launcher passes --local_rank; the rank comes from the LOCAL_RANK variable it also sets
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = run_config(args.args)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    try:
        trainer = Trainer(cfg)
    except tuple(_KIND) as err:  # raised before the model loads, but damage inside a state file
        kind = next(name for cls, name in _KIND.items() if isinstance(err, cls))
        print(f"{kind} error: {err}", file=sys.stderr)
        return 2
    try:
        last = trainer.fit()
    finally:
        trainer.close()
    if trainer.rank == 0:
        if last:
            shown = {k: last[k] for k in ("step", "reward_mean", "sft_fraction") if k in last}
            shown.update((k, v) for k, v in last.items() if k.startswith("val/"))
            print("final:", ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items()))
        else:  # resumed from a checkpoint at or past the last step
            print(f"final: nothing to train: the run is already at step {trainer.step} of "
                  f"train.total_steps={cfg.train.total_steps} (its metrics are in metrics.jsonl)")
        print(f"run directory: {cfg.train.output_dir}")
    return 0


if __name__ == "__main__":
    code = main()
    if code == 0:
        leave_process_group()
    sys.exit(code)
