"""Precompute reference log-probs for a run's data (``reference.source: cache``).

    python deepy.py tools/precompute_reference.py RUN.yml [MORE.yml ...] reference.cache=DIR \
        [parallel.tensor=N] [key=value ...]

Reads the run's config (the same files you train with), builds the reference model from
``reference.load`` (else the policy's initial weights: ``checkpoint.load`` of a finetune start, or
the seeded initialisation), and writes, for every example of the train and valid data, what the
objective consumes (e.g. DPO's chosen/rejected sequence log-probs) to ``reference.cache``, with a
fingerprint of the weights, data and objective settings. Train with the same config plus
``reference.source=cache``: a cache that does not match is refused. Any TP x DP grid works
(``parallel.pipeline`` must be 1 here).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron.config import ConfigError, load_config, split_config_args  # noqa: E402
from megatron.training.distributed import LaunchEnvError, discover  # noqa: E402
from megatron.utils import setup_logging  # noqa: E402


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    setup_logging()
    files, overrides = split_config_args(argv)
    if not files:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        world = discover(os.environ).world_size
    except LaunchEnvError as e:
        print(f"cannot start:\n  {e}", file=sys.stderr)
        return 2
    try:
        cfg = load_config(files, overrides, world_size=world)
    except ConfigError as e:
        print(f"config error:\n{e}", file=sys.stderr)
        return 2
    if not cfg.reference.cache:
        print("set reference.cache=DIR (where the cache is written)", file=sys.stderr)
        return 2
    from megatron.training.reference import precompute_reference

    precompute_reference(cfg)
    return 0


if __name__ == "__main__":
    code = main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # why: see train.py (exit-time aborts of gloo/DeepSpeed ranks)
