"""The synthesis matching loss written the obvious way: the reference for :mod:`edc.synth`.

edc/synth.py computes the loss of its module docstring fused (each image's moments inside the
BatchNorm layers, every layer's channels at once, a hand-written backward). This module computes
the same loss as the formulas read, from the inputs of the model's own BatchNorm layers, with a
loop over classes and autograd for the gradient. It is slower and never runs in the pipeline;
tests/test_synth.py checks the fused loss and its gradient to the pixels against it. Per layer l
with input a (B, C, H, W), labels y and targets t (an :class:`edc.synth.Target`):

    match_l = alpha * (|mean(a) - t.mean| + |var(a) - t.var|)
            + (1 - alpha) * sum_c p(c) * (|mean(a_c) - t.class_mean[c]| + |var(a_c) - t.class_var[c]|)

with mean and population variance per channel over (images, H, W), a_c the images of class c,
p(c) their share of the batch and |.| the L2 norm over channels. With ``class_var="within"`` the
per-class variance is the mean over the class's images of each image's spatial variance, against
``t.class_within_var``. The loss of an observer is sum_l w_l * match_l (divided by the number of
layers for ``layers="mean"``).
"""

from __future__ import annotations

import torch
from torch import nn


def moments(a: torch.Tensor, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per channel, the mean and population variance of ``a`` (B, C, ...) over the images that the
    boolean ``images`` (B,) selects and over every spatial position."""
    values = a[images].transpose(0, 1).reshape(a.shape[1], -1)
    return values.mean(1), values.var(1, unbiased=False)


def layer_matching(a: torch.Tensor, y: torch.Tensor, target, alpha: float, class_var: str = "pooled"
                   ) -> torch.Tensor:
    """One layer's match_l (module doc), in the dtype of ``a``."""
    t = [None if v is None else v.to(a.dtype) for v in
         (target.mean, target.var, target.class_mean, target.class_var, target.class_within_var)]
    t_mean, t_var, t_class_mean, t_class_var, t_class_within_var = t
    mean, var = moments(a, torch.ones_like(y, dtype=torch.bool))
    global_term = torch.linalg.norm(mean - t_mean) + torch.linalg.norm(var - t_var)
    class_term = a.new_zeros(())
    for c in range(t_class_mean.shape[0]):
        of_c = y == c
        if not of_c.any():
            continue  # p(c) = 0
        mean_c, var_c = moments(a, of_c)
        if class_var == "within":  # each image's own spatial variance, averaged over the class
            var_diff = a[of_c].flatten(2).var(2, unbiased=False).mean(0) - t_class_within_var[c]
        else:
            var_diff = var_c - t_class_var[c]
        share = of_c.to(a.dtype).mean()
        class_term = class_term + share * (torch.linalg.norm(mean_c - t_class_mean[c]) + torch.linalg.norm(var_diff))
    return alpha * global_term + (1 - alpha) * class_term


def bn_inputs(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``model(x)`` and the input of each of its BatchNorm layers in the order they ran, with their
    autograd graphs (hooks, removed afterwards)."""
    inputs: list[torch.Tensor] = []
    hooks = [m.register_forward_pre_hook(lambda _m, args: inputs.append(args[0])) for m in model.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    try:
        logits = model(x)
    finally:
        for h in hooks:
            h.remove()
    return logits, inputs


def matching(inputs: list[torch.Tensor], y: torch.Tensor, targets: list, alpha: float, *, layers: str = "sum",
             class_var: str = "pooled", layer_weights: list[float] | None = None) -> torch.Tensor:
    """An observer's matching loss: sum_l w_l * :func:`layer_matching` over the layers' ``inputs`` and
    ``targets`` (w all 1 when None), divided by the number of layers for ``layers="mean"``."""
    weights = layer_weights or [1.0] * len(inputs)
    total = sum(w * layer_matching(a, y, t, alpha, class_var) for w, a, t in zip(weights, inputs, targets))
    return total / len(inputs) if layers == "mean" else total
