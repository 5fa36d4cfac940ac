"""Which weights a run leaves as they are, and why: nothing is left unnamed.

Every module with weights of its own that is not a solved layer is named with its reason
(:func:`weights_not_solved`): conv / linear layers the forward never reaches, attention
that is never called, recurrent layers, embeddings, other parameters. Normalization layers
(:data:`NORMS`) are the only weights not listed. A layer whose weight is all zero at init
is left too (:data:`ZERO_INIT`).
"""

from __future__ import annotations

from collections.abc import Collection

import torch
from torch import nn

from .attention import PROJECTIONS

__all__ = ["NORMS", "TARGET_TYPES", "ZERO_INIT", "all_zero", "weights_not_solved"]

#: The layers LSUV solves (and attention's projections, see ``attention.py``).
TARGET_TYPES: tuple[type[nn.Module], ...] = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.Linear,
)

#: Normalization layers: their affine weights start at 1 and 0 and are not LSUV targets;
#: they are the only weights a run does not name (see :func:`weights_not_solved`).
NORMS: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
    nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.LocalResponseNorm,
)  # fmt: skip

#: Weight-bearing modules that are not solved, and why.
_OTHERS: tuple[tuple[tuple[type[nn.Module], ...], str], ...] = (
    ((nn.MultiheadAttention,),
     "attention the eval-mode forward never calls (or calls with static keys / values): "
     "its projections are not reached"),
    ((nn.RNNBase,), "a recurrent layer (RNN / LSTM / GRU): not an LSUV target here"),
    ((nn.Embedding, nn.EmbeddingBag), "an embedding: a table lookup, not a sum to rescale"),
)  # fmt: skip

#: Why an attention module whose projections are solved is still named.
_EXTRA_KV = (
    "its bias_k / bias_v (key / value rows appended to the sequence) are parameters, not "
    "projection outputs: left as they are (its projections are solved)"
)


def weights_not_solved(model: nn.Module, reached: Collection[str]) -> list[tuple[str, str, str]]:
    """Every module with weights of its own that is not a traced target layer, as
    ``(name, kind, reason)`` in registration order: conv / linear layers the eval-mode
    forward never reaches (an auxiliary head, a weight its parent uses in another form),
    attention the forward never calls, recurrent layers, embeddings, and any other module
    holding parameters (a class token, a layer scale). Normalization layers (:data:`NORMS`)
    and attention whose projections are solved are not listed."""
    out = []
    for name, module in model.named_modules():
        if name in reached or isinstance(module, NORMS) or "parametrizations" in name.split("."):
            continue  # a parametrization's tensors belong to the layer that holds it
        if not any(p is not None for p in module._parameters.values()):
            continue
        kind = type(module).__name__
        if isinstance(module, nn.MultiheadAttention) and all(
            (f"{name}.{p}" if name else p) in reached for p in PROJECTIONS
        ):
            if module.bias_k is not None:
                out.append((name, kind, _EXTRA_KV))
            continue
        if isinstance(module, TARGET_TYPES):
            why = ("never reached in an eval-mode forward, as a module or through F.linear "
                   "with its own weight and bias (an auxiliary head, a branch the forward "
                   "skips, or a weight its parent uses in another form)")  # fmt: skip
        else:
            why = next((r for types, r in _OTHERS if isinstance(module, types)),
                       f"{kind} holds weights but is not a conv / linear layer")  # fmt: skip
        out.append((name, kind, why))
    return out


#: Why a layer whose weight is all zero at init is left as it is. A zero-initialized head
#: or residual branch (torchvision's ViT head, "zero-init residual" ResNets) is the
#: model's own choice, and scaling zero cannot give unit std; the orthogonal pre-init
#: (LSUV's step I, ``--orthogonal``) draws new weights for every layer and solves it too.
ZERO_INIT = (
    "its weight is all zero at init (a zero-initialized head or residual branch): left "
    "as the model sets it; --orthogonal re-initializes every layer and solves it"
)


def all_zero(module: nn.Module) -> bool:
    with torch.no_grad():
        return bool(torch.count_nonzero(module.weight) == 0)
