"""Optimizers for the training loops: torch's, without the compiler wrappers, and fused where torch can."""

from __future__ import annotations

import torch


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
