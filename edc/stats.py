"""Per-class BatchNorm statistics of an observer, computed exactly in one pass.

For every BatchNorm layer ``l`` the statistics describe the layer's *input* over (images, height,
width): per channel, the mean and the population variance (divide by the count, as BatchNorm
normalises), globally and for each class ``c``. The variance of class ``c`` is the pooled variance
of all its values; beside it, ``class_within_var`` is the average over the class's images of each
image's own spatial variance (what the released EDC code calls a class's variance: the part of the
pooled variance that one image can carry; the rest is the spread between the images' means).

Vectorised accumulation: a forward pre-hook shifts the layer input by a per-channel constant ``s``
(the first batch's channel means), reduces each image to its spatial sum and sum of squares in
float32, and adds them into float64 per-class accumulators ``S1``, ``S2`` with ``index_add_``. At
the end, for class c with ``n_c`` values per channel: ``m = S1_c / n_c``, ``mean_c = s + m`` and
``var_c = S2_c / n_c - m**2``. The shift keeps the sums of squares free of cancellation.

File format (safetensors, one file per observer), for each layer name ``<l>`` (the module's dotted
path in the model, e.g. ``layers.0.0.bn1``), all float64:

    <l>.mean         (C,)    global mean
    <l>.var          (C,)    global variance
    <l>.class_mean   (K, C)  per-class mean
    <l>.class_var    (K, C)  per-class variance
    <l>.class_count  (K,)    values per channel behind each class's statistics (images x H x W)
    <l>.class_within_var (K, C) per-class mean of each image's spatial variance

Metadata (one JSON object under the safetensors metadata key ``edc``, see :mod:`edc.io`):
``format`` = ``edc-stats/1``, ``observer``, ``arch``, ``layers`` (list, model order), ``num_classes``,
``images``, ``observer_md5`` (md5 of the weights file the statistics came from), ``targets``
(``augment``, ``draws``, ``aug``: the synthesis augmentation the views were drawn with, or null for
un-augmented images; synthesize refuses statistics drawn under another ``synth.aug``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from edc.data import as_split
from edc.errors import ArtifactError
from edc.io import read_safetensors_metadata, save_safetensors
from edc.params import SynthAugParams
from edc.progress import progress
from edc.runtime import model_device
from edc.synth_views import apply_view, sample_view

FORMAT = "edc-stats/1"
STAT_NAMES = ("mean", "var", "class_mean", "class_var", "class_count", "class_within_var")


def bn_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's BatchNorm layers in registration order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@dataclass
class LayerStats:
    mean: torch.Tensor  # (C,)
    var: torch.Tensor  # (C,)
    class_mean: torch.Tensor  # (K, C)
    class_var: torch.Tensor  # (K, C)
    class_count: torch.Tensor  # (K,)
    class_within_var: torch.Tensor  # (K, C)


class _Accumulator:
    """Per-class float64 sums of a layer's input: its values, and its squares, per channel.

    Each image's spatial sum and sum of squares are taken in float32 (a sum and a squared vector
    norm: two reads, no temporary) and accumulated in float64; the result shifts them to the first
    batch's channel means s, sum (a - s)^2 = sum a^2 - 2 s sum a + n s^2. That loses digits in
    proportion to mean^2 / variance, so the channels where it exceeds ``ILL_CONDITIONED`` in the first
    batch (a mean over 3 times its spread) are summed from a shifted copy instead: exact also when a
    channel's mean is 1,000 times its spread. Moments are recovered in float64.
    """

    ILL_CONDITIONED = 10.0

    def __init__(self, num_classes: int, channels: int):
        z = lambda *s: torch.zeros(*s, dtype=torch.float64)  # noqa: E731
        self.count, self.s1, self.s2 = z(num_classes), z(num_classes, channels), z(num_classes, channels)
        self.within = z(num_classes, channels)  # sums of n x each image's own variance
        self.shift: torch.Tensor | None = None
        self.ill: torch.Tensor | None = None  # channels summed shifted

    def add(self, x: torch.Tensor, labels: torch.Tensor) -> None:
        b, c = x.shape[:2]
        flat = x.detach().float().reshape(b, c, -1)
        n = flat.shape[2]
        s1, norms = flat.sum(2), torch.linalg.vector_norm(flat, dim=2)  # (B, C) each
        if self.shift is None:
            mean = s1.double().sum(0) / (b * n)
            var = norms.double().square().sum(0) / (b * n) - mean.square()  # cancels where ill-conditioned
            self.shift = mean.to(flat.dtype)
            self.ill = torch.nonzero(mean.square() > self.ILL_CONDITIONED * var).flatten()
        if len(self.ill):
            d = flat[:, self.ill] - self.shift[self.ill][:, None]
            s1[:, self.ill], norms[:, self.ill] = d.sum(2), torch.linalg.vector_norm(d, dim=2)
        # (B, C) per-image sums come back to the CPU accumulators (no-ops on the CPU).
        s1, sq = s1.double().cpu(), norms.double().cpu().square()
        self.count.index_add_(0, labels, torch.full((b,), float(n), dtype=torch.float64))
        self.s1.index_add_(0, labels, s1)
        self.s2.index_add_(0, labels, sq)
        # n x each image's own spatial variance (shift-invariant: the shifted channels need no correction)
        self.within.index_add_(0, labels, (sq - s1.square() / n).clamp_min_(0.0))

    def result(self) -> LayerStats:
        if (self.count == 0).any():
            missing = torch.nonzero(self.count == 0).flatten().tolist()
            raise ValueError(f"no images of class(es) {missing[:5]} were seen")
        shift = self.shift.double().cpu()
        s_plain = shift.clone()  # the shift still to apply: none on the channels summed shifted
        s_plain[self.ill.cpu()] = 0.0
        n = self.count[:, None]
        s1 = self.s1 - n * s_plain
        s2 = self.s2 - 2 * s_plain * self.s1 + n * s_plain.square()

        def moments(count, s1, s2):
            m = s1 / count[..., None]  # mean of the shifted values
            return m + shift, (s2 / count[..., None] - m.square()).clamp_min(0.0)

        class_mean, class_var = moments(self.count, s1, s2)
        mean, var = moments(self.count.sum(0), s1.sum(0), s2.sum(0))
        return LayerStats(mean, var, class_mean, class_var, self.count.clone(), self.within / self.count[:, None])


@torch.no_grad()
def collect_bn_stats(model: nn.Module, images, labels: torch.Tensor | None, num_classes: int,
                     *, batch_size: int = 500, desc: str = "stats",
                     aug: SynthAugParams | None = None, draws: int = 1,
                     seed: int = 0) -> dict[str, LayerStats]:
    """One eval-mode pass over (images, labels) tensors, or over ``images`` = a split read batch by
    batch (:class:`edc.data.SplitView`, ``labels`` None); returns {layer name: LayerStats} in model order.

    With ``aug`` (a ``synth.aug`` section) every batch is seen ``draws`` times, each time through a fresh
    draw of synthesis's views (:func:`edc.synth_views.sample_view`: random-resized-crop + flip, or the
    jitter, from a generator seeded with ``seed``): the statistics
    of the views synthesis shows the observers, so that real images are at the matching loss's minimum."""
    source = as_split(images, labels)
    layers = bn_layers(model)
    if not layers:
        raise ArtifactError(f"{desc}: the model has no BatchNorm layers, so it has no statistics to match")
    accs: dict[str, _Accumulator] = {}
    current: dict[str, torch.Tensor] = {}

    def hook_for(name: str, bn: nn.Module):
        def hook(_module, inputs):
            x = inputs[0]
            if name not in accs:
                accs[name] = _Accumulator(num_classes, x.shape[1])
            accs[name].add(x, current["labels"])
        return hook

    handles = [m.register_forward_pre_hook(hook_for(n, m)) for n, m in layers]
    dev = model_device(model)
    was_training = model.training
    model.eval()
    try:
        total = -(-len(source) // batch_size)
        gen = torch.Generator().manual_seed(seed)
        for xb, yb in progress(source.batches(batch_size), total=total, desc=desc, unit="batch"):
            current["labels"] = yb
            if aug is None:
                model(xb.to(dev))
                continue
            for _ in range(draws):
                model(apply_view(xb, sample_view(len(xb), aug, gen)).to(dev))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    try:
        return {n: accs[n].result() for n, _ in layers if n in accs}
    except ValueError as exc:
        raise ArtifactError(f"{desc}: {exc}") from None


def save_stats(path: str | Path, stats: dict[str, LayerStats], metadata: dict) -> None:
    tensors = {f"{layer}.{k}": getattr(s, k).contiguous() for layer, s in stats.items() for k in STAT_NAMES}
    save_safetensors(path, tensors, {**metadata, "format": FORMAT, "layers": list(stats)})


def read_stats_metadata(path: str | Path) -> dict:
    try:
        return read_safetensors_metadata(path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise ArtifactError(f"{path}: unreadable statistics file ({exc})") from None


def load_stats(path: str | Path) -> tuple[dict[str, LayerStats], dict]:
    """Read a statistics file: ({layer: LayerStats} in model order, metadata)."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: statistics file not found; run the collect_stats stage")
    meta = read_stats_metadata(path)
    if meta.get("format") != FORMAT:
        raise ArtifactError(f"{path}: format {meta.get('format')!r}, this version reads {FORMAT!r}")
    tensors = load_file(str(path))
    out = {}
    for layer in meta["layers"]:
        try:
            out[layer] = LayerStats(*(tensors[f"{layer}.{k}"] for k in STAT_NAMES))
        except KeyError as exc:
            raise ArtifactError(f"{path}: missing tensor {exc.args[0]}") from None
    return out, meta
