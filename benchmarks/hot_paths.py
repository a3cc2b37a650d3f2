"""Hot-path benchmarks on the default data: statistics, synthesis and post-evaluation against their
limits. Prints medians over repeats and the ratios measured in the same run.

    python benchmarks/hot_paths.py [--repeats 5] [--only stats|moments|synth|eval|bytes]

Needs the outputs of `dvc repro` (prepared data, observers, statistics, condensed shards).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, machine_line, median_time, need, paired_ratios, paired_times, row  # noqa: E402

from edc.data import load_prepared, pixel_bounds  # noqa: E402
from edc.evaluate import student_loss  # noqa: E402
from edc.models import build  # noqa: E402
from edc.observers import load_observer  # noqa: E402
from edc.params import load_params  # noqa: E402
from edc.plan import augment  # noqa: E402
from edc.relabel import teacher_logits  # noqa: E402
from edc.shards import load_condensed  # noqa: E402
from edc.stats import bn_layers, collect_bn_stats, load_stats  # noqa: E402
from edc.synth import Observer, crops_per_image, synthesize  # noqa: E402


def per_sample_reference(model, x, y, k):
    """What the public code does: one image at a time, Python-side per-class running sums."""
    sums = {}

    def hook(name):
        def f(_m, inp):
            a = inp[0][0].double()  # (C, H, W)
            s = sums.setdefault(name, {})
            c = int(current[0])
            m, v = a.mean((1, 2)), a.var((1, 2), unbiased=False)
            if c not in s:
                s[c] = [0, torch.zeros_like(m), torch.zeros_like(v)]
            s[c][0] += 1
            s[c][1] += m
            s[c][2] += v
        return f

    current = [0]
    handles = [m.register_forward_pre_hook(hook(n)) for n, m in bn_layers(model)]
    with torch.no_grad():
        for i in range(len(x)):
            current[0] = y[i]
            model(x[i:i + 1])
    for h in handles:
        h.remove()


def stats_timings(model, x, y, k, batch_size, repeats, sub=400):
    """(bare eval forward, collect_bn_stats, per-sample reference scaled from ``sub`` images, and the
    paired ratio of the first two)."""

    def bare():
        with torch.no_grad():
            for i in range(0, len(x), batch_size):
                model(x[i:i + batch_size])

    t_bare, t_ours = paired_times([bare, lambda: collect_bn_stats(model, x, y, k, batch_size=batch_size)], repeats)
    ratio = paired_ratios()[1]
    t_ref = median_time(lambda: per_sample_reference(model, x[:sub], y[:sub], k), max(1, repeats // 2))
    return t_bare, t_ours, t_ref * len(x) / sub, ratio


def bench_stats(p, data, repeats):
    print(f"collect_stats (one eval pass over the {len(data.normalized('train')[1]):,} train images, per observer; "
          f"ratios: median (min-max) of {repeats} paired rounds)")
    x, y = data.normalized("train")
    for name in [m.name for m in p.observers.models]:
        t_bare, t_ours, t_ref, ratio = stats_timings(load_observer(ROOT / "models/observers", name)[0], x, y,
                                                     data.facts.num_classes, p.stats.batch_size, repeats)
        print(row(f"{name}: bare eval forward", t_bare))
        print(row(f"{name}: collect_bn_stats", t_ours, t_bare, "target <= 1.2x", ratio=ratio))
        print(row(f"{name}: per-sample loop reference (scaled)", t_ref, t_ours, "vs ours"))


def plain_steps(model, images, labels, iters, ema_forward=False):
    """The limit of a synthesis step: forward + backward to the pixels, nothing else; with
    ``ema_forward``, plus a no-grad forward of the same batch through the model's own layers (what
    the flatness term adds at the least)."""
    for _ in range(iters):
        if ema_forward:
            with torch.no_grad():
                model(images)
        xi = images.clone().requires_grad_(True)
        F.cross_entropy(model(xi), labels).backward()


def bench_synth(p, data, repeats, iters=10):
    facts = data.facts
    x0, y0 = data.normalized("train")
    idx = torch.cat([torch.nonzero(y0 == c).flatten()[:10] for c in range(10)])
    images, labels = x0[idx], y0[idx]
    # The step matches crops_per_image crops of each image (synth.class_views): the plain forward+backward
    # it is measured against runs over as many images.
    views = crops_per_image(labels, p.synth.class_views)
    plain_x, plain_y = images.repeat(views, 1, 1, 1), labels.repeat(views)
    print(f"synthesize (100 images, {views} crop(s) of each per step: synth.class_views {p.synth.class_views}; "
          f"one observer, {iters} iterations; per-iteration time; ratios to a plain forward+backward of "
          f"{len(plain_x)} images, median (min-max) of {repeats} paired rounds)")
    for name in p.synth.observers:
        model, _ = load_observer(ROOT / "models/observers", name)
        obs = Observer(name, model, load_stats(ROOT / "stats" / f"{name}.safetensors")[0])
        fns = [lambda m=model: plain_steps(m, plain_x, plain_y, iters),
               lambda m=model: plain_steps(m, plain_x, plain_y, iters, ema_forward=True)]
        for mode in ("off", "logits"):
            cfg = p.synth.model_copy(update={"iterations": iters, "observers": [name],
                                             "flatness": p.synth.flatness.model_copy(update={"mode": mode})})
            fns.append(lambda cfg=cfg, o=obs: synthesize(images, labels, [o], cfg, p.alpha, pixel_bounds(facts),
                                                         seed_for=lambda b: 0))
        t_plain, t_limit, t_off, t_logits = (t / iters for t in paired_times(fns, repeats))
        _, r_limit, r_off, r_logits = paired_ratios()
        print(row(f"{name}: plain forward+backward", t_plain))
        print(row(f"{name}: synthesis step, flatness off", t_off, note="target <= 1.25x", ratio=r_off))
        print(row(f"{name}: limit with flatness: + a no-grad forward", t_limit, ratio=r_limit))
        print(row(f"{name}: synthesis step, flatness logits (default)", t_logits, note="target <= 1.4x",
                  ratio=r_logits))


def bench_moments(repeats):
    """The synthesis matching's moments on one BatchNorm input, forward + backward: the two-pass
    formula (what this code did before) against edc.synth.batch_moments (one pass, shifted,
    hand-written backward for the mean of squares)."""
    import torch.nn.functional as F

    from edc.synth import batch_moments

    print("synthesis moments, forward+backward, one layer input (100, 96, 14, 14), 10 classes")
    torch.manual_seed(0)
    a0 = torch.randn(100, 96, 14, 14) * 2 + 1
    onehot = F.one_hot(torch.arange(100) % 10, 10).float()
    shift = torch.ones(96)

    def two_pass():
        a = a0.clone().requires_grad_(True)
        flat = a.reshape(100, 96, -1)
        img_mean = flat.mean(2)
        mean = img_mean.mean(0)
        var = (flat - mean[None, :, None]).square().mean((0, 2))
        counts = onehot.sum(0)[:, None]
        class_mean = onehot.T @ img_mean / counts
        class_var = onehot.T @ (flat - (onehot @ class_mean)[:, :, None]).square().mean(2) / counts
        (mean.sum() + var.sum() + class_mean.sum() + class_var.sum()).backward()

    def one_pass():
        a = a0.clone().requires_grad_(True)
        t = batch_moments(a, onehot, shift)
        (t.mean.sum() + t.var.sum() + t.class_mean.sum() + t.class_var.sum()).backward()

    base = median_time(two_pass, repeats * 3)
    print(row("two-pass formula (reference)", base))
    print(row("batch_moments (one pass, custom backward)", median_time(one_pass, repeats * 3), base))


def bench_eval(p, data, repeats):
    print("post_evaluate (one epoch of the default student over the condensed set)")
    ds = load_condensed(ROOT / "condensed/shards")
    spec = p.evaluate.students[0]
    model = build(spec.arch, dict(spec.kwargs), ds.facts)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    pre = list(ds.epoch(0))  # the same augmented batches, already in memory
    teachers = [load_observer(ROOT / "models/observers", n)[0] for n in ds.meta["teachers"]]
    from edc.shards import read_epoch

    def step(x, target, hard):
        loss = student_loss("kl", model(x), target, hard, 4.0, True)
        opt.zero_grad()
        loss.backward()
        opt.step()

    def bare():
        for x, target, hard in pre:
            step(x, target, hard)

    def stored():
        for x, target, hard in ds.epoch(0):
            step(x, target, hard)

    def on_the_fly():
        for b in read_epoch(ds.path, ds.meta, 0):
            ids = torch.from_numpy(b["ids"])
            x = augment(ds.images[ids], torch.from_numpy(b["crops"]), None)
            step(x, teacher_logits(teachers, x), ds.hard[ids])

    t_bare, t_stored = paired_times([bare, stored], repeats)
    print(row("bare forward+backward (batches in memory)", t_bare))
    print(row("stored soft labels (read shard, replay plan)", t_stored, note="target <= 1.15x",
              ratio=paired_ratios()[1]))
    print(row(f"teachers on the fly ({len(teachers)} teachers)", median_time(on_the_fly, repeats), t_bare))


def bench_bytes(p):
    print("set bytes per image per training epoch, by kind (meta.json)")
    meta = load_condensed(ROOT / "condensed/shards").meta
    per = meta["bytes"]["per_image_epoch"]
    print(f"  codec {meta['codec']}, K={meta['num_classes']}, topk={meta['topk']}, {meta['stored_epochs']} of "
          f"{meta['epochs']} epochs stored: " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(per.items())))


def main() -> None:
    print(machine_line(), flush=True)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--only", choices=["stats", "moments", "synth", "eval", "bytes"], help="run one group")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    p = load_params(ROOT / "params.yaml")
    need(ROOT / "condensed/shards")
    data = load_prepared(ROOT / "data/prepared")
    groups = {"stats": lambda: bench_stats(p, data, args.repeats), "moments": lambda: bench_moments(args.repeats),
              "synth": lambda: bench_synth(p, data, args.repeats),
              "eval": lambda: bench_eval(p, data, args.repeats), "bytes": lambda: bench_bytes(p)}
    for name, fn in groups.items():
        if args.only in (None, name):
            fn()


if __name__ == "__main__":
    main()
