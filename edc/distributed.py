"""Several processes per stage under ``torchrun``: who am I, wait for the others.

The stage scripts run unchanged under ``torchrun --nproc_per_node N stages/<stage>.py ...`` (the
``launcher`` param in params.yaml, interpolated into dvc.yaml's commands). Work is split so that
the merged result is the single-process result, bit for bit:

- synthesize: the synthesis batches (``synth.batch_size``) are dealt out to the ranks; each batch
  is seeded by its index alone, so it does not matter which process runs it;
- relabel: the epochs are dealt out; each epoch's plan is seeded by its index alone.

Every rank writes its part next to the output; rank 0 waits for all (a gloo barrier), merges,
writes the outputs and logs to MLflow. One process (no ``WORLD_SIZE``) is the ordinary case and
needs no process group.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def mine(self, items: range | list) -> list:
        """The share of ``items`` this rank works on (round-robin)."""
        return [x for i, x in enumerate(items) if i % self.size == self.rank]

    def barrier(self) -> None:
        if self.size > 1:
            import torch.distributed as dist

            dist.barrier()


def init() -> World:
    """The process's place in the job; joins the gloo process group when torchrun started several."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=30))
    return World(dist.get_rank(), dist.get_world_size())
