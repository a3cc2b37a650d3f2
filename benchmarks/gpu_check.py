"""The CUDA path, end to end, on a machine with a GPU: one short run to prove it, not a benchmark.

    python benchmarks/gpu_check.py [--out DIR]

Runs the seven stages with the test suite's tiny params twice in scratch directories, once with
``device: cuda`` and once with ``device: cpu``, and prints each stage's time on each. It checks what
the GPU code promises: the CUDA run writes every output; bf16 autocast is on for training and the
teachers and off for statistics and synthesis; models sit in channels_last; the synthesized images
stay within a few pixel values of the CPU's (float32 both, different kernels); accuracies are in the
same range. Exits 1 with the failed checks listed, 0 when all hold. Needs ``torch.cuda.is_available()``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

STAGES = ["prepare", "train_observers", "collect_stats", "init", "synthesize", "relabel", "post_evaluate"]


def run_pipeline(work: Path, device: str) -> dict[str, float]:
    import os

    from tests.conftest import tiny_params, write_yaml
    from tests.test_bad_inputs import ARGS
    from tests.test_pipeline import stage

    work.mkdir(parents=True)
    p = tiny_params()
    p["device"] = device
    write_yaml(work / "params.yaml", p)
    times = {}
    cwd = os.getcwd()
    os.chdir(work)
    try:
        for name in STAGES:
            t = time.perf_counter()
            stage(name)(["--params", "params.yaml", *ARGS[name]])
            if device == "cuda":
                torch.cuda.synchronize()
            times[name] = time.perf_counter() - t
    finally:
        os.chdir(cwd)
    return times


def probe_placement() -> list[str]:
    """What place() and autocast() do on CUDA, checked directly."""
    from edc.models import create_model
    from edc.runtime import autocast, place, resolve_device

    problems = []
    dev = resolve_device("auto")
    if dev.type != "cuda":
        problems.append(f"device auto resolved to {dev}, not cuda")
        return problems
    model = place(create_model("resnet18", in_channels=3, num_classes=10, image_size=32, width=16), dev)
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    if not conv.weight.is_contiguous(memory_format=torch.channels_last):
        problems.append("place(): conv weights are not channels_last on CUDA")
    with autocast(dev, True):
        out = model(torch.randn(4, 3, 32, 32, device=dev))
    if out.dtype != torch.bfloat16:
        problems.append(f"autocast(bf16=True): logits are {out.dtype}, not bfloat16")
    with autocast(dev, False):
        out = model(torch.randn(4, 3, 32, 32, device=dev))
    if out.dtype != torch.float32:
        problems.append(f"autocast(bf16=False): logits are {out.dtype}, not float32")
    return problems


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="keep the two runs here (default: a temporary directory)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("torch.cuda.is_available() is False: run this on a machine with a GPU")
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}")
    problems = probe_placement()
    with tempfile.TemporaryDirectory(prefix="edc-gpu-") as tmp:
        root = args.out or Path(tmp)
        times = {dev: run_pipeline(root / dev, dev) for dev in ("cuda", "cpu")}
        for name in STAGES:
            print(f"  {name:<16} cuda {times['cuda'][name]:7.2f} s   cpu {times['cpu'][name]:7.2f} s")
        imgs = {d: np.load(root / d / "condensed/images/images.npy").astype(np.int16) for d in ("cuda", "cpu")}
        diff = np.abs(imgs["cuda"] - imgs["cpu"])
        print(f"  synthesized pixels, cuda vs cpu: max |diff| {diff.max()}, mean {diff.mean():.3f} (of 255)")
        if diff.mean() > 8:
            problems.append(f"synthesized images differ from the CPU's by {diff.mean():.1f} pixel values on average")
        acc = {d: json.loads((root / d / "reports/metrics.json").read_text()) for d in ("cuda", "cpu")}
        for name in acc["cpu"]:
            a, b = acc["cuda"][name]["acc_mean"], acc["cpu"][name]["acc_mean"]
            print(f"  {name}: test accuracy cuda {a:.4f}, cpu {b:.4f}")
            if abs(a - b) > 0.15:
                problems.append(f"{name}: accuracy {a:.3f} on cuda against {b:.3f} on cpu")
        shards = sorted((root / "cuda" / "condensed/shards").glob("epoch-*.tar"))
        if not shards:
            problems.append("relabel wrote no epoch shards on cuda")
    for line in problems:
        print(f"FAILED: {line}")
    print("all checks hold" if not problems else f"{len(problems)} check(s) failed")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
