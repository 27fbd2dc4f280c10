"""A pool of gloo ranks reused across the tests of a module.

Starting processes dominates test time on a 2-core machine, so each test module spawns one pool
per world size and runs many functions in it: ``pool.run(fn, *args)`` executes the importable
function ``fn(rank, world_size, *args)`` on every rank and returns the per-rank results (an
exception on any rank is re-raised here with its traceback).
"""

from __future__ import annotations

import importlib
import multiprocessing as mp
import os
import queue
import tempfile
import traceback
from typing import Any


def _worker(rank: int, world: int, init_file: str, inbox, outbox) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    while True:
        job = inbox.get()
        if job is None:
            break
        module, name, args = job
        try:
            fn = getattr(importlib.import_module(module), name)
            outbox.put((rank, True, fn(rank, world, *args)))
        except BaseException:  # noqa: BLE001 - report everything to the parent
            outbox.put((rank, False, traceback.format_exc()))
    try:
        dist.barrier()
    finally:
        # why: skip interpreter teardown (gloo/DeepSpeed can abort there; see cpu-feasibility.md)
        os._exit(0)


class DistPool:
    """``world_size`` spawned gloo ranks waiting for functions to run."""

    def __init__(
        self, world_size: int, timeout: float = float(os.environ.get("DIST_POOL_TIMEOUT", 600))
    ) -> None:
        ctx = mp.get_context("spawn")
        self.world_size, self.timeout = world_size, timeout
        self._dir = tempfile.TemporaryDirectory()
        init_file = os.path.join(self._dir.name, "init")
        self.inboxes = [ctx.Queue() for _ in range(world_size)]
        self.outbox = ctx.Queue()
        self.procs = [
            ctx.Process(
                target=_worker, args=(r, world_size, init_file, self.inboxes[r], self.outbox)
            )
            for r in range(world_size)
        ]
        for p in self.procs:
            p.start()
        self.closed = False

    def run(self, fn, *args: Any) -> list[Any]:
        if self.closed:
            raise RuntimeError("this pool was shut down after a rank failed")
        for q in self.inboxes:
            q.put((fn.__module__, fn.__name__, args))
        results: dict[int, Any] = {}
        errors = []
        for _ in range(self.world_size):
            # why: once a rank has failed, the others are usually stuck in a collective; wait
            # briefly for their reports, then give up on the pool rather than hang.
            try:
                rank, ok, value = self.outbox.get(timeout=10 if errors else self.timeout)
            except queue.Empty:
                if not errors:
                    raise
                break
            (results.__setitem__(rank, value) if ok else errors.append(f"rank {rank}:\n{value}"))
        if errors:
            if len(results) + len(errors) < self.world_size:
                self.close()
            raise RuntimeError("\n".join(errors))
        return [results[r] for r in range(self.world_size)]

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for q in self.inboxes:
            q.put(None)
        for p in self.procs:
            p.join(timeout=30 if all(x.is_alive() for x in self.procs) else 5)
            if p.is_alive():
                p.kill()
        self._dir.cleanup()
