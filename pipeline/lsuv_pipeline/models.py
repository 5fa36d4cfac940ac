"""Models by name.

- ``mj``: the small convolutional network of the LSUV write-up this project follows; the
  default model, and the one the shipped checkpoint initializes.
- Any torchvision classification model by name (``resnet18``, ``vgg11_bn``,
  ``mobilenet_v3_small``, ``efficientnet_b0``, ...), untrained, built for the dataset's
  number of classes, with its first convolution rebuilt for the dataset's input channels.
- ``timm:NAME``: any timm model by name (``timm:resnet50``, ``timm:vit_tiny_patch16_224``,
  ...), untrained, built by ``timm.create_model`` for the dataset's input channels and
  classes; timm is an optional extra (``pip install lsuv-pipeline[timm]``).
- ``package.module:factory``: a callable of the user's, called with ``--model-kwargs``.

Every model is built with its own default initialization drawn under a given seed, without
touching the global RNG.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from .errors import ModelError, UnknownModel

__all__ = [
    "MJ",
    "MODELS",
    "ModelSpec",
    "assign_state_",
    "build_model",
    "describe_model",
    "mj",
    "resolve_factory",
    "timm_factory",
    "torchvision_models",
    "unwrap",
]


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
    """How to build a model: a name (see :func:`resolve_factory`) and keyword arguments."""

    name: str = "mj"
    kwargs: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"name": self.name, "kwargs": dict(self.kwargs)}

    @classmethod
    def from_dict(cls, d: dict) -> ModelSpec:
        return cls(name=d["name"], kwargs=dict(d.get("kwargs", {})))


#: Model name -> factory(in_channels, num_classes, **kwargs).
MODELS: dict[str, Callable[..., nn.Module]] = {"mj": mj}

#: Names that start with this are timm models (checked before ``package.module:factory``).
TIMM_PREFIX = "timm:"


def torchvision_models() -> list[str]:
    """Names of torchvision's classification models."""
    from torchvision import models

    return models.list_models(module=models)


def _first_conv(model: nn.Module) -> tuple[str, nn.Conv2d] | None:
    return next(((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)


def _adapt_input_channels(model: nn.Module, in_channels: int) -> nn.Module:
    """Rebuild the first convolution (the stem) for ``in_channels`` input channels."""
    found = _first_conv(model)
    if found is None or found[1].in_channels == in_channels:
        return model
    name, conv = found
    if conv.groups != 1:
        raise ModelError(
            f"cannot adapt grouped stem convolution {name!r} to {in_channels} channels"
        )
    stem = nn.Conv2d(
        in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
    )
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, stem)
    return model


def _torchvision(name: str) -> Callable[..., nn.Module]:
    def factory(in_channels: int, num_classes: int, **kwargs) -> nn.Module:
        from torchvision import models

        model = models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
        return _adapt_input_channels(model, in_channels)

    return factory


def timm_factory(name: str) -> Callable[..., nn.Module]:
    """Resolve ``timm:NAME`` to a factory calling ``timm.create_model`` (untrained).

    Raises:
        ModelError: timm is not installed.
        UnknownModel: No name after ``timm:``, or timm has no model of that name.
    """
    arch = name.removeprefix(TIMM_PREFIX)
    if not arch:
        raise UnknownModel(f"--model {name!r}: expected timm:NAME (e.g. timm:resnet50)")
    try:
        import timm  # optional: only ``timm:`` names need it
    except ImportError:
        raise ModelError(f"--model {name!r} needs timm: pip install timm") from None
    if not timm.is_model(arch):
        raise UnknownModel(
            f"unknown timm model {arch!r} (--model {name!r}); timm.list_models() names them"
        )

    def factory(in_channels: int, num_classes: int, **kwargs) -> nn.Module:
        return timm.create_model(
            arch, pretrained=False, in_chans=in_channels, num_classes=num_classes, **kwargs
        )

    return factory


def _user_factory(name: str) -> Callable[..., nn.Module]:
    """Resolve ``package.module:factory``; the factory gets only the user's kwargs."""
    module_name, _, attr = name.partition(":")
    if not module_name or not attr:
        raise UnknownModel(f"--model {name!r}: expected package.module:factory")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise ModelError(
            f"--model {name!r}: cannot import {module_name!r} ({type(exc).__name__}: {exc})"
        ) from None
    factory = module
    for part in attr.split("."):
        factory = getattr(factory, part, None)
        if factory is None:
            raise ModelError(f"--model {name!r}: module {module_name!r} has no {attr!r}")
    if not callable(factory):
        raise ModelError(f"--model {name!r}: {attr!r} is not callable")

    def call(in_channels: int, num_classes: int, **kwargs) -> nn.Module:
        return factory(**kwargs)

    return call


def resolve_factory(name: str) -> Callable[..., nn.Module]:
    """Return ``factory(in_channels, num_classes, **kwargs)`` for a model name.

    ``timm:NAME`` is a timm model; any other name with a ``:`` is ``package.module:factory``.

    Raises:
        ModelError: Unknown name, a ``timm:`` name without timm installed, or a
            ``package.module:factory`` that cannot be imported.
    """
    if name in MODELS:
        return MODELS[name]
    if name.startswith(TIMM_PREFIX):
        return timm_factory(name)
    if ":" in name:
        return _user_factory(name)
    if name in torchvision_models():
        return _torchvision(name)
    raise UnknownModel(
        f"unknown model {name!r}; use mj, a torchvision classification model "
        "(resnet18, vgg11_bn, mobilenet_v3_small, efficientnet_b0, ...), timm:NAME "
        "(timm:resnet50, ...) or package.module:factory"
    )


def build_model(
    spec: ModelSpec, *, seed: int, in_channels: int = 1, num_classes: int = 10
) -> nn.Module:
    """Build ``spec`` with its default init drawn under ``seed``; the global RNG is restored.

    Raises:
        ModelError: Unknown name, or the factory failed or returned no module.
    """
    factory = resolve_factory(spec.name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            model = factory(in_channels=in_channels, num_classes=num_classes, **spec.kwargs)
        except ModelError:
            raise
        except Exception as exc:
            raise ModelError(
                f"building model {spec.name!r} failed: {type(exc).__name__}: {exc}"
            ) from None
    if not isinstance(model, nn.Module):
        raise ModelError(
            f"model {spec.name!r}: the factory returned {type(model).__name__}, not an nn.Module"
        )
    return model


def _qualname(obj) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def describe_model(model: nn.Module) -> dict:
    """Return what identifies a model's result: its class, structure and state, as digests.

    ``structure`` hashes the module tree (every submodule's name and class), the model's
    ``repr`` (layer hyperparameters: kernel sizes, strides, ...) and every parameter's and
    buffer's name, shape and dtype. ``initial`` hashes the values of the state dict, so
    another seed or init gives another digest. The code of ``forward`` is identified by the
    classes alone.

    Raises:
        ModelError: ``model`` is not an ``nn.Module``.
    """
    if not isinstance(model, nn.Module):
        raise ModelError(f"the model must be a torch.nn.Module, got {type(model).__name__}")
    state = model.state_dict()
    tree = {
        "modules": [[name, _qualname(m)] for name, m in model.named_modules()],
        "repr": repr(model),
        "state": [[k, list(v.shape), str(v.dtype)] for k, v in state.items()],
    }
    structure = hashlib.sha256(json.dumps(tree).encode())
    initial = hashlib.sha256()
    for name, value in state.items():
        t = value.detach().cpu().contiguous().reshape(-1)
        initial.update(f"{name}:{t.dtype}:{list(value.shape)}:".encode())
        initial.update(t.view(torch.uint8).numpy().tobytes())
    return {
        "class": _qualname(model),
        "structure": "sha256:" + structure.hexdigest(),
        "initial": "sha256:" + initial.hexdigest(),
    }


def unwrap(model: nn.Module) -> nn.Module:
    """Return the module inside ``DataParallel`` / ``DistributedDataParallel`` (``.module``)
    and ``torch.compile`` (``._orig_mod``) wrappers, taken off one by one.

    A wrapper prefixes every parameter name (``module.conv1.weight``,
    ``_orig_mod.conv1.weight``); its inner module has the plain names, and shares its
    tensors with the wrapper, so whatever is written into one is in the other.
    """
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif type(model).__name__ == "OptimizedModule" and isinstance(
            getattr(model, "_orig_mod", None), nn.Module
        ):  # torch._dynamo's class, named rather than imported (importing dynamo is slow)
            model = model._orig_mod
        else:
            return model


def assign_state_(model: nn.Module, state: Mapping[str, torch.Tensor]) -> nn.Module:
    """Copy ``state``'s tensors into ``model``'s own, in place, for the names both have.

    Unlike :meth:`~torch.nn.Module.load_state_dict` this calls no module's load hooks: a
    plain dict of tensors (read from a store, sent to a worker) carries no state-dict
    version, which some modules (torchvision's MNASNet) insist on.
    """
    own = model.state_dict()
    with torch.no_grad():
        for name, value in state.items():
            if name in own:
                own[name].copy_(value)
    return model
