"""Inference copies of a model: frozen, BatchNorm folded into the convolutions, activations fused.

For forward passes without gradient (teachers' soft labels, the flatness term's EMA images): the
same function as the model up to rounding, with fewer passes over the activations.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights


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
