"""Several processes per stage under ``torchrun``: who am I, wait for the others.

The stage scripts run unchanged under ``torchrun --nproc_per_node N stages/<stage>.py ...`` (the
``launcher`` param in params.yaml, interpolated into dvc.yaml's commands). Work is split so that
the merged result is the single-process result, bit for bit:

- synthesize: the synthesis batches (``synth.batch_size``) are dealt out to the ranks; each batch
  is seeded by its index alone, so it does not matter which process runs it;
- relabel: the epochs are dealt out; each epoch's plan is seeded by its index alone.

Every rank writes its part next to the output; rank 0 waits for all (a gloo barrier), merges,
writes the outputs and logs to MLflow.

train_observers and post_evaluate train one model together with DistributedDataParallel: every rank
draws the same batch (same order, same augmentation, the same stored soft labels) and takes its
contiguous share of the rows (:meth:`World.part`); its loss is weighted by its share
(:meth:`World.loss_weight`) so that DDP's gradient average is the gradient of the whole batch's
mean loss. A model without BatchNorm therefore trains as in one process, up to float rounding;
BatchNorm normalises each rank's share by its own statistics, as DDP always does (rank 0's running
statistics are the ones kept). Rank 0 alone evaluates, writes the outputs and logs.

One process (no ``WORLD_SIZE``) is the ordinary case and needs no process group.
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

    def part(self, n: int) -> slice:
        """This rank's contiguous share of a batch of ``n`` rows (shares differ by one at most). A
        batch smaller than the number of ranks is not split: every rank computes all of it."""
        if self.size == 1 or n < self.size:
            return slice(0, n)
        base, extra = divmod(n, self.size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (self.rank < extra))

    def loss_weight(self, part: slice, n: int) -> float:
        """The factor on a rank's mean loss over ``part`` that makes DDP's average of the ranks'
        gradients equal the gradient of the mean loss over all ``n`` rows."""
        rows = part.stop - part.start
        return 1.0 if self.size == 1 or rows == n else self.size * rows / n

    def backward(self, loss, part: slice, n: int) -> None:
        """``loss.backward()`` for this rank's mean loss over ``part`` of a batch of ``n`` rows,
        weighted by :meth:`loss_weight` (unweighted in one process: the same graph as ever)."""
        weight = self.loss_weight(part, n)
        (loss if weight == 1.0 else loss * weight).backward()

    def counts(self, part: slice, n: int) -> bool:
        """Whether this rank's rows of a batch enter the epoch's loss and accuracy sums (before
        :meth:`all_sum`): its own share always; a batch every rank computed whole, on rank 0 only."""
        return self.main or part.stop - part.start < n

    def all_sum(self, *values: float) -> list[float]:
        """Sums over the ranks (the values themselves in one process)."""
        if self.size == 1:
            return list(values)
        import torch
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()

    def wrap(self, model):
        """``model`` in DistributedDataParallel when there are several ranks (gradients averaged on
        backward); the model itself in one process."""
        if self.size == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model)


def print_on_rank0(rank: int) -> None:
    """From here on, ``print`` on a rank other than 0 prints nothing unless called with ``force=True``:
    the one place that makes rank 0 the only one that talks (as torchvision's reference scripts do),
    instead of a ``world.main`` check before every message."""
    if rank == 0:
        return
    import builtins

    plain = builtins.print

    def quiet(*args, force: bool = False, **kwargs) -> None:
        if force:
            plain(*args, **kwargs)

    builtins.print = quiet


def init() -> World:
    """The process's place in the job; joins the gloo process group when torchrun started several."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    import torch
    import torch.distributed as dist

    if torch.cuda.is_available():  # one GPU per process on a multi-GPU machine ("cuda" = this one)
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=30))
    print_on_rank0(dist.get_rank())
    return World(dist.get_rank(), dist.get_world_size())
