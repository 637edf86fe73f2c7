"""Data-parallel sampling and scoring: which process does which batch, and gathering.

`accelerate launch --num_processes N -m elfctl sample|eval|score-ppl ...` starts N copies
of the command. Each takes every N-th batch (`my_share`), and the main process gathers
the results (`Processes.gather`) and writes the files. Because every sample's randomness
is keyed by (seed, sample id) (streams.py), the samples do not depend on N. A plain
one-process run needs no process group at all.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Processes:
    """This process's place among the processes that share the work."""

    rank: int = 0
    world: int = 1
    device: Any = "cpu"  # a torch.device (torch is imported only where it is used)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed

            torch.distributed.barrier()

    def gather(self, obj: Any) -> list[Any]:
        """Every process's `obj`, in rank order (on every process)."""
        if self.world == 1:
            return [obj]
        import torch.distributed

        gathered: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(gathered, obj)
        return gathered

    def all_same(self, obj: Any) -> bool:
        """Whether every process holds an equal `obj` (e.g. the same plan of work)."""
        return all(other == obj for other in self.gather(obj))


def processes(cpu: bool = False) -> Processes:
    """The processes `accelerate launch` (or torchrun) started, or just this one."""
    from accelerate import PartialState

    state = PartialState(cpu=cpu)
    return Processes(state.process_index, state.num_processes, state.device)


def my_share(items: Sequence[T], procs: Processes) -> list[T]:
    """The items (batches) this process does: every world-th one, starting at its rank."""
    return list(items[procs.rank :: procs.world])


def batches(ids: Sequence[int], batch_size: int) -> list[list[int]]:
    """Consecutive ids cut into batches of `batch_size` (the last may be shorter)."""
    ids = list(ids)
    return [ids[i : i + batch_size] for i in range(0, len(ids), batch_size)]


def local_device(device: Any) -> Any:
    """`device` as a torch.device that torch.load's map_location and safetensors accept.

    Accelerate numbers the CPU processes of a multi-process run's devices (cpu:0, cpu:1):
    the index is a rank, not a place, and torch.load ("don't know how to restore data
    location ... cpu:0") and safetensors refuse it. A CPU device is plain "cpu"; any other
    device is kept as it is.
    """
    import torch

    device = torch.device(device)
    return torch.device("cpu") if device.type == "cpu" else device
