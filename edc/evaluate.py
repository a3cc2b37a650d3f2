"""Post-evaluation: train students only from a condensed set's shards and test them.

No teacher runs here: the soft labels are the ones stored by ``relabel`` for exactly the batches,
crops, flips and CutMix boxes the plan fixes. Loss ``kl``: KL(softmax(teacher/T) || softmax(student/T))
* T^2; ``mse_ce``: MSE(student logits, teacher logits) + 0.025 * CE(student, hard label), the public
CIFAR recipe; with hard labels, plain cross-entropy. AdamW, a schedule from ``edc.schedules`` over
the training steps, and an EMA of the weights (``torch.optim.swa_utils``) that is the evaluated model.

The EMA has a warm-up: after n updates its decay is ``min(ema_rate, (1 + n) / (ema_warmup + n))``, so
that a short training (1,000 steps at ipc 1) does not leave the evaluated model holding a share of its
random initial weights (``ema_rate ** steps``: 0.99^200 = 13 %). Only the parameters are averaged;
the BatchNorm running statistics of the EMA model are recomputed from the condensed set's own planned
batches before it is tested (:func:`recompute_bn`, as ``torch.optim.swa_utils.update_bn`` does for a
loader), because averaged statistics match neither the averaged weights nor the data.
The reported accuracy is the final model's top-1 on the test split, scored once after the last epoch:
the test split never selects an epoch or a checkpoint, and the curves (every ``eval_every`` epochs)
show the validation split only.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel

from edc.distributed import World
from edc.models import build
from edc.optim import AdamW, fused
from edc.params import EvaluateParams
from edc.progress import clocked, progress
from edc.runtime import place
from edc.schedules import lr_lambda
from edc.seeding import seed_everything
from edc.shards import CondensedDataset
from edc.training import TrainingState, accuracy, train_step


@dataclass(frozen=True)
class Recipe:
    """How every student of an evaluation trains: the ``evaluate`` params, the smoothing schedule's
    ``zeta``, the device, bf16 autocast (CUDA only) and, under torchrun, the ranks that share each
    batch (edc.distributed)."""

    cfg: EvaluateParams
    zeta: float
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    bf16: bool = False
    world: World = field(default_factory=World)


@dataclass
class StudentResult:
    acc: float  # the evaluated model (EMA when enabled) on the test split, after the last epoch
    raw_acc: float  # the raw (non-EMA) weights, logged for comparison
    curve: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    val_acc: float | None = None  # the same two on the validation split (dataset.val_size > 0)
    raw_val_acc: float | None = None


def student_loss(kind: str, out: torch.Tensor, target: torch.Tensor, hard: torch.Tensor, temperature: float,
                 soft: bool) -> torch.Tensor:
    if not soft:
        return F.cross_entropy(out, hard)
    if kind == "kl":
        t = temperature
        log_p_student = F.log_softmax(out / t, dim=1)
        p_teacher = F.softmax(target / t, dim=1)
        return F.kl_div(log_p_student, p_teacher, reduction="batchmean") * t * t
    return F.mse_loss(out, target) + 0.025 * F.cross_entropy(out, hard)


def ema_decay(rate: float, warmup: int, n: int) -> float:
    """The EMA decay applied at the update after ``n`` earlier ones: ``rate`` once warmed up, smaller
    before (``(1 + n) / (warmup + n)``; ``warmup`` 0 = no warm-up)."""
    return rate if warmup <= 0 else min(rate, (1 + n) / (warmup + n))


def warmup_ema(rate: float, warmup: int) -> Callable:
    """A ``multi_avg_fn`` for ``AveragedModel``: ema <- d * ema + (1 - d) * current, d = :func:`ema_decay`."""

    @torch.no_grad()
    def update(ema_params: list[torch.Tensor], params: list[torch.Tensor], num_averaged: torch.Tensor) -> None:
        d = ema_decay(rate, warmup, int(num_averaged))
        torch._foreach_lerp_(ema_params, params, 1.0 - d)

    return update


def has_running_stats(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats for m in model.modules())


@torch.no_grad()
def recompute_bn(model: nn.Module, ds: CondensedDataset, device: torch.device, upto: int | None = None,
                 min_batches: int = 10) -> int:
    """Reset the BatchNorm running statistics of ``model`` and recompute them, as a plain average
    (``momentum=None``), in train mode over the planned batches of the epochs before ``upto`` (default:
    all the set's epochs), the last ones first needed to make at least ``min_batches`` batches: the
    inputs the student was trained on most recently. Returns the number of batches used."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return 0
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    was_training = model.training
    model.train()
    upto = ds.epochs if upto is None else upto
    first = max(0, upto - -(-min_batches // ds.batches_per_epoch))
    used = 0
    for e in clocked(range(first, upto)):
        for x, _, _ in ds.epoch(e):
            model(x.to(device))
            used += 1
    for m, mom in zip(bns, momenta):
        m.momentum = mom
    model.train(was_training)
    return used


class _Evaluated:
    """The model a student is tested as: the EMA of its weights (BatchNorm statistics recomputed from
    the planned batches once per epoch asked for, :func:`recompute_bn`), or the model itself."""

    def __init__(self, model: nn.Module, ema: AveragedModel | None, ds: CondensedDataset, device: torch.device):
        self.model, self.ema, self.ds, self.device, self.ready = model, ema, ds, device, None

    def at(self, epoch: int) -> nn.Module:
        if self.ema is None:
            return self.model
        if self.ready != epoch and has_running_stats(self.ema.module):
            recompute_bn(self.ema.module, self.ds, self.device, epoch)
            self.ready = epoch
        return self.ema.module

    def row(self, epoch: int, val) -> dict:
        """Validation accuracy of the evaluated model, and of the raw weights beside an EMA (none without
        a validation split). The test split is not looked at during training: it is scored once, at
        the end (:func:`_final`), so no curve of it can steer a choice."""
        if val is None:
            return {}
        row = {"val_acc": accuracy(self.at(epoch), val)}
        if self.ema is not None:  # the raw weights beside the EMA: how much the average adds, epoch by epoch
            row["raw_val_acc"] = accuracy(self.model, val)
        return row


def train_student(spec, recipe: Recipe, ds: CondensedDataset, test, seed: int, *, val=None,
                  log: Callable[[dict], None] | None = None, resume: dict | None = None,
                  on_epoch: Callable[[Callable[[], dict]], None] | None = None) -> StudentResult:
    """Train one student (``spec``: an ``evaluate.students`` entry or alike: name, arch, kwargs) under
    ``recipe``; ``test`` and ``val`` (optional): (images, labels) tensors or a SplitView. ``log``
    receives each epoch's curve row.

    ``on_epoch(snapshot)`` is called after every epoch; ``snapshot()`` returns the whole training
    state, which ``resume=`` continues from exactly (same weights, same result). Under torchrun
    (``recipe.world``) the ranks share every planned batch through DistributedDataParallel (see
    edc.distributed); rank 0 alone evaluates, and the other ranks return NaN accuracies."""
    cfg, zeta, device, bf16, world = recipe.cfg, recipe.zeta, recipe.device, recipe.bf16, recipe.world
    seed_everything(seed)
    model = place(build(spec.arch, dict(spec.kwargs), ds.facts), device)
    net = world.wrap(model)
    opt = AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, **fused(model.parameters()))
    total = ds.epochs * ds.batches_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.schedule, total, zeta, cfg.milestones, cfg.gamma))
    ema = AveragedModel(model, multi_avg_fn=warmup_ema(cfg.ema_rate, cfg.ema_warmup),
                        use_buffers=False) if cfg.ema else None
    state = TrainingState(model=model, opt=opt, sched=sched, ema=ema)
    evaluated = _Evaluated(model, ema, ds, device)
    soft = ds.labels == "soft"
    curve, start, first = [], time.perf_counter(), 0
    if resume is not None:
        extra = state.load_state_dict(resume)
        curve, first = list(extra["curve"]), extra["epoch"]

    def loss_of(out: torch.Tensor, target: torch.Tensor, hard: torch.Tensor) -> torch.Tensor:
        return student_loss(cfg.loss, out.float(), target, hard, cfg.temperature, soft)

    model.train()
    for e in progress(range(first, ds.epochs), desc=f"{spec.name} seed {seed}", unit="epoch"):
        loss_sum, n = 0.0, 0
        for x, target, hard in ds.epoch(e):
            step = train_step(net, opt, sched, x, (target, hard), loss_of, world=world, device=device, bf16=bf16)
            if ema is not None:
                ema.update_parameters(model)
            if step.counts:
                loss_sum += step.loss.item() * len(step.out)
                n += len(step.out)
        loss_sum, n = world.all_sum(loss_sum, n)
        row = {"epoch": e + 1, "train_loss": loss_sum / n}
        if world.main and ((e + 1) % cfg.eval_every == 0 or e + 1 == ds.epochs):
            row.update(evaluated.row(e + 1, val))
        curve.append(row)
        if log is not None:
            log(row)
        if on_epoch is not None:
            on_epoch(lambda e=e: state.state_dict(curve=curve, epoch=e + 1))
    if not world.main:
        return StudentResult(float("nan"), float("nan"), curve, time.perf_counter() - start)
    return _final(model, ema, evaluated.at(ds.epochs), curve, epochs=ds.epochs, test=test, val=val,
                  seconds=time.perf_counter() - start)


def _final(model: nn.Module, ema, final: nn.Module, curve: list[dict], *, epochs: int, test, val,
           seconds: float) -> StudentResult:
    """The result after the last epoch, reusing that epoch's evaluation where the loop made it."""
    last = curve[-1] if curve and curve[-1]["epoch"] == epochs else {}

    def measured(key: str, net: nn.Module, split) -> float:
        return last[key] if key in last else accuracy(net, split)

    acc = accuracy(final, test)
    raw = accuracy(model, test) if ema is not None else acc
    val_acc = raw_val = None
    if val is not None:
        val_acc = measured("val_acc", final, val)
        raw_val = measured("raw_val_acc", model, val) if ema is not None else val_acc
    return StudentResult(acc, raw, curve, seconds, val_acc, raw_val)


def summarize(accs: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single seed)."""
    t = torch.tensor(accs, dtype=torch.float64)
    return float(t.mean()), float(t.std()) if len(accs) > 1 else 0.0


class UnaugmentedView:
    """A condensed set without the students' augmentation (evaluation variant ``noaug``): the planned
    batches (the same images in the same order, so the same steps) of the whole, un-cropped, un-mixed
    images; with soft labels each image's target is its mean stored logits over all its planned views
    (:func:`edc.shards.mean_soft_logits`), with hard labels its class."""

    def __init__(self, ds: CondensedDataset):
        from edc.shards import mean_soft_logits, read_epoch

        self.set, self._read = ds, read_epoch
        self.labels, self.facts, self.meta = ds.labels, ds.facts, ds.meta
        self.epochs, self.batches_per_epoch = ds.epochs, ds.batches_per_epoch
        self.soft = mean_soft_logits(ds) if ds.labels == "soft" else None

    def epoch(self, e: int):
        for b in self._read(self.set.path, self.meta, e):
            ids = torch.from_numpy(b["ids"])
            y = self.set.hard[ids]
            yield self.set.images[ids], (self.soft[ids] if self.soft is not None else y), y


class FullTrainSet:
    """The whole train split in the shape of a condensed set's plan, with hard labels (the full-data
    reference that HLR subtracts from): each epoch a fresh seeded order and one planned view per image
    (``aug``: the ``relabel.aug`` crops, flips and RandAugment the sets' students see), in batches of
    ``batch_size``, so a student trains on it exactly as on a set under the same recipe."""

    labels = "hard"

    def __init__(self, train, facts, batch_size: int, epochs: int, aug, seed: int):
        self.train, self.facts, self.batch_size, self.epochs, self.aug, self.seed = \
            train, facts, batch_size, epochs, aug, seed
        self.batches_per_epoch = -(-len(train) // batch_size)

    def epoch(self, e: int):
        from edc.plan import augment, batches, make_plan
        from edc.seeding import derive_seed

        gen = torch.Generator().manual_seed(derive_seed(self.seed, "reference", str(e)))
        plan = make_plan(len(self.train), self.facts.height, self.facts.width, self.batch_size, self.aug.scale_min,
                         self.aug.flip, cutmix=False, gen=gen, randaugment=self.aug.randaugment,
                         magnitude=self.aug.magnitude)
        for ids, crops, _ in batches(plan, self.batch_size):
            y = self.train.labels[ids]
            yield augment(self.train.take(ids), crops, None, (self.facts.mean, self.facts.std)), y, y


def variant_sets(ds: CondensedDataset, variants: list[str]) -> dict[str, object]:
    """The sets each evaluation variant trains on: ``hard`` the planned views with class labels,
    ``noaug`` :class:`UnaugmentedView`."""
    from edc.shards import load_condensed

    made = {"hard": lambda: load_condensed(ds.path, labels="hard"), "noaug": lambda: UnaugmentedView(ds)}
    # Under evaluate.labels: hard the main evaluation is already the hard-label one.
    return {v: made[v]() for v in variants if not (v == "hard" and ds.labels == "hard")}


def evaluate_students(recipe: Recipe, ds: CondensedDataset, test, val, *, seed_for: Callable[..., int], ckpt, run,
                      variants: dict[str, object] | None = None, jobs: int = 1) -> tuple[dict, dict[str, list[dict]]]:
    """Train and test every student of ``recipe.cfg`` (the ``evaluate`` params) with each of its seeds
    (``seed_for(student name, seed index)``), one nested MLflow run each under ``run``; then the same
    students and seeds on each set of ``variants`` (name -> set, :func:`variant_sets`), so that a
    variant's difference to the main result is paired seed by seed. ``ckpt`` keeps the finished ones
    and the current one's state, so an interrupted stage resumes exactly (rank 0 looks first and
    discards a checkpoint of other inputs; the other ranks then read the same). With ``jobs`` > 1,
    the main evaluation's seeds not yet finished train first in that many processes side by side
    (:func:`train_seeds_in_parallel`). Returns (metrics per student, with ``variants: {name: metrics}``
    when there are variants; curves per "student-seed<i>" and "student-<variant>-seed<i>"); on ranks
    other than 0, empty."""
    cfg, world = recipe.cfg, recipe.world
    state = ckpt.load() if world.main else None
    world.barrier()
    if not world.main:
        state = ckpt.load()
    state = state or {"done": {}, "current": None}
    if state["done"] or state["current"]:
        print(f"post_evaluate: resuming ({len(state['done'])} students/seeds finished; checkpoint in {ckpt.dir})",
              flush=True)
    ahead = train_seeds_in_parallel(jobs, recipe, ds, test, val, seed_for=seed_for, state=state, ckpt=ckpt)
    metrics, curves = {}, {}
    for spec in cfg.students:
        for variant, vds in [(None, ds), *(variants or {}).items()]:
            results = []
            for s in range(cfg.seeds):
                key = f"{spec.name}/{s}" if variant is None else f"{spec.name}/{variant}/{s}"
                title = f"{spec.name} seed {s}" + ("" if variant is None else f" ({variant})")
                tags = {"edc.student": spec.name, "edc.seed": str(s), **({"edc.variant": variant} if variant else {})}
                with run.child(title, tags) as seed_run:
                    if key in state["done"]:
                        res = StudentResult(**state["done"][key])
                        if key in ahead:  # trained in another process: its curve reaches MLflow from here
                            for row in res.curve:
                                seed_run.metrics({k: v for k, v in row.items() if k != "epoch"}, step=row["epoch"])
                    else:
                        res = _train_seed(spec, recipe, vds, test, val, seed=seed_for(spec.name, str(s)), key=key,
                                          state=state, ckpt=ckpt, seed_run=seed_run)
                    seed_run.metrics({"final_acc": res.acc, "raw_acc": res.raw_acc, "seconds": res.seconds,
                                      **({"val_acc": res.val_acc} if res.val_acc is not None else {})})
                if world.main:
                    results.append(res)
                    tag = "" if variant is None else f"-{variant}"
                    curves[f"{spec.name}{tag}-seed{s}"] = res.curve
                    on_val = f", validation {100 * res.val_acc:.2f}%" if res.val_acc is not None else ""
                    print(f"[{spec.name}] {title[len(spec.name) + 1:]}: test accuracy {100 * res.acc:.2f}% "
                          f"(raw weights {100 * res.raw_acc:.2f}%{on_val}, {res.seconds:.0f} s)", flush=True)
            if not world.main:
                continue
            if variant is None:
                metrics[spec.name] = _student_metrics(results, spec.name, run)
            else:
                metrics[spec.name].setdefault("variants", {})[variant] = _student_metrics(
                    results, f"{spec.name}.{variant}", run)
    return metrics, curves


def train_seeds_in_parallel(jobs: int, recipe: Recipe, ds: CondensedDataset, test, val, *,
                            seed_for: Callable[..., int], state: dict, ckpt) -> set[str]:
    """Train the students' seeds not in ``state["done"]`` in ``jobs`` spawned processes side by side,
    torch's threads divided between them (``eval_jobs``; 1: nothing happens here, the seeds train
    one after another in this process). Each process trains one seed as :func:`train_student` does
    alone (the same seed, data and thread count give the same bytes) and returns its result to this
    one, which records it in ``state["done"]`` and saves the checkpoint at once; MLflow stays with
    this process. A seed interrupted mid-way by a one-process run resumes from its checkpoint; seeds
    running here are checkpointed only when finished. Returns the keys trained here."""
    cfg, world = recipe.cfg, recipe.world
    if jobs <= 1:
        return set()
    if world.size > 1:
        from edc.errors import ParamsError

        raise ParamsError("params.yaml", [f"eval_jobs: {jobs} trains seeds in parallel processes, but the launcher "
                                          f"already runs {world.size} ranks; set eval_jobs: 1 with torchrun"])
    import os
    from concurrent.futures import ProcessPoolExecutor, as_completed

    todo = [(spec, f"{spec.name}/{s}", seed_for(spec.name, str(s))) for spec in cfg.students
            for s in range(cfg.seeds) if f"{spec.name}/{s}" not in state["done"]]
    if not todo:
        return set()
    threads = max(1, torch.get_num_threads() // jobs)
    print(f"post_evaluate: {len(todo)} students/seeds, {min(jobs, len(todo))} at a time with {threads} thread(s) "
          "each", flush=True)
    current = state["current"] or {}
    ctx = torch.multiprocessing.get_context("spawn")  # fork would copy this process's torch threads and MLflow
    with ProcessPoolExecutor(min(jobs, len(todo)), mp_context=ctx, initializer=_seed_process_start,
                             initargs=(threads, os.getpid())) as pool:
        futures = {pool.submit(_seed_process, spec, recipe, ds, test, val, seed=seed,
                               resume=current if current.get("key") == key else None): key
                   for spec, key, seed in todo}
        for future in as_completed(futures):
            key = futures[future]
            state["done"][key] = future.result()
            if current.get("key") == key:
                state["current"] = None
            if world.main:
                ckpt.save(state)
    return set(futures.values())


def _seed_process_start(threads: int, parent: int) -> None:
    """In each process of :func:`train_seeds_in_parallel`: its share of the threads, and an end when
    the stage's process is gone (killed, it cannot tell the pool, whose processes would wait forever)."""
    import os
    import threading

    from edc.runtime import configure_threads

    configure_threads(threads)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _seed_process(spec, recipe: Recipe, ds: CondensedDataset, test, val, *, seed: int,
                  resume: dict | None) -> dict:
    """One student and seed in a process of :func:`train_seeds_in_parallel`: ``state["done"]``'s entry."""
    res = train_student(spec, recipe, ds, test, seed, val=val, resume=resume)
    return {"acc": res.acc, "raw_acc": res.raw_acc, "curve": res.curve, "seconds": res.seconds,
            "val_acc": res.val_acc, "raw_val_acc": res.raw_val_acc}


def _train_seed(spec, recipe: Recipe, ds: CondensedDataset, test, val, *, seed: int, key: str,
                state: dict, ckpt, seed_run) -> StudentResult:
    """One student and seed, resumed from ``state["current"]`` when it is this one; recorded in
    ``state["done"]`` and checkpointed."""
    world = recipe.world

    def on_epoch(snapshot):
        if world.main:
            ckpt.maybe_save(lambda: {"done": state["done"], "current": {"key": key, **snapshot()}})

    current = state["current"] if (state["current"] or {}).get("key") == key else None
    res = train_student(spec, recipe, ds, test, seed, val=val, resume=current, on_epoch=on_epoch,
                        log=lambda row: seed_run.metrics({k: v for k, v in row.items() if k != "epoch"},
                                                         step=row["epoch"]))
    state["done"][key] = {"acc": res.acc, "raw_acc": res.raw_acc, "curve": res.curve, "seconds": res.seconds,
                          "val_acc": res.val_acc, "raw_val_acc": res.raw_val_acc}
    state["current"] = None
    if world.main:
        ckpt.maybe_save(lambda: state)
    return res


def _student_metrics(results: list[StudentResult], name: str, run) -> dict:
    """metrics.json's entry for one student over its seeds (and the same means to MLflow)."""
    mean, std = summarize([r.acc for r in results])
    out = {"acc_mean": round(mean, 6), "acc_std": round(std, 6),
           "raw_acc_mean": round(summarize([r.raw_acc for r in results])[0], 6),
           "seeds": {str(s): round(r.acc, 6) for s, r in enumerate(results)}}
    run.metrics({f"{name}.acc_mean": mean, f"{name}.acc_std": std})
    vals = [r for r in results if r.val_acc is not None]
    if vals:
        v_mean, v_std = summarize([r.val_acc for r in vals])
        out.update({"val_acc_mean": round(v_mean, 6), "val_acc_std": round(v_std, 6),
                    "raw_val_acc_mean": round(summarize([r.raw_val_acc for r in vals])[0], 6)})
        run.metrics({f"{name}.val_acc_mean": v_mean, f"{name}.val_acc_std": v_std})
    return out
