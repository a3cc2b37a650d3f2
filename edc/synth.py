"""EDC synthesis: soft category-aware statistics matching, cross-entropy and flatness regularisation.

For a synthetic batch X with labels y and an observer phi, per BatchNorm layer l with input a_l:

    match_l = alpha * (|mu_l(a) - mu_l| + |var_l(a) - var_l|)                          (Form 1)
            + (1 - alpha) * sum_c p(c) * (|mu_lc(a) - mu_lc| + |var_lc(a) - var_lc|)  (Form 2)

with |.| the L2 norm over channels, mu/var the mean and population variance over (images, H, W)
(globally, and over the images of class c), targets from ``collect_stats``, and p(c) the share of
class c in the batch (paper Eq. 5; alpha weighs the global term against the per-class one). With ``class_var="within"``
the per-class variance on both sides is instead the mean over the class's images of each image's
spatial variance (the released EDC code's definition): the pooled variance less the spread between
the images' means, which one image per class cannot have. The step minimises

    ce_weight * CE(phi(A(X)), y) + r_bn * sum_l w_l * match_l + w_fr * L_FR

where L_FR is Eq. 7, ``KL(softmax(phi(A(X))/tau) || softmax(phi(A(X_ema))/tau))`` (mode "logits"),
or Eq. 6, the matching loss of A(X) against the batch statistics of A(X_ema) (mode "stats"); w_l is 1
but for the first layer's ``first_layer_weight`` (SRe2L: 10). ``targets="running"`` replaces the global
targets mu_l, var_l by the observer's BatchNorm running estimates (SRe2L). A is a
random-resized-crop + flip drawn per image (or, ``aug.kind: jitter``, one random roll of the batch by
up to ``aug.jitter`` pixels + flip, SRe2L's small-image recover), applied identically to X and X_ema; X_ema is updated
after every step as ``beta * X_ema + (1 - beta) * X`` and never receives a gradient. One observer per
iteration, round-robin; Adam (betas 0.5, 0.9) on the pixels with cosine decay; pixels clipped to
the valid range after every step.

The matching loss below is fused for speed (each image's moments taken inside the BatchNorm layers,
all layers at once, a hand-written backward); :mod:`edc.synth_reference` writes the same loss as the
formulas read, and tests/test_synth.py holds the two equal, value and gradient to the pixels.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from edc.errors import EdcError
from edc.io import atomic_file
from edc.models.inference import inference_copy
from edc.optim import Adam
from edc.params import SynthAugParams, SynthParams
from edc.progress import progress
from edc.resume import run_units
from edc.runtime import model_device
from edc.schedules import lr_lambda
from edc.stats import LayerStats, bn_layers
from edc.synth_views import apply_view, sample_view


class SynthesisError(EdcError):
    """Synthesis diverged (a loss became NaN or infinite)."""


@dataclass(frozen=True)
class Target:
    """Statistics of one BatchNorm layer's input, in the observer's dtype: (C,), (C,), (K, C), (K, C), and
    the per-class mean of each image's spatial variance (K, C) where known."""

    mean: torch.Tensor
    var: torch.Tensor
    class_mean: torch.Tensor
    class_var: torch.Tensor
    class_within_var: torch.Tensor | None = None

    @classmethod
    def from_stats(cls, s: LayerStats, device: torch.device | None = None, dtype: torch.dtype = torch.float32
                   ) -> Target:
        return cls(*(t.to(device, dtype) for t in (s.mean, s.var, s.class_mean, s.class_var, s.class_within_var)))


class _ShiftedMoments(torch.autograd.Function):
    """(B, C, S) activations ``a`` and a shift ``s`` (C,) -> each image's channel means of (a - s) and
    of (a - s)^2, both (B, C). The mean of squares is a squared vector norm (one read of ``a``, where a
    batched dot product makes several); the backward is one fused pass,
    ``g_mean / S + (a - s) * 2 g_sq / S``, where autograd's own makes four (and an einsum's backward
    becomes a batch of tiny matrix products)."""

    @staticmethod
    def forward(ctx, flat: torch.Tensor, shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d, mean, sq = _shifted_moments(flat, shift)
        ctx.save_for_backward(d)
        return mean, sq

    @staticmethod
    def backward(ctx, g_mean: torch.Tensor, g_sq: torch.Tensor) -> tuple[torch.Tensor, None]:
        (d,) = ctx.saved_tensors
        return _moments_grad(d, g_mean, g_sq), None


def _shifted_moments(flat: torch.Tensor, shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(a - s, its per-image channel means, its per-image channel means of squares) for (B, C, S)."""
    d = flat - shift[None, :, None]
    return d, d.mean(2), torch.linalg.vector_norm(d, dim=2).square() / d.shape[2]


def _moments_grad(d: torch.Tensor, g_mean: torch.Tensor, g_sq: torch.Tensor) -> torch.Tensor:
    """The gradient reaching a = d + s through the means and mean squares of d: one fused pass,
    ``d * 2 g_sq / S + g_mean / S`` with one coefficient pair per (image, channel) row."""
    b, c, n = d.shape
    rows = d.reshape(1, b * c, n)
    return channel_affine(rows, (g_sq * (2.0 / n)).reshape(-1), (g_mean / n).reshape(-1)).view(d.shape)


def channel_affine(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x * weight[c] + bias[c]`` along dim 1 of ``x`` (N, C, ...), as a new tensor.

    It runs as an eval-mode ``batch_norm`` with mean 0, variance 1 and eps 0, whose kernel computes
    exactly this; on the CPU it is faster than ``torch.addcmul`` with broadcast (C,) operands, whose
    per-element loop is not vectorised (docs/performance.md).
    With (1, B*C, S) rows it scales each image's channel by its own pair, as the moments' backward needs."""
    c = x.shape[1]
    unit = x.new_ones(c)
    return F.batch_norm(x, x.new_zeros(c), unit, weight, bias, False, 0.0, 0.0)


def image_moments(a: torch.Tensor, shift: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image and channel of ``a`` (B, C, ...): the mean of (a - s) and of (a - s)^2 over the
    spatial positions, (B, C) each (``shift`` s (C,), zero when None; it never receives a gradient)."""
    b, c = a.shape[:2]
    s = a.new_zeros(c) if shift is None else shift.detach().to(a.dtype)
    return _ShiftedMoments.apply(a.reshape(b, c, -1), s)


def group_moments(img_mean: torch.Tensor, img_sq: torch.Tensor, onehot: torch.Tensor,
                  shift: torch.Tensor | None, within: bool = False) -> Target:
    """Mean and population variance over (images, spatial), globally and per class, from each image's
    shifted moments (:func:`image_moments`; equal spatial sizes): var = E[(a - s)^2] - (E[a] - s)^2.
    With ``within``, also each class's mean of its images' own spatial variances (``class_within_var``;
    None otherwise, so the default recipe's step does not pay for it)."""
    mean = img_mean.mean(0)
    var = (img_sq.mean(0) - mean.square()).clamp_min(0)
    present = onehot.sum(0)
    counts = present.clamp_min(1.0)[:, None]  # (K, 1)
    class_mean = onehot.T @ img_mean / counts
    class_var = (onehot.T @ img_sq / counts - class_mean.square()).clamp_min(0)
    class_within_var = None
    if within:  # shift-invariant
        class_within_var = onehot.T @ (img_sq - img_mean.square()).clamp_min(0) / counts
    if shift is not None:
        s = shift.detach()
        mean = mean + s
        class_mean = class_mean + s[None, :] * (present > 0)[:, None]
    return Target(mean, var, class_mean, class_var, class_within_var)


def batch_moments(a: torch.Tensor, onehot: torch.Tensor, shift: torch.Tensor | None = None) -> Target:
    """Mean and population variance of ``a`` (B, C, ...) over (images, spatial), globally and per class
    (``onehot`` (B, K)); classes absent from the batch get zeros. No loop over classes.

    One pass over the activations: each image's channel means of (a - s) and (a - s)^2, then
    var = E[(a - s)^2] - (E[a] - s)^2 per group. ``shift`` (C,) should be close to the channel means
    (synthesis passes the target means) so that the subtraction does not cancel digits."""
    return group_moments(*image_moments(a, shift), onehot, shift)


def matching_loss(a: torch.Tensor, y: torch.Tensor, target: Target, alpha: float) -> torch.Tensor:
    """Soft category-aware matching loss of one layer's input ``a`` against ``target`` (module doc):
    :func:`fused_matching` for one layer."""
    return fused_matching([image_moments(a, target.mean)], y, LayerTargets([target]), alpha)


def flatness_kl(logits: torch.Tensor, logits_ema: torch.Tensor, tau: float) -> torch.Tensor:
    """Eq. 7: KL(softmax(logits/tau) || softmax(logits_ema/tau)), mean over the batch; no gradient
    reaches ``logits_ema``."""
    log_p = F.log_softmax(logits / tau, dim=1)
    log_q = F.log_softmax(logits_ema.detach() / tau, dim=1)
    return (log_p.exp() * (log_p - log_q)).sum(1).mean()


def ema_update(x_ema: torch.Tensor, x: torch.Tensor, beta: float) -> None:
    """In place: x_ema <- beta * x_ema + (1 - beta) * x."""
    with torch.no_grad():
        x_ema.mul_(beta).add_(x.detach(), alpha=1 - beta)


# --- the optimisation loop -------------------------------------------------------------------------

class _BNWithMoments(torch.autograd.Function):
    """An eval-mode BatchNorm, ``a * scale + offset`` per channel, that also returns each image's
    shifted moments of its input ``a`` (as :func:`image_moments`). One Function for both, so that the
    backward is a single gradient for ``a`` (the BatchNorm's and the moments' terms summed in two fused
    passes) instead of BatchNorm's backward, the moments' backward and autograd's sum of the two."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, shift: torch.Tensor):
        b, c = a.shape[0], a.shape[1]
        d, mean, sq = _shifted_moments(a.reshape(b, c, -1), shift)
        ctx.save_for_backward(d, scale)
        return channel_affine(a, scale, offset), mean, sq

    @staticmethod
    def backward(ctx, g_out: torch.Tensor, g_mean: torch.Tensor, g_sq: torch.Tensor):
        d, scale = ctx.saved_tensors
        g = _moments_grad(d, g_mean, g_sq).addcmul_(g_out.reshape(d.shape), scale[:, None])
        return g.view(g_out.shape), None, None, None


class Observer:
    """An observer model whose matched BatchNorm layers also report their inputs' per-image moments
    (shifted by the target means), and the matching targets for each."""

    def __init__(self, name: str, model: nn.Module, stats: dict[str, LayerStats], *, layers: str = "sum",
                 class_var: str = "pooled", first_layer_weight: float = 1.0, targets: str = "data"):
        self.name, self.model, self.layers, self.class_var = name, model.eval(), layers, class_var
        for p in self.model.parameters():
            p.requires_grad_(False)
        modules = dict(bn_layers(model))
        missing = [layer for layer in stats if layer not in modules]
        if missing:
            raise EdcError(f"observer {name}: statistics name layers it does not have ({missing[:3]})")
        dev = model_device(model)
        dtype = next(model.parameters()).dtype  # float32, or float64 for exact checks
        self.targets = [Target.from_stats(s, dev, dtype) for s in stats.values()]
        if targets == "running":
            # SRe2L's global targets: what the observer's BatchNorm layers estimated during
            # training (running_var as PyTorch keeps it), not an exact pass over the data.
            running = [(modules[layer].running_mean, modules[layer].running_var) for layer in stats]
            self.targets = [Target(m.to(dev, dtype), v.to(dev, dtype), t.class_mean, t.class_var, t.class_within_var)
                            for (m, v), t in zip(running, self.targets)]
        self.fused = LayerTargets(self.targets)
        # SRe2L (and the released EDC code) multiply the first hooked layer's term by 10
        self.layer_weight = None
        if first_layer_weight != 1.0:
            self.layer_weight = torch.ones(len(self.targets), device=dev, dtype=dtype)
            self.layer_weight[0] = first_layer_weight
        self._moments: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._folded = inference_copy(self.model)  # before the taps: the copy has the plain layers
        for layer, target in zip(stats, self.targets):
            self._tap(modules[layer], target.mean)

    def _tap(self, bn: nn.Module, shift: torch.Tensor) -> None:
        """While :meth:`forward` collects, ``bn`` runs as :class:`_BNWithMoments` (eval-mode BatchNorm
        with its running statistics; the model is frozen)."""
        plain = bn.forward
        with torch.no_grad():
            inv = (bn.running_var + bn.eps).rsqrt()
            scale = inv * bn.weight if bn.weight is not None else inv
            offset = -bn.running_mean * scale + (bn.bias if bn.bias is not None else 0.0)
        consts = (scale.detach(), offset.detach(), shift.detach().to(scale.dtype))

        def forward(a: torch.Tensor) -> torch.Tensor:
            if self._moments is None:
                return plain(a)
            out, m, q = _BNWithMoments.apply(a, *(consts if a.dtype == scale.dtype else
                                                  (t.to(a.dtype) for t in consts)))
            self._moments.append((m, q))
            return out

        bn.forward = forward

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Logits, and for each matched BatchNorm layer (in the statistics' order) its input's per-image
        moments (:func:`image_moments` shifted by the layer's target means)."""
        self._moments = []
        try:
            logits = self.model(x)
            moments = self._moments
        finally:
            self._moments = None
        if len(moments) != len(self.targets):
            raise EdcError(f"observer {self.name}: {len(moments)} BatchNorm calls for {len(self.targets)} targets")
        return logits, moments

    @torch.no_grad()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The logits alone, without gradient or moments (the flatness term's EMA images): the model
        with each BatchNorm folded into the convolution before it, in channels-last memory format
        (:func:`edc.models.inference.inference_copy`)."""
        return self._folded(x.contiguous(memory_format=torch.channels_last))

    def batch_targets(self, moments: list[tuple[torch.Tensor, torch.Tensor]], y: torch.Tensor) -> list[Target]:
        """The batch's own statistics per layer, from :meth:`forward`'s moments (Eq. 6 targets)."""
        onehot = F.one_hot(y, self.targets[0].class_mean.shape[0]).to(moments[0][0].dtype)
        within = self.class_var == "within"
        return [group_moments(m, q, onehot, t.mean, within) for (m, q), t in zip(moments, self.targets)]

    def matching(self, moments: list[tuple[torch.Tensor, torch.Tensor]], y: torch.Tensor, alpha: float,
                 targets: list[Target] | None = None) -> torch.Tensor:
        """The sum (or mean, ``layers``) over layers of :func:`matching_loss`, computed for all layers at
        once, against the observer's targets or ``targets``."""
        return fused_matching(moments, y, self.fused, alpha, targets=None if targets is None else LayerTargets(targets),
                              layers=self.layers, class_var=self.class_var, layer_weight=self.layer_weight)


class LayerTargets:
    """Several layers' targets side by side: statistics concatenated over the channels, and a (sum C, L)
    0/1 matrix that sums a concatenated vector back to one value per layer."""

    def __init__(self, targets: list[Target]):
        self.sizes = [len(t.mean) for t in targets]
        self.mean = torch.cat([t.mean for t in targets])
        self.var = torch.cat([t.var for t in targets])
        self.class_mean = torch.cat([t.class_mean for t in targets], 1)
        self.class_var = torch.cat([t.class_var for t in targets], 1)
        known = all(t.class_within_var is not None for t in targets)
        self.class_within_var = torch.cat([t.class_within_var for t in targets], 1) if known else None
        layer_of = torch.repeat_interleave(torch.arange(len(targets)), torch.tensor(self.sizes))
        self.segments = F.one_hot(layer_of, len(targets)).to(self.mean)

    def norms(self, diff: torch.Tensor) -> torch.Tensor:
        """(..., sum C) -> (..., L): each layer's L2 norm (gradient 0 at 0, as torch.linalg.vector_norm)."""
        sq = diff.square() @ self.segments
        pos = sq > 0
        return torch.where(pos, sq, torch.ones_like(sq)).sqrt() * pos


def _weighted(per_layer: torch.Tensor, layer_weight: torch.Tensor | None) -> torch.Tensor:
    """(..., L) per-layer terms times the layers' weights (untouched when None: the same bytes as before)."""
    return per_layer if layer_weight is None else per_layer * layer_weight


def fused_matching(moments: list[tuple[torch.Tensor, torch.Tensor]], y: torch.Tensor, shifts: LayerTargets,
                   alpha: float, *, targets: LayerTargets | None = None, layers: str = "sum",
                   class_var: str = "pooled", layer_weight: torch.Tensor | None = None) -> torch.Tensor:
    """sum_l w_l * matching_loss(layer l's input, y, target l, alpha) (``layers="mean"``: divided by the number
    of layers, the paper's Eq. 16; ``layer_weight`` w (L,), all 1 when None), from each layer's per-image moments
    shifted by ``shifts.mean`` (:func:`image_moments`), against ``targets`` (default: ``shifts``);
    ``class_var`` "within" matches the per-class mean of the images' own variances (module doc).
    The groups' moments, the differences and the norms are computed once for all the layers'
    concatenated channels, not once per layer: on a CPU the per-layer version cost more in
    per-operation overhead than in arithmetic."""
    t = shifts if targets is None else targets
    onehot = F.one_hot(y, t.class_mean.shape[0]).to(moments[0][0].dtype)
    got = group_moments(torch.cat([m for m, _ in moments], 1), torch.cat([q for _, q in moments], 1), onehot,
                        shifts.mean, within=class_var == "within")
    loss = moments[0][0].new_zeros(())
    if alpha > 0:
        loss = loss + alpha * _weighted(t.norms(got.mean - t.mean) + t.norms(got.var - t.var), layer_weight).sum()
    if alpha < 1:
        p = onehot.mean(0)  # share of each class in the batch; 0 for absent classes
        if class_var == "within":
            if t.class_within_var is None:
                raise EdcError("synth.class_var: within needs statistics with class_within_var; rerun collect_stats")
            var_diff = got.class_within_var - t.class_within_var
        else:
            var_diff = got.class_var - t.class_var
        per_class = t.norms(got.class_mean - t.class_mean) + t.norms(var_diff)  # (K, L)
        loss = loss + (1 - alpha) * _weighted(p[:, None] * per_class, layer_weight).sum()
    return loss / len(moments) if layers == "mean" else loss


def partition(labels: torch.Tensor, batch_size: int | None) -> list[torch.Tensor]:
    """Fixed batches of indices that interleave the classes (image j of every class, then j+1, ...),
    so each batch holds as even a class mix as its size allows. ``None`` = one batch of everything."""
    k = int(labels.max()) + 1
    rank_in_class = torch.zeros_like(labels)
    for c in range(k):  # bookkeeping on labels only
        idx = torch.nonzero(labels == c).flatten()
        rank_in_class[idx] = torch.arange(len(idx))
    order = torch.argsort(rank_in_class * k + labels, stable=True)
    size = len(labels) if batch_size is None else batch_size
    return list(order.split(size))


def synthesis_batches(labels: torch.Tensor, cfg: SynthParams) -> list[torch.Tensor]:
    """The batches ``synth.batch_size`` asks for (:func:`partition`; "all" = one batch)."""
    return partition(labels.cpu(), None if cfg.batch_size == "all" else cfg.batch_size)


@torch.no_grad()
def matching_report(images: torch.Tensor, labels: torch.Tensor, observers: list[Observer], alpha: float,
                    batches: list[torch.Tensor], *, aug: SynthAugParams | None = None,
                    draws: int = 8, seed: int = 0) -> dict[str, float]:
    """Each observer's matching loss (sum over layers), averaged over the synthesis batches (weighted
    by size). With ``aug`` (the ``synth.aug`` section) it is the mean over ``draws`` crop/flip draws
    from a generator seeded with ``seed`` (the same draws for any images): the quantity synthesis
    minimises. Without, it is the loss of the un-augmented images."""
    out = {}
    for obs in observers:
        gen = torch.Generator().manual_seed(seed)
        total = 0.0
        for _ in range(draws if aug is not None else 1):
            for idx in batches:
                x = images[idx]
                if aug is not None:
                    x = apply_view(x, sample_view(len(x), aug, gen))
                _, moments = obs.forward(x)
                total += float(obs.matching(moments, labels[idx], alpha)) * len(idx)
        out[obs.name] = total / len(labels) / (draws if aug is not None else 1)
    return out


class _BatchOptimisation:
    """One synthesis batch's optimisation state: its pixels X, their EMA, Adam (betas 0.5, 0.9) with its
    LR schedule, and the batch's augmentation generator; saved and restored in one place."""

    def __init__(self, images: torch.Tensor, cfg: SynthParams, seed: int):
        self.gen = torch.Generator().manual_seed(seed)
        self.x = images.clone().requires_grad_(True)
        self.x_ema = self.x.detach().clone()
        self.opt = Adam([self.x], lr=cfg.lr, betas=(0.5, 0.9))
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(cfg.lr_schedule, cfg.iterations))

    def state_dict(self) -> dict:
        return {"x": self.x.detach(), "x_ema": self.x_ema, "opt": self.opt.state_dict(),
                "sched": self.sched.state_dict(), "gen": self.gen.get_state()}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            self.x.copy_(state["x"])
            self.x_ema.copy_(state["x_ema"])
        self.opt.load_state_dict(state["opt"])
        self.sched.load_state_dict(state["sched"])
        self.gen.set_state(state["gen"])


def crops_per_image(y: torch.Tensor, class_views: int) -> int:
    """How many crops of each image one iteration matches: enough that every class in the batch has
    ``class_views`` crops (``synth.class_views``). With one image per class (ipc 1) the class's moments
    of a single crop are those of one view of one image; k crops let its statistics, and the student's
    many views later, see k different parts and scales of it. 1 when the batch holds that many images
    of each class already."""
    counts = torch.bincount(y)
    return max(1, -(-class_views // int(counts[counts > 0].min())))


def synthesis_step(b: _BatchOptimisation, y: torch.Tensor, obs: Observer, cfg: SynthParams, alpha: float,
                   bounds: tuple[torch.Tensor, torch.Tensor], *, at: str = "") -> dict[str, float]:
    """One iteration on a batch (module doc): a crop/flip draw shared by X and its EMA, the loss, Adam,
    the schedule, clipping to ``bounds``, the EMA update. Returns the losses and the step's LR;
    :class:`SynthesisError` (naming ``at``) when the loss is not finite."""
    fr = cfg.flatness
    use_ema = fr.mode != "off" and fr.weight > 0
    views = crops_per_image(y, cfg.class_views)
    x, x_ema = (b.x, b.x_ema) if views == 1 else (b.x.repeat(views, 1, 1, 1), b.x_ema.repeat(views, 1, 1, 1))
    y = y if views == 1 else y.repeat(views)
    aug = sample_view(len(x), cfg.aug, b.gen)
    if use_ema and fr.mode == "logits":
        logits_ema = obs.logits(apply_view(x_ema, aug))
    elif use_ema:
        with torch.no_grad():
            _, inputs_ema = obs.forward(apply_view(x_ema, aug))
    logits, inputs = obs.forward(apply_view(x, aug))
    ce = F.cross_entropy(logits, y)
    bn = obs.matching(inputs, y, alpha)
    flat = b.x.new_zeros(())
    if use_ema and fr.mode == "logits":
        flat = flatness_kl(logits, logits_ema, fr.tau)
    elif use_ema and fr.mode == "stats":
        flat = obs.matching(inputs, y, alpha, obs.batch_targets(inputs_ema, y))
    total = cfg.ce_weight * ce + cfg.r_bn * bn + fr.weight * flat
    losses = {k: v.detach() for k, v in (("ce", ce), ("bn", bn), ("flat", flat), ("total", total))}
    if not torch.isfinite(total):
        raise SynthesisError(f"synthesize: loss became {float(losses['total'])} at {at} (observer {obs.name}; "
                             + ", ".join(f"{k} {float(v)}" for k, v in losses.items() if k != "total")
                             + "); lower synth.lr or synth.r_bn")
    b.opt.zero_grad(set_to_none=True)
    total.backward()
    b.opt.step()
    lr = b.opt.param_groups[0]["lr"]
    b.sched.step()
    with torch.no_grad():
        b.x.clamp_(*bounds)
    ema_update(b.x_ema, b.x, fr.beta)
    return {"lr": lr, **{k: v.item() for k, v in losses.items()}}


def synthesize(images: torch.Tensor, labels: torch.Tensor, observers: list[Observer], cfg: SynthParams, alpha: float,
               bounds: tuple[torch.Tensor, torch.Tensor], *, seed_for: Callable[[int], int],
               log: Callable[[dict], None] | None = None, ckpt=None, only: list[int] | None = None) -> torch.Tensor:
    """Optimise ``images`` (normalised, (N, C, H, W)) batch by batch; returns the synthesized images.

    ``cfg`` is the ``synth`` params section; ``seed_for(batch_index)`` seeds each batch's augmentation,
    so a batch's result does not depend on which other batches run (or on which process runs them).
    ``log`` receives one row per iteration. ``ckpt`` (an :class:`edc.resume.Checkpointer`) saves the
    whole optimisation state now and then and resumes from it: the result is the same bytes.
    ``only`` lists the batch indices to run (the others keep their initial images): how several
    processes share the work."""
    bounds = tuple(t.to(images.device) for t in bounds)
    batches = synthesis_batches(labels, cfg)
    out = images.clone()
    history: list[dict] = []
    state = ckpt.load() if ckpt is not None else None
    start_b = 0
    if state is not None:
        out, start_b, history = state["out"], state["batch"], state["rows"]
        print(f"synthesize: resuming at batch {start_b + 1}/{len(batches)}, iteration {state['it']} "
              f"(checkpoint in {ckpt.dir})", flush=True)
        for row in history:
            if log is not None:
                log(row)
    for bi, idx in enumerate(batches):
        if bi < start_b or (only is not None and bi not in only):
            continue
        b = _BatchOptimisation(images[idx], cfg, seed_for(bi))
        it0 = 0
        if state is not None and bi == start_b and state["it"] > 0:
            b.load_state_dict(state)
            it0 = state["it"]
        for it in progress(range(it0, cfg.iterations), desc=f"synthesize batch {bi + 1}/{len(batches)}", unit="it"):
            obs = observers[it % len(observers)]
            losses = synthesis_step(b, labels[idx], obs, cfg, alpha, bounds, at=f"batch {bi}, iteration {it}")
            row = {"step": bi * cfg.iterations + it, "batch": bi, "iteration": it, "observer": obs.name, **losses}
            history.append(row)
            if log is not None:
                log(row)
            if ckpt is not None:
                ckpt.maybe_save(lambda bi=bi, it=it, b=b: {"out": out, "batch": bi, "it": it + 1, "rows": history,
                                                           **b.state_dict()})
        out[idx] = b.x.detach()
    return out


def synthesize_set(images: torch.Tensor, labels: torch.Tensor, observers: list[Observer], cfg: SynthParams,
                   alpha: float, bounds: tuple[torch.Tensor, torch.Tensor], *, seed_for: Callable[[int], int],
                   world, ckpt, log: Callable[[dict], None]) -> torch.Tensor | None:
    """Every synthesis batch of ``images``. In one process: :func:`synthesize`, resumable within a
    batch. Under torchrun: the batches dealt out to the ranks (:func:`edc.resume.run_units`), each
    finished one kept as a file in ``ckpt``'s directory, so that a rerun after an interruption, with
    any number of ranks, runs only the batches without a file; rank 0 merges them (a batch's result
    depends on its index only). ``log`` gets every iteration's row, in step order. Returns the images
    on rank 0, None on the others."""
    if world.size == 1:
        return synthesize(images, labels, observers, cfg, alpha, bounds, seed_for=seed_for, log=log, ckpt=ckpt)
    batches = synthesis_batches(labels, cfg)

    def part_file(b: int) -> Path:
        return ckpt.dir / f"batch-{b:04d}.pt"

    def work(b: int) -> None:
        rows: list[dict] = []
        result = synthesize(images, labels, observers, cfg, alpha, bounds, seed_for=seed_for, log=rows.append, only=[b])
        with atomic_file(part_file(b), "wb") as f:
            torch.save({"images": result[batches[b]].cpu(), "rows": rows}, f)

    if not run_units(ckpt, world, range(len(batches)), lambda b: part_file(b).is_file(), work, what="batches",
                     stage="synthesize"):
        return None
    result, merged = images.clone(), []
    for b in range(len(batches)):
        part = torch.load(part_file(b), weights_only=True)
        result[batches[b]] = part["images"].to(images.device)
        merged += part["rows"]
    for row in sorted(merged, key=lambda r: r["step"]):
        log(row)
    return result


def before_after(initial: torch.Tensor, final: torch.Tensor, labels: torch.Tensor, observers: list[Observer],
                 alpha: float, cfg: SynthParams, *, seed: int) -> dict[str, dict]:
    """The stage's report, per observer: the matching loss of the initial and of the final images under
    the synthesis augmentation (``matching_*``: seeded draws, what the objective minimises) and
    un-augmented (``plain_*``: views the crops never show the observers, so it need not fall)."""
    batches = synthesis_batches(labels, cfg)

    def measure(imgs):
        return (matching_report(imgs, labels, observers, alpha, batches, aug=cfg.aug, seed=seed),
                matching_report(imgs, labels, observers, alpha, batches))

    (before, plain_before), (after, plain_after) = measure(initial), measure(final)
    return {name: {"matching_initial": round(before[name], 6), "matching_final": round(after[name], 6),
                   "ratio": round(after[name] / before[name], 6) if before[name] else None,
                   "plain_initial": round(plain_before[name], 6), "plain_final": round(plain_after[name], 6)}
            for name in before}
