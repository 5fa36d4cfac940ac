"""Models by name.

``mj`` is the small convolutional network of the LSUV write-up this project follows; it is
the default model and the one the shipped checkpoint initializes. Every model is built with
PyTorch's default initialization under a given seed, without touching the global RNG.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from .errors import ModelError

__all__ = ["MJ", "MODELS", "ModelSpec", "build_model", "mj"]


class MJ(nn.Module):
    """Four 3x3/5x5 convolutions with ReLU, global average pooling and a linear classifier.

    Shapes for a 28x28 input: conv1 (8, 13, 13), conv2 (16, 15, 15), conv3 (32, 17, 17),
    conv4 (32, 19, 19), pool (32,), l1 (num_classes,).
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 8, kernel_size=5, stride=2, padding=1)
        self.conv2 = nn.Conv2d(8, 16, kernel_size=3, stride=1, padding=2)
        self.conv3 = nn.Conv2d(16, 32, kernel_size=3, stride=1, padding=2)
        self.conv4 = nn.Conv2d(32, 32, kernel_size=3, stride=1, padding=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.l1 = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.relu(self.conv3(x))
        x = F.relu(self.conv4(x))
        x = self.pool(x).flatten(1)
        return self.l1(x)


def mj(in_channels: int = 1, num_classes: int = 10) -> MJ:
    """Return the MJ network (PyTorch default init, drawn from the global RNG)."""
    return MJ(in_channels=in_channels, num_classes=num_classes)


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """How to build a model: a name of :data:`MODELS` and keyword arguments."""

    name: str = "mj"
    kwargs: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"name": self.name, "kwargs": dict(self.kwargs)}

    @classmethod
    def from_dict(cls, d: dict) -> ModelSpec:
        return cls(name=d["name"], kwargs=dict(d.get("kwargs", {})))


#: Model name -> factory(in_channels, num_classes, **kwargs).
MODELS: dict[str, Callable[..., nn.Module]] = {"mj": mj}


def build_model(
    spec: ModelSpec, *, seed: int, in_channels: int = 1, num_classes: int = 10
) -> nn.Module:
    """Build ``spec`` with its default init drawn under ``seed``; the global RNG is restored.

    Raises:
        ModelError: Unknown name, or the factory failed.
    """
    factory = MODELS.get(spec.name)
    if factory is None:
        raise ModelError(f"unknown model {spec.name!r}; choose one of: {', '.join(sorted(MODELS))}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            model = factory(in_channels=in_channels, num_classes=num_classes, **spec.kwargs)
        except Exception as exc:
            raise ModelError(
                f"building model {spec.name!r} failed: {type(exc).__name__}: {exc}"
            ) from None
    if not isinstance(model, nn.Module):
        raise ModelError(
            f"model {spec.name!r} factory returned {type(model).__name__}, not a Module"
        )
    return model
