"""Seeding and small runtime helpers shared by the stages."""

from __future__ import annotations

import copy
import hashlib
import os
import random
import sys
import time

import numpy as np
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from edc import tracking


def derive_seed(seed: int, *names: str) -> int:
    """A seed for one named piece of work (an observer, a class), independent of list order."""
    h = hashlib.sha256(":".join([str(seed), *names]).encode()).digest()
    return int.from_bytes(h[:4], "little")


def trial_seed(seed: int, trial: int) -> int:
    """The seed a trial's own work derives from (the initial draw, synthesis, the relabel plan, the
    students): ``seed`` itself for trial 0, so that the default run keeps its bytes, and a seed
    hashed from (seed, trial) for the others. The split, observers and statistics use ``seed`` alone
    and are shared by every trial."""
    return seed if trial == 0 else derive_seed(seed, "trial", str(trial))


def trial_meta(trial: int) -> dict:
    """The trial as a set's provenance records it: absent for trial 0, so that the default run's
    files keep their bytes."""
    return {"trial": trial} if trial else {}


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch's global generators; return a fresh generator for data order."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


class LineProgress:
    """Progress for logs (no terminal): one line on stderr at most every ``interval`` seconds
    (``EDC_PROGRESS_SECONDS``, default 30) while the loop runs, e.g.
    ``synthesize batch 1/1: 120/300 it, 41 s, ~62 s left``. Quiet for loops shorter than that."""

    def __init__(self, iterable=None, total: int | None = None, desc: str = "", unit: str = "it",
                 interval: float | None = None, file=None):
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total, self.desc, self.unit = total, desc, unit
        env = os.environ.get("EDC_PROGRESS_SECONDS")
        self.interval = interval if interval is not None else float(env) if env else 30.0
        self.file = file
        self.n = 0
        self.start = self.last = time.monotonic()

    def _line(self, now: float) -> str:
        done = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        line = f"{self.desc}: {done} {self.unit}, {now - self.start:.0f} s"
        if self.total and self.n:
            line += f", ~{(now - self.start) / self.n * (self.total - self.n):.0f} s left"
        return line

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            print(self._line(now), file=self.file or sys.stderr, flush=True)

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update()

    def set_postfix(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


STARTUP_PROBE_ENV = "EDC_STARTUP_PROBE"


def _startup_probe(iterable):
    """At the first item: print the wall-clock time and end the process (benchmarks/startup.py)."""
    for _ in iterable:
        print(f"{STARTUP_PROBE_ENV} {time.time():.6f}", flush=True)
        os._exit(0)
    yield from ()


def progress(iterable=None, **kwargs):
    """A tqdm bar on a terminal (stderr); in logs (queued experiments, CI, nohup) a
    :class:`LineProgress` line at most every 30 s, so a long stage is never silent.
    With ``EDC_STARTUP_PROBE`` set, the process ends at the first item, printing the time
    (``benchmarks/startup.py`` measures each stage's start-up so)."""
    if os.environ.get(STARTUP_PROBE_ENV):
        return _startup_probe(iterable)
    if os.environ.get(TIMING_ENV):
        iterable = _clocked(iterable)
    if not sys.stderr.isatty():
        bar = LineProgress(iterable, total=kwargs.get("total"), desc=kwargs.get("desc", ""),
                           unit=kwargs.get("unit", "it"))
    else:
        from tqdm.auto import tqdm

        kwargs.setdefault("leave", False)
        kwargs.setdefault("dynamic_ncols", True)
        bar = tqdm(iterable, **kwargs)
    return _announcing(bar) if not tracking.work_started.is_set() else bar


TIMING_ENV = "EDC_TIMING_FILE"
_loop_depth = [0]


def _clocked(iterable):
    """``iterable``, its time (the loop bodies' included) added to ``tracking.stage_clock["loops"]``
    unless an outer loop already counts it."""
    if _loop_depth[0]:
        yield from iterable
        return
    _loop_depth[0] += 1
    start = time.perf_counter()
    try:
        yield from iterable
    finally:
        _loop_depth[0] -= 1
        tracking.stage_clock["loops"] += time.perf_counter() - start


def _announcing(iterable):
    """``iterable``, telling the stage's MLflow thread at the first item that the work has begun
    (:data:`edc.tracking.work_started`): it then imports MLflow while the batches compute."""
    for item in iterable:
        tracking.work_started.set()
        yield item


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA when this torch sees a GPU, else the CPU; ``cuda`` without a GPU is an error."""
    from edc.errors import ParamsError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ParamsError("params.yaml", ["device: cuda, but torch.cuda.is_available() is False "
                                          "(use device: auto or cpu)"])
    return torch.device(name)


def model_device(model: torch.nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def place(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Move a model to ``device``; on CUDA in channels_last layout (faster convolutions). A no-op on
    the CPU, so CPU results do not depend on this code."""
    if device.type == "cuda":
        return model.to(device, memory_format=torch.channels_last)
    return model.to(device)


def inference_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A frozen eval-mode copy of ``model`` for forward passes without gradient (teachers' soft labels,
    the flatness term's EMA images): each BatchNorm that directly follows a convolution folded into
    its weights, 4-d weights in channels-last memory format; feed it channels-last inputs. The same
    function up to rounding, and a cheaper forward than the model's own (docs/performance.md).

    Models that declare their convolution-BatchNorm pairs (:func:`fold_conv_bn`; this package's
    architectures and any ``nn.Sequential``) are folded without tracing, in a few milliseconds; others
    go through ``torch.fx.experimental.optimization.fuse``, which traces the model (paid at every
    stage's start) and folds the same pairs with the same arithmetic,
    so both give the same bytes (a test compares them). A model torch.fx cannot trace is returned as
    it is. Then each ReLU (or ReLU6) right after a convolution, and a residual sum before one, run
    inside that convolution (:func:`fuse_activations`): the same function without the passes over the
    activations (the same bytes in the default run on this project's CPU; a fused kernel may round
    differently elsewhere, as the thread count already can)."""
    folded = fold_conv_bn(model)
    if folded is None:
        from torch.fx.experimental.optimization import fuse  # here: tracing is the slow path
        from torch.fx.proxy import TraceError

        try:
            folded = fuse(model.eval())
        except TraceError:
            return model
    folded = folded.to(memory_format=torch.channels_last)
    for p in folded.parameters():
        p.requires_grad_(False)
    return fuse_activations(folded)


# oneDNN's convolution with post-operations, the kernel torch.compile (Inductor) calls on the CPU;
# absent from builds without oneDNN, where :func:`fuse_activations` leaves models as they are.
_CONV_POINTWISE = getattr(getattr(torch.ops, "mkldnn", None), "_convolution_pointwise", None)


class ConvAct(nn.Module):
    """A convolution followed by ``act`` ("relu", "hardtanh" with ``scalars`` (min, max), or "none"),
    with ``add``: ``act(conv(x) + other)``. On the CPU in float32, without gradient, one oneDNN kernel
    applies the sum and the activation to each output as it is computed (torch's
    ``mkldnn._convolution_pointwise``): the separate operations' function, to rounding (oneDNN may
    pick another convolution kernel for the fused form), a pass over the activations fewer each.
    Elsewhere (CUDA, float64, gradients) it runs those operations."""

    def __init__(self, conv: nn.Conv2d, act: str, scalars: tuple[float, ...] = (), add: bool = False):
        super().__init__()
        self.conv, self.act, self.scalars, self.add = conv, act, list(scalars), add

    def forward(self, x: torch.Tensor, other: torch.Tensor | None = None) -> torch.Tensor:
        c = self.conv
        if (x.device.type == "cpu" and x.dtype == torch.float32 and not x.requires_grad
                and (other is None or not other.requires_grad) and not c.weight.requires_grad):
            args = (c.weight, c.bias, list(c.padding), list(c.stride), list(c.dilation), c.groups)
            if other is None:
                return _CONV_POINTWISE(x, *args, self.act, self.scalars, "")
            return _CONV_POINTWISE.binary(x, other.contiguous(memory_format=_format_of(x)), *args, "add", None,
                                          self.act, self.scalars, "")
        y = c(x) if other is None else c(x) + other
        if self.act == "relu":
            return torch.relu(y)
        return torch.nn.functional.hardtanh(y, *self.scalars) if self.act == "hardtanh" else y


def _format_of(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) \
        else torch.contiguous_format


def _activation(m: nn.Module) -> tuple[str, tuple[float, ...]] | None:
    if type(m) is nn.ReLU:
        return "relu", ()
    if type(m) in (nn.ReLU6, nn.Hardtanh):
        return "hardtanh", (float(m.min_val), float(m.max_val))
    return None


def _fusable(conv: nn.Module) -> bool:
    return (type(conv) is nn.Conv2d and conv.padding_mode == "zeros" and isinstance(conv.padding, tuple)
            and conv.weight.dtype == torch.float32)


def fuse_activations(model: nn.Module) -> nn.Module:
    """In place, on an inference copy (frozen, BatchNorm folded): each convolution whose output goes
    through nothing but identities (folded BatchNorms) to a ReLU, ReLU6 or Hardtanh in an
    ``nn.Sequential`` becomes a :class:`ConvAct` and the activation an identity. A module can declare
    the same for its own forward: ``FUSE_ACT = {"conv1": ("relu", False), "conv2": ("relu", True)}``
    (True: the forward adds a tensor to that convolution's output before the activation) on its class,
    and a forward that, once the instance's ``fused`` is set, calls ``conv2(y, other)`` instead; its
    ``CONV_BN`` BatchNorms must be folded. Returns ``model``; unchanged without oneDNN."""
    if _CONV_POINTWISE is None:
        return model
    for parent in list(model.modules()):
        if isinstance(parent, nn.Sequential):
            kids = list(parent.named_children())
            for i, (name, conv) in enumerate(kids):
                if not _fusable(conv):
                    continue
                j = i + 1
                while j < len(kids) and type(kids[j][1]) is nn.Identity:
                    j += 1
                act = _activation(kids[j][1]) if j < len(kids) else None
                if act is not None:
                    setattr(parent, name, ConvAct(conv, *act))
                    setattr(parent, kids[j][0], nn.Identity())
        spec = getattr(type(parent), "FUSE_ACT", None)
        if spec:
            bns = dict(getattr(type(parent), "CONV_BN", ()))
            folded = all(type(getattr(parent, bns[c])) is nn.Identity for c in spec if c in bns)
            if folded and all(_fusable(getattr(parent, c)) for c in spec):
                for c, (act, add) in spec.items():
                    setattr(parent, c, ConvAct(getattr(parent, c), act, (), add))
                parent.fused = True
    return model


def fold_conv_bn(model: nn.Module) -> nn.Module | None:
    """An eval-mode copy of ``model`` with each BatchNorm that directly follows a convolution folded into
    it (the arithmetic of ``torch.nn.utils.fusion.fuse_conv_bn_eval``) and replaced by an identity; ``None`` when the
    model does not say where those pairs are. It says so by being an ``nn.Sequential`` or by its class
    having a ``CONV_BN`` attribute: then every pair is either adjacent in an ``nn.Sequential`` (whose
    forward feeds each child's output to the next child only) or named in the ``CONV_BN`` of the module
    that holds both, ``(("conv1", "bn1"), ...)``, for a forward that applies the BatchNorm to that
    convolution's output and uses the output nowhere else."""
    if not (isinstance(model, nn.Sequential) or hasattr(type(model), "CONV_BN")):
        return None
    folded = frozen_clone(model).eval()
    for parent in list(folded.modules()):
        pairs = list(getattr(type(parent), "CONV_BN", ()))
        if isinstance(parent, nn.Sequential):
            kids = list(parent.named_children())
            pairs += [(a, b) for (a, ma), (b, mb) in zip(kids, kids[1:])
                      if type(ma) is nn.Conv2d and type(mb) is nn.BatchNorm2d]
        for conv, bn in pairs:
            c, b = getattr(parent, conv), getattr(parent, bn)
            # what torch.nn.utils.fusion.fuse_conv_bn_eval computes, on the copy's own convolution
            # (that function deep-copies each convolution first: most of a MobileNet-V2's fold time)
            c.weight, c.bias = fuse_conv_bn_weights(c.weight, c.bias, b.running_mean, b.running_var, b.eps,
                                                    b.weight, b.bias)
            setattr(parent, bn, nn.Identity())
    return folded


def frozen_clone(module: nn.Module) -> nn.Module:
    """A copy of ``module`` for inference: its own parameters (without gradient) and buffers, its own
    hook and child containers, other attributes shared. What ``copy.deepcopy`` gives for this
    package's models, without deepcopy's walk over every attribute in Python, which was most of the
    cost of folding a model."""
    c = object.__new__(type(module))
    c.__dict__ = {k: copy.copy(v) if isinstance(v, (dict, set, list)) else v for k, v in module.__dict__.items()}
    c._parameters = {k: None if p is None else nn.Parameter(p.detach().clone(), requires_grad=False)
                     for k, p in module._parameters.items()}
    c._buffers = {k: None if b is None else b.clone() for k, b in module._buffers.items()}
    c._modules = {k: None if m is None else frozen_clone(m) for k, m in module._modules.items()}
    return c


def fused(params) -> dict:
    """``{"fused": True}`` for an optimizer over ``params`` when torch has a fused kernel for them
    (floating point, on the CPU or CUDA): one kernel per step instead of several operations per
    parameter."""
    kinds = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
    ok = all(p.dtype in kinds and p.device.type in ("cpu", "cuda") for p in params)
    return {"fused": True} if ok else {}


def _eager(base: type[torch.optim.Optimizer]) -> type[torch.optim.Optimizer]:
    """``base`` without torch's compiler wrappers. torch wraps an optimizer's ``step`` (gradients off,
    graph breaks for ``torch.compile``) and its ``add_param_group``, ``zero_grad``, ``state_dict`` and
    ``load_state_dict`` (``torch._disable_dynamo``), and each wrapper imports ``torch._dynamo`` on its
    first call, which costs every training stage's start-up more than a second. Nothing here is
    compiled, so the subclass calls the wrapped functions themselves, ``step`` under ``torch.no_grad()``
    as its wrapper does (a test compares the updates with ``base``'s, bit for bit). Methods a torch
    version does not wrap are inherited as they are."""
    methods = {}
    for name in ("step", "add_param_group", "zero_grad", "state_dict", "load_state_dict"):
        plain = getattr(getattr(base, name), "__wrapped__", None)
        if plain is None:
            continue
        if name == "step":
            def method(self, closure=None, _plain=plain):
                with torch.no_grad():
                    return _plain(self, closure)
        else:
            def method(self, *args, _plain=plain, **kwargs):
                return _plain(self, *args, **kwargs)
        method.__name__, method.__doc__ = name, plain.__doc__
        methods[name] = method
    return type(base.__name__, (base,), {**methods, "__module__": __name__,
                                         "__doc__": f"torch.optim.{base.__name__} without compiler wrappers."})


SGD = _eager(torch.optim.SGD)
Adam = _eager(torch.optim.Adam)
AdamW = _eager(torch.optim.AdamW)


def autocast(device: torch.device, bf16: bool):
    """bf16 autocast on CUDA when ``bf16`` is set; a no-op context everywhere else."""
    import contextlib

    if device.type == "cuda" and bf16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# Threads: how many cores this process's torch uses. Set once per process, at stage start
# (:func:`edc.stage.stage_main`), never by a params key, so a change reruns no stage.
THREADS_ENV = "EDC_THREADS"  # torch threads of each stage process
JOBS_ENV = "EDC_JOBS"  # processes sharing the machine (queue workers); default threads = cores // jobs


def _positive_env(env, name: str) -> int | None:
    from edc.errors import EdcError

    text = env.get(name, "").strip()
    if not text:
        return None
    if not text.isdigit() or int(text) < 1:
        raise EdcError(f"environment variable {name}: must be a positive whole number (got {text!r})")
    return int(text)


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def resolve_threads(env=None, cores: int | None = None) -> int:
    """torch threads for a stage process: ``EDC_THREADS`` when set; else ``OMP_NUM_THREADS`` when set
    (torch's own variable; torchrun sets it to 1 for several ranks); else the usable cores divided
    by ``EDC_JOBS`` (processes side by side, default 1) and by ``LOCAL_WORLD_SIZE`` (torchrun's ranks
    on this machine), at least 1. Two processes that each took every core would slow each other
    several-fold, so side-by-side runs must divide them."""
    env = os.environ if env is None else env
    for name in (THREADS_ENV, "OMP_NUM_THREADS"):
        n = _positive_env(env, name)
        if n is not None:
            return n
    jobs = _positive_env(env, JOBS_ENV) or 1
    ranks = _positive_env(env, "LOCAL_WORLD_SIZE") or 1
    return max(1, (cores or usable_cores()) // (jobs * ranks))


def configure_threads(threads: int | None = None) -> int:
    """Give torch ``threads`` intra-op threads (default :func:`resolve_threads`) and one inter-op
    thread (these models run one operator at a time); returns the count. The inter-op count can be
    set only before torch's first parallel work, so a later call keeps the one in place."""
    n = resolve_threads() if threads is None else threads
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    return n
