"""Storage and memory budgets at ImageNet-1k scale, printed from the real formats and models.

    python benchmarks/budgets.py [--chunk 10] [--size 224]

1. Statistics storage for ImageNet-1k (K = 1000) with the paper's five torchvision observers: the
   bytes of one ``stats/<name>.safetensors`` computed from each model's BatchNorm layers (float64
   mean and var per channel, per-class mean and var, per-class count), as ``collect_stats`` writes.
2. Soft-label storage per image per epoch at K = 1000, full logits and top-k: the bytes of epoch
   shards written by :class:`edc.shards.CondensedWriter` for 100 images in batches of 100.
3. Peak memory of one synthesis step per class chunk (``--chunk`` images of ``--size`` pixels) for
   each observer, measured in a fresh process (maximum resident set size, minus the process's
   resident size before the step).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, machine_line  # noqa: E402

from edc.models import create_model  # noqa: E402
from edc.stats import bn_layers  # noqa: E402

OBSERVERS = ("tv_resnet18", "tv_mobilenet_v2", "tv_shufflenet_v2_x0_5", "tv_efficientnet_b0", "tv_alexnet")
K = 1000


def stats_bytes(arch: str) -> tuple[int, int, int]:
    model = create_model(arch, in_channels=3, num_classes=K, image_size=224)
    layers = dict(bn_layers(model))
    channels = sum(m.num_features for m in layers.values())
    # per layer: mean, var (C,), class_mean, class_var (K, C), class_count (K,), all float64
    floats = sum(2 * m.num_features + 2 * K * m.num_features + K for m in layers.values())
    return len(layers), channels, 8 * floats


def label_bytes(topk: int, n: int = 100, batch: int = 100, epochs: int = 2) -> float:
    from edc.plan import make_plan
    from edc.shards import CondensedWriter

    with tempfile.TemporaryDirectory() as tmp:
        images = torch.zeros(n, 3, 8, 8, dtype=torch.uint8)
        labels = torch.arange(n) % K
        facts = {"height": 8, "width": 8, "channels": 3}
        w = CondensedWriter(tmp, images, labels, {"dataset": facts, "num_classes": K, "epochs": epochs,
                                                  "batch_size": batch, "topk": topk, "cutmix": False})
        gen = torch.Generator().manual_seed(0)
        for e in range(epochs):
            plan = make_plan(n, 8, 8, batch, 0.5, False, cutmix=False, gen=gen)
            w.write_epoch(e, plan, batch, torch.randn(n, K), topk)
        w.close()
        size = sum(f.stat().st_size for f in Path(tmp).glob("labels-*.tar"))  # labels, plan and their framing
    return size / epochs / n


CHILD = r"""
import json, resource, sys, torch
from edc.models import create_model
from edc.stats import bn_layers, LayerStats
from edc.synth import Observer, synthesize
from types import SimpleNamespace as NS
arch, chunk, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.manual_seed(0)
model = create_model(arch, in_channels=3, num_classes=1000, image_size=size).eval()
stats = {}
for name, m in bn_layers(model):
    c = m.num_features
    stats[name] = LayerStats(torch.zeros(c, dtype=torch.float64), torch.ones(c, dtype=torch.float64),
                             torch.zeros(1000, c, dtype=torch.float64), torch.ones(1000, c, dtype=torch.float64),
                             torch.ones(1000, dtype=torch.float64), torch.ones(1000, c, dtype=torch.float64))
obs = Observer(arch, model, stats)
x = torch.randn(chunk, 3, size, size)
y = torch.zeros(chunk, dtype=torch.long)
cfg = NS(batch_size="all", lr=0.05, lr_schedule="cosine", iterations=2, ce_weight=1.0, r_bn=0.01,
         flatness=NS(mode="logits", weight=1.0, beta=0.99, tau=4.0), aug=NS(scale_min=0.5, flip=True))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
synthesize(x, y, [obs], cfg, 0.5, (torch.tensor(-3.0), torch.tensor(3.0)), lambda b: 0)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"before_mib": before / 1024, "peak_mib": peak / 1024}))
"""


def synthesis_peak(arch: str, chunk: int, size: int) -> dict:
    r = subprocess.run([sys.executable, "-c", CHILD, arch, str(chunk), str(size)], capture_output=True, text=True,
                       cwd=ROOT, timeout=1800)
    if r.returncode != 0:
        raise SystemExit(f"{arch}: {r.stderr.strip().splitlines()[-1]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    print(machine_line(), flush=True)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chunk", type=int, default=10, help="images per class chunk (ipc 10)")
    ap.add_argument("--size", type=int, default=224)
    args = ap.parse_args()
    print(f"1. statistics storage, ImageNet-1k (K = {K}), one safetensors file per observer")
    total = 0
    for arch in OBSERVERS:
        n, c, b = stats_bytes(arch)
        total += b
        print(f"  {arch:<24} {n:3d} BN layers {c:6d} channels {b / 2**20:9.1f} MiB")
    print(f"  {'five observers':<24} {'':32} {total / 2**20:9.1f} MiB")
    print(f"2. soft labels per image per epoch, K = {K}, batches of 100 (tar headers included)")
    for topk in (0, 100, 10):
        print(f"  {'full logits' if topk == 0 else f'top-{topk}':<24} {label_bytes(topk):9.0f} bytes")
    print(f"3. peak memory of a synthesis step (flatness on), one class chunk of {args.chunk} images at "
          f"{args.size} px")
    for arch in OBSERVERS:
        if arch == "tv_alexnet":
            print(f"  {arch:<24} no BatchNorm layers: it cannot be matched (the paper uses it for labels)")
            continue
        m = synthesis_peak(arch, args.chunk, args.size)
        step = m["peak_mib"] - m["before_mib"]
        print(f"  {arch:<24} peak {m['peak_mib']:7.0f} MiB, of which the step {step:7.0f} MiB")


if __name__ == "__main__":
    main()
