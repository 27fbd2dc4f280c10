"""Process groups of the 3-D parallel grid, passed explicitly (no module-level globals).

World = TP x PP x DP with TP fastest-varying, then DP, then PP (Megatron-LM's order): global rank

    rank = pp_rank * (dp * tp) + dp_rank * tp + tp_rank

so the ranks of one tensor-parallel group are adjacent (same node, fastest links). With pipeline
parallelism the groups must agree with DeepSpeed's ``PipeModelDataParallelTopology`` (axes
``pipe, data, model``), which uses the same order; :meth:`ParallelState.from_topology` is kept
for that case.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist


@dataclass(frozen=True)
class ParallelState:
    """The calling rank's coordinates and groups in the grid.

    Attributes:
        tp_size, pp_size, dp_size: grid extents.
        tp_rank, pp_rank, dp_rank: this rank's coordinates.
        tp_group, pp_group, dp_group: process groups (``None`` when not distributed; then every
            collective is the identity).
        tp_ranks, dp_ranks, pp_ranks: global ranks of this rank's groups, in group order.
    """

    tp_size: int = 1
    pp_size: int = 1
    dp_size: int = 1
    tp_rank: int = 0
    pp_rank: int = 0
    dp_rank: int = 0
    tp_group: dist.ProcessGroup | None = None
    pp_group: dist.ProcessGroup | None = None
    dp_group: dist.ProcessGroup | None = None
    mp_group: dist.ProcessGroup | None = None
    tp_ranks: tuple[int, ...] = (0,)
    dp_ranks: tuple[int, ...] = (0,)
    pp_ranks: tuple[int, ...] = (0,)

    @classmethod
    def single(cls) -> ParallelState:
        """A 1x1x1 grid for serial use (tests, tools)."""
        return cls()

    @classmethod
    def build(cls, tp_size: int, pp_size: int = 1) -> ParallelState:
        """Create every group of the grid (collective: all ranks must call it in the same order).

        Args:
            tp_size: tensor-parallel size.
            pp_size: pipeline-parallel size.

        Returns:
            This rank's state. ``dp_size`` is ``world // (tp_size * pp_size)``.
        """
        if not dist.is_initialized():
            if tp_size * pp_size != 1:
                raise RuntimeError("torch.distributed is not initialised but tp*pp > 1")
            return cls.single()
        world, rank = dist.get_world_size(), dist.get_rank()
        if world % (tp_size * pp_size):
            raise ValueError(f"world size {world} is not divisible by tp {tp_size} x pp {pp_size}")
        dp_size = world // (tp_size * pp_size)

        def coord(r: int) -> tuple[int, int, int]:
            return r // (dp_size * tp_size), (r // tp_size) % dp_size, r % tp_size

        def make(key) -> tuple[dist.ProcessGroup, tuple[int, ...]]:
            # new_group is collective over the world: create every group, keep ours.
            buckets: dict[tuple, list[int]] = {}
            for r in range(world):
                buckets.setdefault(key(coord(r)), []).append(r)
            mine = None
            for ranks in sorted(buckets.values()):
                g = dist.new_group(ranks)
                if rank in ranks:
                    mine = (g, tuple(ranks))
            assert mine is not None
            return mine

        tp_group, tp_ranks = make(lambda c: (c[0], c[1]))
        dp_group, dp_ranks = make(lambda c: (c[0], c[2]))
        pp_group, pp_ranks = make(lambda c: (c[1], c[2]))
        mp_group, _ = make(lambda c: (c[1],))
        pp_rank, dp_rank, tp_rank = coord(rank)
        return cls(
            tp_size=tp_size,
            pp_size=pp_size,
            dp_size=dp_size,
            tp_rank=tp_rank,
            pp_rank=pp_rank,
            dp_rank=dp_rank,
            tp_group=tp_group,
            pp_group=pp_group,
            dp_group=dp_group,
            mp_group=mp_group,
            tp_ranks=tp_ranks,
            dp_ranks=dp_ranks,
            pp_ranks=pp_ranks,
        )

    @property
    def is_tp_first(self) -> bool:
        return self.tp_rank == 0

    @property
    def mpu(self) -> DeepSpeedMPU:
        """The object DeepSpeed expects as ``mpu`` (model-parallel = TP x PP slice)."""
        return DeepSpeedMPU(self)


class DeepSpeedMPU:
    """Adapter exposing :class:`ParallelState` under the method names DeepSpeed calls.

    DeepSpeed uses the model-parallel group for the TP-aware gradient norm and the data-parallel
    group for gradient reduction and ZeRO partitioning.
    """

    def __init__(self, state: ParallelState) -> None:
        self._s = state

    def get_model_parallel_rank(self) -> int:
        return self._s.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self._s.tp_size

    def get_model_parallel_group(self) -> dist.ProcessGroup | None:
        return self._s.tp_group

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    def get_data_parallel_rank(self) -> int:
        return self._s.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self._s.dp_size

    def get_data_parallel_group(self) -> dist.ProcessGroup | None:
        return self._s.dp_group

    def get_pipeline_model_parallel_rank(self) -> int:
        return self._s.pp_rank

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self._s.pp_size

    def get_pipeline_model_parallel_group(self) -> dist.ProcessGroup | None:
        return self._s.pp_group
