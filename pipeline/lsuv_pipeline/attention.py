"""Layers the forward applies functionally: attention projections and ``F.linear`` calls.

``nn.MultiheadAttention`` never calls its projections as modules: its query, key and value
projections are row blocks of one ``in_proj_weight`` (or three ``*_proj_weight``), and even
its ``out_proj`` Linear is applied inside ``F.multi_head_attention_forward``. Other models
apply a Linear's weight themselves (torchvision's swin: ``F.linear(x, self.qkv.weight,
...)``). Forward hooks see none of these calls, so LSUV could not measure or map them.

Here each query / key / value projection is a :class:`Projection`, a Linear whose weight and
bias are views of the attention module's own parameters (rescaling the view rescales the
rows of ``in_proj_weight``), named ``<attention>.q_proj``, ``.k_proj``, ``.v_proj``
(:func:`get_layer` resolves them). While :func:`functional_calls` is active, a
``TorchFunctionMode`` routes the calls through modules so their hooks run:

- ``F.multi_head_attention_forward`` of a known attention module: its three projections
  run as :class:`Projection` modules, then torch's own function computes the attention from
  the projected values (identity projection weights, which reproduce their input exactly:
  every product but one is a product with 0), and ``out_proj`` runs as a module on the
  result. Masks, causal attention, ``add_bias_kv`` and ``add_zero_attn`` keep torch's own
  semantics.
- ``F.linear(x, m.weight, m.bias)`` of a target Linear ``m`` outside ``m``'s own forward:
  ``m(x)``.

A mode also turns off PyTorch's fused attention fast paths, which would skip all of this;
they compute the same function. Nothing is changed in the model: the projections are
made on the side, and the mode and its hooks are removed on exit.
"""

from __future__ import annotations

import contextlib
import inspect
import weakref
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

__all__ = ["PROJECTIONS", "FunctionalCalls", "Projection", "functional_calls", "get_layer"]

#: The names of an attention module's query, key and value projections.
PROJECTIONS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj")


class Projection(nn.Linear):
    """The query, key or value projection of an ``nn.MultiheadAttention``, as a Linear.

    Its ``weight`` and ``bias`` are views of the attention module's parameters (a row
    block of ``in_proj_weight`` / ``in_proj_bias``, or ``q_proj_weight`` ...), so writing
    them in place changes the attention module; it holds no parameter of its own and only
    a weak reference to its owner.
    """

    def __init__(self, owner: nn.MultiheadAttention, index: int) -> None:
        nn.Module.__init__(self)
        self._owner = weakref.ref(owner)
        self.index = index
        self.out_features = owner.embed_dim
        self.in_features = (owner.embed_dim, owner.kdim, owner.vdim)[index]

    @property
    def owner(self) -> nn.MultiheadAttention:
        owner = self._owner()
        if owner is None:
            raise RuntimeError("the attention module of this projection no longer exists")
        return owner

    @property
    def weight(self) -> torch.Tensor:
        o, e = self.owner, self.out_features
        if o._qkv_same_embed_dim:
            return o.in_proj_weight[self.index * e : (self.index + 1) * e]
        return getattr(o, ("q", "k", "v")[self.index] + "_proj_weight")

    @property
    def bias(self) -> torch.Tensor | None:
        o, e = self.owner, self.out_features
        if o.in_proj_bias is None:
            return None
        return o.in_proj_bias[self.index * e : (self.index + 1) * e]

    def extra_repr(self) -> str:
        return f"{PROJECTIONS[self.index]} of MultiheadAttention, {super().extra_repr()}"


_made: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def projections(attention: nn.MultiheadAttention) -> dict[str, Projection]:
    """The query, key and value :class:`Projection` of ``attention`` (the same objects on
    every call, so hooks registered on them are the ones the routed calls run)."""
    made = _made.get(attention)
    if made is None:
        made = {name: Projection(attention, i) for i, name in enumerate(PROJECTIONS)}
        _made[attention] = made
    return made


def get_layer(model: nn.Module, name: str) -> nn.Module:
    """``model.get_submodule(name)``, or the :class:`Projection` an attention name means.

    Raises:
        AttributeError: No such module or projection.
    """
    parent, _, leaf = name.rpartition(".")
    if leaf in PROJECTIONS:
        owner = model.get_submodule(parent) if parent else model
        if isinstance(owner, nn.MultiheadAttention):
            return projections(owner)[leaf]
    return model.get_submodule(name)


def attention_layers(model: nn.Module) -> dict[nn.Module, str]:
    """Every attention module's projections, by object, with their names."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            for leaf, proj in projections(module).items():
                out[proj] = f"{name}.{leaf}" if name else leaf
    return out


_MHA_SIGNATURE = inspect.signature(F.multi_head_attention_forward)


def _attention_key(module: nn.MultiheadAttention) -> tuple[int, int]:
    """What identifies an attention module in the arguments of its functional call."""
    key = module.in_proj_weight if module._qkv_same_embed_dim else module.q_proj_weight
    return id(key), id(module.out_proj.weight)


class FunctionalCalls(TorchFunctionMode):
    """Routes attention and functional ``F.linear`` calls of a model through modules.

    Attributes:
        routed: Every module this mode called (the layers the forward applies
            functionally).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.attention: dict[tuple[int, int], nn.MultiheadAttention] = {}
        self.linears: dict[int, nn.Linear] = {}
        for module in model.modules():
            if isinstance(module, nn.MultiheadAttention):
                self.attention[_attention_key(module)] = module
            elif isinstance(module, nn.Linear) and isinstance(module.weight, nn.Parameter):
                self.linears[id(module.weight)] = module
        self.active: set[nn.Module] = set()  # Linears inside their own forward
        self.routed: set[nn.Module] = set()
        self._eye: dict[tuple, torch.Tensor] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.multi_head_attention_forward:
            return self._attention(func, args, kwargs)
        if func is F.linear:
            x, weight, bias = (*args, *kwargs.values(), None)[:3]
            module = self.linears.get(id(weight))
            if module is not None and module not in self.active and bias is module.bias:
                self.routed.add(module)
                return module(x)
        return func(*args, **kwargs)

    def _eye_of(self, x: torch.Tensor) -> torch.Tensor:
        key = (x.shape[-1], x.dtype, x.device)
        if key not in self._eye:
            self._eye[key] = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)
        return self._eye[key]

    def _attention(self, func, args, kwargs):
        a = _MHA_SIGNATURE.bind(*args, **kwargs)
        a.apply_defaults()
        a = a.arguments
        key = a["q_proj_weight"] if a["use_separate_proj_weight"] else a["in_proj_weight"]
        module = self.attention.get((id(key), id(a["out_proj_weight"])))
        if module is None or a["static_k"] is not None or a["static_v"] is not None:
            return func(*args, **kwargs)
        proj = projections(module)
        q = proj["q_proj"](a["query"])
        k = proj["k_proj"](a["key"])
        v = proj["v_proj"](a["value"])
        eye = self._eye_of(q)
        a.update(query=q, key=k, value=v, use_separate_proj_weight=True, in_proj_weight=None,
                 in_proj_bias=None, q_proj_weight=eye, k_proj_weight=eye, v_proj_weight=eye,
                 out_proj_weight=eye, out_proj_bias=None)  # fmt: skip
        out, weights = func(**a)
        self.routed.update(proj.values())
        self.routed.add(module.out_proj)
        return module.out_proj(out), weights


@contextlib.contextmanager
def functional_calls(model: nn.Module) -> Iterator[FunctionalCalls]:
    """Route the model's attention and functional Linear calls through modules (see the
    module docstring) until exit; the mode and its hooks are removed even on error."""
    mode = FunctionalCalls(model)
    handles = []

    def enter(module, inputs):
        mode.active.add(module)

    def leave(module, inputs, output):
        mode.active.discard(module)

    try:
        for module in mode.linears.values():
            handles.append(module.register_forward_pre_hook(enter))
            handles.append(module.register_forward_hook(leave, always_call=True))
        with mode:
            yield mode
    finally:
        for h in handles:
            h.remove()
