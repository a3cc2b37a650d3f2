"""Model registry: ``create_model(arch, in_channels=, num_classes=, image_size=, **kwargs)``.

Every architecture here is a small-resolution variant (stride-1 stems, no early max-pool) that works
for any channel count, square image size and class count. Adding an architecture is one decorated
builder function in this package; no stage script changes.
"""

from edc.models import imagenet as _imagenet  # noqa: F401  (registers torchvision's ImageNet models)
from edc.models import zoo as _zoo  # noqa: F401  (registers the architectures)
from edc.models.registry import build, create_model, list_models, model_kwargs, register_model

__all__ = ["build", "create_model", "list_models", "model_kwargs", "register_model"]
