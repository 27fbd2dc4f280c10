"""torchrun without its failure traceback: ``python tools/torchrun.py ARGS``.

Takes exactly ``python -m torch.distributed.run``'s arguments and runs the same elastic agent.
When ranks fail, torchrun raises ``ChildFailedError`` out of its ``main`` and Python prints it as
a ~25-line traceback and failure report after the ranks' own messages (a diverged run's one-line
reason, a collective timeout) — noise that buries them. This entry point prints one line naming
the failed ranks and their exit statuses instead, and exits with the highest status (3 for a
diverged run, rather than torchrun's generic 1). ``deepy.py`` launches it for
``launcher.type: torchrun``.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """Run torchrun's agent on ``argv``; returns the exit status (0, or the failed ranks')."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(argv))
    except ChildFailedError as e:
        codes = {int(rank): int(f.exitcode) for rank, f in e.failures.items()}
        listed = ", ".join(f"rank {r}: {c}" for r, c in sorted(codes.items()))
        print(f"torchrun: ranks exited with a failure status ({listed})", file=sys.stderr)
        worst = max(codes.values(), default=1)
        return worst if worst > 0 else 128 - worst  # a negative exitcode is a signal
    return 0


if __name__ == "__main__":
    sys.exit(main())
