"""EDC synthesis: soft category-aware statistics matching, cross-entropy and flatness regularisation.

For a synthetic batch X with labels y and an observer phi, per BatchNorm layer l with input a_l:

    match_l = alpha * (|mu_l(a) - mu_l| + |var_l(a) - var_l|)                          (Form 1)
            + (1 - alpha) * sum_c p(c) * (|mu_lc(a) - mu_lc| + |var_lc(a) - var_lc|)  (Form 2)

with |.| the L2 norm over channels, mu/var the mean and population variance over (images, H, W)
(globally, and over the images of class c), targets from ``collect_stats``, and p(c) the share of
class c in the batch (paper Eq. 5, with the brackets DESIGN.md gives). The step minimises

    ce_weight * CE(phi(A(X)), y) + r_bn * sum_l match_l + w_fr * L_FR

where L_FR is Eq. 7, ``KL(softmax(phi(A(X))/tau) || softmax(phi(A(X_ema))/tau))`` (mode "logits"),
or Eq. 6, the matching loss of A(X) against the batch statistics of A(X_ema) (mode "stats"). A is a
random-resized-crop + flip drawn per image, applied identically to X and X_ema; X_ema is updated
after every step as ``beta * X_ema + (1 - beta) * X`` and never receives a gradient. One observer per
iteration, round-robin; Adam (betas 0.5, 0.9) on the pixels with cosine decay; pixels clipped to
the valid range after every step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from edc.errors import EdcError
from edc.runtime import model_device, progress
from edc.schedules import lr_lambda
from edc.stats import LayerStats, bn_layers


class SynthesisError(EdcError):
    """Synthesis diverged (a loss became NaN or infinite)."""


@dataclass(frozen=True)
class Target:
    """Statistics of one BatchNorm layer's input, float32: (C,), (C,), (K, C), (K, C)."""

    mean: torch.Tensor
    var: torch.Tensor
    class_mean: torch.Tensor
    class_var: torch.Tensor

    @classmethod
    def from_stats(cls, s: LayerStats, device: torch.device | None = None) -> Target:
        return cls(*(t.float().to(device) for t in (s.mean, s.var, s.class_mean, s.class_var)))


class _SquareMean(torch.autograd.Function):
    """(B, C, S) -> (B, C): mean of squares over S. Forward as a batched dot product (einsum), backward
    as one elementwise product: measured 3x faster forward+backward than ``square().mean(2)`` and 8x
    faster than the einsum's own backward (a batch of tiny matrix products)."""

    @staticmethod
    def forward(ctx, flat: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(flat)
        return torch.einsum("bcs,bcs->bc", flat, flat) / flat.shape[2]

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (flat,) = ctx.saved_tensors
        return flat * (grad * (2.0 / flat.shape[2]))[:, :, None]


def batch_moments(a: torch.Tensor, onehot: torch.Tensor, shift: torch.Tensor | None = None) -> Target:
    """Mean and population variance of ``a`` (B, C, ...) over (images, spatial), globally and per class
    (``onehot`` (B, K)); classes absent from the batch get zeros. No loop over classes.

    One pass over the activations: each image's channel means of (a - s) and (a - s)^2, then
    var = E[(a - s)^2] - (E[a] - s)^2 per group. ``shift`` (C,) should be close to the channel means
    (synthesis passes the target means) so that the subtraction does not cancel digits."""
    b, c = a.shape[:2]
    flat = a.reshape(b, c, -1)
    if shift is not None:
        flat = flat - shift.detach()[None, :, None]
    img_mean = flat.mean(2)  # (B, C)
    img_sq = _SquareMean.apply(flat)  # (B, C): E[(a - s)^2] per image
    mean = img_mean.mean(0)
    var = (img_sq.mean(0) - mean.square()).clamp_min(0)
    counts = onehot.sum(0).clamp_min(1.0)[:, None]  # (K, 1)
    class_mean = onehot.T @ img_mean / counts
    class_var = (onehot.T @ img_sq / counts - class_mean.square()).clamp_min(0)
    if shift is not None:
        s = shift.detach()
        mean = mean + s
        class_mean = class_mean + s[None, :] * (onehot.sum(0) > 0)[:, None]
    return Target(mean, var, class_mean, class_var)


def matching_loss(a: torch.Tensor, y: torch.Tensor, target: Target, alpha: float) -> torch.Tensor:
    """Soft category-aware matching loss of one layer's input ``a`` against ``target`` (module doc)."""
    k = target.class_mean.shape[0]
    onehot = F.one_hot(y, k).to(a.dtype)
    got = batch_moments(a, onehot, target.mean)
    loss = a.new_zeros(())
    if alpha > 0:
        loss = loss + alpha * (torch.linalg.vector_norm(got.mean - target.mean)
                               + torch.linalg.vector_norm(got.var - target.var))
    if alpha < 1:
        p = onehot.mean(0)  # share of each class in the batch; 0 for absent classes
        per_class = (torch.linalg.vector_norm(got.class_mean - target.class_mean, dim=1)
                     + torch.linalg.vector_norm(got.class_var - target.class_var, dim=1))
        loss = loss + (1 - alpha) * (p * per_class).sum()
    return loss


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


# --- augmentation: per-image random resized crop + flip, differentiable, one call for the batch ----

@dataclass(frozen=True)
class CropFlip:
    scale_w: torch.Tensor  # (B,) crop width as a fraction of the image width
    scale_h: torch.Tensor
    center_x: torch.Tensor  # (B,) crop centre in [-1, 1] coordinates
    center_y: torch.Tensor
    flip: torch.Tensor  # (B,) bool


def sample_crop_flip(b: int, scale_min: float, flip: bool, gen: torch.Generator,
                     ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> CropFlip:
    """RandomResizedCrop's distribution (area fraction in [scale_min, 1], log-uniform aspect ratio),
    with sides clamped to the image instead of retried."""
    area = scale_min + (1 - scale_min) * torch.rand(b, generator=gen)
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * torch.rand(b, generator=gen)
    r = log_r.exp()
    sw, sh = (area * r).sqrt().clamp(max=1.0), (area / r).sqrt().clamp(max=1.0)
    cx = (torch.rand(b, generator=gen) * 2 - 1) * (1 - sw)
    cy = (torch.rand(b, generator=gen) * 2 - 1) * (1 - sh)
    fl = torch.rand(b, generator=gen) < 0.5 if flip else torch.zeros(b, dtype=torch.bool)
    return CropFlip(sw, sh, cx, cy, fl)


def apply_crop_flip(x: torch.Tensor, t: CropFlip) -> torch.Tensor:
    """Crop each image's box and resize it back to the full size (bilinear), flipping where drawn."""
    theta = torch.zeros(len(x), 2, 3, dtype=x.dtype)
    theta[:, 0, 0] = torch.where(t.flip, -t.scale_w, t.scale_w)
    theta[:, 0, 2] = t.center_x
    theta[:, 1, 1] = t.scale_h
    theta[:, 1, 2] = t.center_y
    theta = theta.to(x.device)  # drawn on the CPU generator: the same draws on any device
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


# --- the optimisation loop -------------------------------------------------------------------------

class Observer:
    """An observer model with taps on its BatchNorm inputs and the matching targets for each."""

    def __init__(self, name: str, model: nn.Module, stats: dict[str, LayerStats]):
        self.name, self.model = name, model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        modules = dict(bn_layers(model))
        missing = [layer for layer in stats if layer not in modules]
        if missing:
            raise EdcError(f"observer {name}: statistics name layers it does not have ({missing[:3]})")
        dev = model_device(model)
        self.targets = [Target.from_stats(s, dev) for s in stats.values()]
        self._inputs: list[torch.Tensor] | None = None
        for layer in stats:
            modules[layer].register_forward_pre_hook(self._tap)

    def _tap(self, _module, inputs) -> None:
        if self._inputs is not None:
            self._inputs.append(inputs[0])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits and the inputs of the matched BatchNorm layers, in the statistics' order."""
        self._inputs = []
        try:
            logits = self.model(x)
            inputs = self._inputs
        finally:
            self._inputs = None
        if len(inputs) != len(self.targets):
            raise EdcError(f"observer {self.name}: {len(inputs)} BatchNorm calls for {len(self.targets)} targets")
        return logits, inputs

    def matching(self, inputs: list[torch.Tensor], y: torch.Tensor, alpha: float,
                 targets: list[Target] | None = None) -> torch.Tensor:
        return sum(matching_loss(a, y, t, alpha) for a, t in zip(inputs, targets or self.targets))


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


@torch.no_grad()
def matching_report(images: torch.Tensor, labels: torch.Tensor, observers: list[Observer], alpha: float,
                    batches: list[torch.Tensor], aug=None, draws: int = 8, seed: int = 0) -> dict[str, float]:
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
                    x = apply_crop_flip(x, sample_crop_flip(len(x), aug.scale_min, aug.flip, gen))
                _, inputs = obs.forward(x)
                total += float(obs.matching(inputs, labels[idx], alpha)) * len(idx)
        out[obs.name] = total / len(labels) / (draws if aug is not None else 1)
    return out


def synthesize(images: torch.Tensor, labels: torch.Tensor, observers: list[Observer], cfg, alpha: float,
               bounds: tuple[torch.Tensor, torch.Tensor], seed_for: Callable[[int], int],
               log: Callable[[dict], None] | None = None, ckpt=None, only: list[int] | None = None) -> torch.Tensor:
    """Optimise ``images`` (normalised, (N, C, H, W)) batch by batch; returns the synthesized images.

    ``cfg`` is the ``synth`` params section; ``seed_for(batch_index)`` seeds each batch's augmentation,
    so a batch's result does not depend on which other batches run (or on which process runs them).
    ``log`` receives one row per iteration. ``ckpt`` (an :class:`edc.resume.Checkpointer`) saves the
    whole optimisation state now and then and resumes from it: the result is the same bytes.
    ``only`` lists the batch indices to run (the others keep their initial images): how several
    processes share the work."""
    lo, hi = (t.to(images.device) for t in bounds)
    batches = partition(labels.cpu(), None if cfg.batch_size == "all" else cfg.batch_size)
    out = images.clone()
    fr = cfg.flatness
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
    for b, idx in enumerate(batches):
        if b < start_b or (only is not None and b not in only):
            continue
        gen = torch.Generator().manual_seed(seed_for(b))
        x = images[idx].clone().requires_grad_(True)
        y = labels[idx]
        x_ema = x.detach().clone()
        opt = torch.optim.Adam([x], lr=cfg.lr, betas=(0.5, 0.9))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.lr_schedule, cfg.iterations))
        it0 = 0
        if state is not None and b == start_b and state["it"] > 0:
            with torch.no_grad():
                x.copy_(state["x"])
                x_ema.copy_(state["x_ema"])
            opt.load_state_dict(state["opt"])
            sched.load_state_dict(state["sched"])
            gen.set_state(state["gen"])
            it0 = state["it"]
        use_ema = fr.mode != "off" and fr.weight > 0
        onehot = F.one_hot(y, observers[0].targets[0].class_mean.shape[0]).float()

        def snapshot(next_it: int, b=b, x=x, x_ema=x_ema, opt=opt, sched=sched, gen=gen) -> dict:
            return {"out": out, "batch": b, "it": next_it, "rows": history, "x": x.detach(), "x_ema": x_ema,
                    "opt": opt.state_dict(), "sched": sched.state_dict(), "gen": gen.get_state()}

        bar = progress(range(it0, cfg.iterations), desc=f"synthesize batch {b + 1}/{len(batches)}", unit="it")
        for it in bar:
            obs = observers[it % len(observers)]
            aug = sample_crop_flip(len(x), cfg.aug.scale_min, cfg.aug.flip, gen)
            if use_ema:
                with torch.no_grad():
                    logits_ema, inputs_ema = obs.forward(apply_crop_flip(x_ema, aug))
            logits, inputs = obs.forward(apply_crop_flip(x, aug))
            ce = F.cross_entropy(logits, y)
            bn = obs.matching(inputs, y, alpha)
            flat = x.new_zeros(())
            if use_ema and fr.mode == "logits":
                flat = flatness_kl(logits, logits_ema, fr.tau)
            elif use_ema and fr.mode == "stats":
                ema_targets = [batch_moments(a, onehot) for a in inputs_ema]
                flat = obs.matching(inputs, y, alpha, ema_targets)
            total = cfg.ce_weight * ce + cfg.r_bn * bn + fr.weight * flat
            if not torch.isfinite(total):
                raise SynthesisError(f"synthesize: loss became {float(total.detach())} at batch {b}, iteration {it} "
                                     f"(observer {obs.name}; ce {float(ce)}, bn {float(bn)}, flat {float(flat)}); "
                                     f"lower synth.lr or synth.r_bn")
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
            lr = opt.param_groups[0]["lr"]
            sched.step()
            with torch.no_grad():
                x.clamp_(lo, hi)
            ema_update(x_ema, x, fr.beta)
            row = {"step": b * cfg.iterations + it, "batch": b, "iteration": it, "observer": obs.name, "lr": lr,
                   **{k: v.item() for k, v in (("ce", ce), ("bn", bn), ("flat", flat), ("total", total))}}
            history.append(row)
            if log is not None:
                log(row)
            if ckpt is not None:
                ckpt.maybe_save(lambda it=it: snapshot(it + 1))
        out[idx] = x.detach()
    return out
