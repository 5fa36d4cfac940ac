"""Model zoo: what the solve does with each model, checked by an independent float64 forward.

::

    python benchmarks/zoo.py --data-root ../shared/data --quick           # 4 models, seconds
    python benchmarks/zoo.py --data-root ../shared/data --models resnet18,swin_t
    python benchmarks/zoo.py --data-root ../shared/data --write           # the whole zoo

Models: every torchvision classification model up to :data:`MAX_PARAMS` parameters (the
larger ones are listed as skipped, with their size), a few timm models, ``mj``, a small
``nn.TransformerEncoder`` classifier and a small GPT-style model on integer tokens. Each is
built under seed 0 for one input channel (torchvision's stem rebuilt as ``models.py`` does,
timm's ``in_chans=1``) and 10 classes, and fed the first ``--samples`` Fashion-MNIST training
images at the smallest size of :data:`SIZES` at which a forward of 2 samples works (ViTs are
built for that size); the token model reads each image as a sequence of quantized pixels.

Per model: parameters, input size, solved / total weight modules (modules with parameters of
their own, normalization layers not counted), the others grouped by the run's reason, and
the solved layers' worst |mean| (layers with a bias) and |std - 1| as an independent check
measures them: a float64 copy of the solved model, plain forward hooks, the sum and sum of
squares of every output element over all samples (tensor mode, the run's default). A model
the run fails on is recorded with the first line of its error; the sweep goes on.

``--write`` writes ``zoo.md`` and ``zoo.json`` into ``benchmarks/`` (``benchmarks/quick/``,
git-ignored, with ``--quick``); without it the table is only printed.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for _path in (str(REPO), str(REPO / "pipeline")):  # benchmark this checkout's package
    if _path not in sys.path:
        sys.path.insert(0, _path)

import copy  # noqa: E402
import dataclasses  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402

import click  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402
from torch.nn.utils import parametrize  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402

from benchmarks.common import (  # noqa: E402
    DATA_ROOT,
    OUT,
    code_commit,
    cpu_model,
    load_average,
    log,
    table,
    version,
)
from lsuv_pipeline import OffTarget, RunConfig, compute, mj  # noqa: E402
from lsuv_pipeline.coverage import NORMS  # noqa: E402
from lsuv_pipeline.data import DatasetSpec, open_source  # noqa: E402
from lsuv_pipeline.errors import ModelError, first_line  # noqa: E402
from lsuv_pipeline.hooks import first_tensor  # noqa: E402
from lsuv_pipeline.models import ModelSpec, build_model  # noqa: E402
from lsuv_pipeline.progress import Progress  # noqa: E402

#: Input sizes tried, smallest first: a model runs at the first one its forward accepts.
SIZES = (32, 64, 96, 128, 160, 224, 299)
#: Models with more parameters than this are skipped (listed with their size).
MAX_PARAMS = 150_000_000
#: Vocabulary of the token model: pixel values quantized to this many levels.
VOCAB = 32
#: The token model reads a TOKEN_SIDE x TOKEN_SIDE downsampled image, row by row.
TOKEN_SIDE = 16
#: ``--quick``: a small CNN, a deep one, attention, integer tokens.
QUICK = ("mj", "resnet18", "tiny-encoder", "tiny-gpt")
#: timm models and the keyword arguments that size them (``img_size``: built per size).
TIMM = {
    "timm:resnet18": False,
    "timm:vit_tiny_patch16_224": True,
    "timm:convnext_atto": False,
    "timm:efficientnet_b0": False,
    "timm:mobilevitv2_050": False,
    "timm:fastvit_t8": False,
}


# -- the two transformers -----------------------------------------------------------------


class TinyEncoder(nn.Module):
    """Patch embedding conv, ``nn.TransformerEncoder`` (batch first), mean pool, linear head."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, *, patch: int = 4,
                 width: int = 64, heads: int = 4, depth: int = 2) -> None:  # fmt: skip
        super().__init__()
        self.embed = nn.Conv2d(in_channels, width, kernel_size=patch, stride=patch)
        layer = nn.TransformerEncoderLayer(
            width, heads, dim_feedforward=2 * width, dropout=0.0, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x).flatten(2).transpose(1, 2)  # (N, L, width)
        return self.head(self.encoder(x).mean(1))  # (N, num_classes)


class TinyGPT(nn.Module):
    """Token and position embeddings, pre-norm causal self-attention blocks, an LM head."""

    def __init__(self, vocab: int = VOCAB, length: int = TOKEN_SIDE**2, *, width: int = 64,
                 heads: int = 4, depth: int = 2) -> None:  # fmt: skip
        super().__init__()
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Embedding(length, width)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(
                width,
                heads,
                dim_feedforward=4 * width,
                dropout=0.0,
                batch_first=True,
                norm_first=True,
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        length = tokens.shape[1]  # tokens: (N, L) int64
        x = self.tok(tokens) + self.pos(torch.arange(length, device=tokens.device))
        mask = nn.Transformer.generate_square_subsequent_mask(length, device=x.device,
                                                              dtype=x.dtype)  # fmt: skip
        for block in self.blocks:
            x = block(x, src_mask=mask, is_causal=True)
        return self.head(self.norm(x))  # (N, L, vocab)


# -- the zoo ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Entry:
    """One model of the zoo.

    Attributes:
        name: Its name in the table and in ``--models``.
        build: ``build(in_channels, size)`` -> the model, its default init drawn under seed 0.
        sized: The model is built for its input size (a ViT's ``image_size``), so it is
            built again for each size tried.
        tokens: It reads integer token sequences, not images.
        count: ``count()`` -> its number of parameters without building its weights (for
            the size limit), or ``None`` to build it once to count.
    """

    name: str
    build: Callable[[int, int], nn.Module]
    sized: bool = False
    tokens: bool = False
    count: Callable[[], int] | None = None


def _seeded(factory: Callable[[], nn.Module]) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return factory()


def _torchvision_kwargs(name: str, size: int) -> dict:
    if name.startswith("vit_"):
        return {"image_size": size}
    if name.startswith("maxvit_"):
        return {"input_size": (size, size)}
    return {}


def _torchvision(name: str) -> Entry:
    def build(in_channels: int, size: int) -> nn.Module:
        spec = ModelSpec(name=name, kwargs=_torchvision_kwargs(name, size))
        return build_model(spec, seed=0, in_channels=in_channels)

    def count() -> int:
        from torchvision import models

        with torch.device("meta"):
            model = models.get_model(name, weights=None, num_classes=10)
        return parameters(model)

    sized = bool(_torchvision_kwargs(name, 32))
    return Entry(name=name, build=build, sized=sized, count=count)


def _timm(name: str, sized: bool) -> Entry:
    def build(in_channels: int, size: int) -> nn.Module:
        import timm

        kwargs = {"img_size": size} if sized else {}
        return _seeded(lambda: timm.create_model(name.removeprefix("timm:"), pretrained=False,
                                                 in_chans=in_channels, num_classes=10,
                                                 **kwargs))  # fmt: skip

    return Entry(name=name, build=build, sized=sized)


def entries() -> list[Entry]:
    """Every model of the zoo, in table order."""
    from torchvision import models

    zoo = [Entry(name="mj", build=lambda c, s: _seeded(lambda: mj(in_channels=c)))]
    zoo += [_torchvision(n) for n in models.list_models(module=models)]
    zoo += [_timm(n, sized) for n, sized in TIMM.items()]
    zoo.append(Entry(name="tiny-encoder", build=lambda c, s: _seeded(lambda: TinyEncoder(c))))
    zoo.append(Entry(name="tiny-gpt", build=lambda c, s: _seeded(TinyGPT), tokens=True))
    return zoo


def parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def weight_modules(model: nn.Module) -> list[str]:
    """Modules with parameters of their own (a parametrized weight counts), normalization
    layers left out: what a run either solves or names as left."""
    names = []
    for name, module in model.named_modules():
        if isinstance(module, NORMS) or "parametrizations" in name.split("."):
            continue
        own = any(p is not None for p in module._parameters.values())
        if own or parametrize.is_parametrized(module):
            names.append(name)
    return names


# -- data -----------------------------------------------------------------------------------


def images(root: Path, samples: int, size: int, channels: int) -> torch.Tensor:
    """The first ``samples`` Fashion-MNIST training images, as the pipeline preprocesses
    them (normalized, resized bilinearly), repeated to ``channels``: ``(N, C, size, size)``."""
    spec = DatasetSpec(name="fashion-mnist", split="train", root=str(root), limit=samples,
                       download=False, options={"resize": size} if size != 28 else {})  # fmt: skip
    x = open_source(spec).batch(0, samples)  # (N, 1, size, size)
    return x.expand(-1, channels, -1, -1).contiguous()


def tokens(root: Path, samples: int) -> torch.Tensor:
    """The same images as token sequences: downsampled to ``TOKEN_SIDE`` squared, pixel
    values in [0, 1] quantized to ``VOCAB`` levels, read row by row: ``(N, L)`` int64."""
    import torchvision.datasets as tvd

    raw = tvd.FashionMNIST(root=str(root), train=True, download=False).data[:samples]
    x = raw.float().div(255).unsqueeze(1)  # (N, 1, 28, 28)
    x = nn.functional.interpolate(x, size=(TOKEN_SIDE, TOKEN_SIDE), mode="area")
    return x.mul(VOCAB).floor().clamp(max=VOCAB - 1).long().flatten(1)  # (N, L)


# -- one model ------------------------------------------------------------------------------


class _Notes(Progress):
    """Keeps the run's notes and warnings (cache off, which layers are left) for the JSON."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def note(self, text: str) -> None:
        self.lines.append(text)


@dataclasses.dataclass
class Record:
    """What the zoo found for one model (see the module docstring)."""

    name: str
    status: str = "ok"
    error: str = ""
    params: int | None = None
    input: str = ""
    solved: int = 0
    total: int = 0
    left: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    max_abs_mean: float | None = None
    max_abs_std_dev: float | None = None
    layers: dict[str, dict] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0
    solve_seconds: float | None = None
    passes: int | None = None
    off_target: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)


def model_and_input(entry: Entry, root: Path, samples: int) -> tuple[nn.Module, torch.Tensor, str]:
    """Build the model and its data at the smallest size a forward of 2 samples takes."""
    if entry.tokens:
        x = tokens(root, samples)
        model = entry.build(1, 0)
        _forward(model, x[:2])
        return model, x, f"{x.shape[1]} tokens"
    model, channels, error = None, 1, None
    for size in SIZES:
        try:
            if model is None or entry.sized:  # a ViT is built for its input size
                model, channels = _build(entry, size)
            _forward(model, images(root, 2, size, channels))
        except Exception as exc:  # too small for this model: try the next size
            error = exc
            continue
        return model, images(root, samples, size, channels), f"{channels}x{size}x{size}"
    raise RuntimeError(
        f"no input size of {SIZES[0]}..{SIZES[-1]} works: {type(error).__name__}: "
        f"{first_line(error)}"
    )


def _build(entry: Entry, size: int) -> tuple[nn.Module, int]:
    """The model for one input channel, or for three when its stem cannot be rebuilt."""
    try:
        return entry.build(1, size), 1
    except ModelError as exc:
        if "stem" not in str(exc):
            raise
        return entry.build(3, size), 3


def _forward(model: nn.Module, x: torch.Tensor) -> None:
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(x)
    finally:
        model.train(training)


def float64_check(model: nn.Module, x: torch.Tensor, layers: Sequence[str],
                  batch_size: int) -> dict[str, tuple[float, float]]:  # fmt: skip
    """Each layer's output mean and std over all its output elements and all samples, from a
    float64 copy of ``model`` in eval mode: ``{name: (mean, std)}``.

    Written apart from the tool's own hooks: a conv's output from a forward hook; a
    Linear's from every ``F.linear`` call with its weight (a ``TorchFunctionMode`` here,
    so Linears applied functionally count too); an attention module's query / key / value
    projections recomputed from its inputs and its ``out_proj`` from its output, with
    PyTorch's fused attention paths off. The sum and the sum of squares are accumulated in
    float64; with outputs near mean 0 and std 1 ``E[y^2] - E[y]^2`` loses nothing.
    """
    twin = copy.deepcopy(model).double().eval()
    sums = {name: torch.zeros(3, dtype=torch.float64) for name in layers}

    def add(name, y):
        y = y.detach().double()
        sums[name] += torch.stack([y.sum(), y.square().sum(), torch.tensor(y.numel())])

    handles, linears = [], {}
    for name in layers:
        parent, _, leaf = name.rpartition(".")
        owner = twin.get_submodule(parent) if parent else twin
        if isinstance(owner, nn.MultiheadAttention) and leaf in ("q_proj", "k_proj", "v_proj"):
            handles.append(owner.register_forward_pre_hook(
                _projection_hook(owner, leaf, name, add), with_kwargs=True))  # fmt: skip
            continue
        if isinstance(owner, nn.MultiheadAttention) and leaf == "out_proj":
            handles.append(owner.register_forward_hook(
                lambda m, a, out, name=name: add(name, out[0])))  # fmt: skip
            continue
        module = twin.get_submodule(name)
        if isinstance(module, nn.Linear):
            linears[id(module.weight)] = name
        else:
            handles.append(module.register_forward_hook(
                lambda m, a, out, name=name: add(name, first_tensor(out))))  # fmt: skip
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad(), _LinearOutputs(linears, add):
            for batch in x.split(batch_size):
                twin(batch.double() if batch.is_floating_point() else batch)
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
        for h in handles:
            h.remove()
    out = {}
    for name, (total, squares, count) in sums.items():
        if count == 0:
            out[name] = (math.nan, math.nan)  # the float64 forward never called it
            continue
        mean = (total / count).item()
        out[name] = (mean, math.sqrt(max((squares / count).item() - mean * mean, 0.0)))
    return out


def _projection_hook(mha: nn.MultiheadAttention, leaf: str, name: str, add):
    """A pre-hook computing one projection of ``mha`` from the inputs it is called with."""
    i = ("q_proj", "k_proj", "v_proj").index(leaf)
    arg = ("query", "key", "value")[i]

    def hook(module, args, kwargs):
        inp = args[i] if len(args) > i else kwargs[arg]
        e = mha.embed_dim
        if mha._qkv_same_embed_dim:
            w = mha.in_proj_weight[i * e : (i + 1) * e]
        else:
            w = getattr(mha, f"{leaf}_weight")
        b = None if mha.in_proj_bias is None else mha.in_proj_bias[i * e : (i + 1) * e]
        add(name, F.linear(inp, w, b))

    return hook


class _LinearOutputs(TorchFunctionMode):
    """Records the output of every ``F.linear`` call whose weight is one of ``linears``."""

    def __init__(self, linears: dict[int, str], add) -> None:
        super().__init__()
        self.linears, self.add = linears, add

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is F.linear:
            weight = args[1] if len(args) > 1 else (kwargs or {}).get("weight")
            name = self.linears.get(id(weight))
            if name is not None:
                self.add(name, out)
        return out


def reason_label(reason: str) -> str:
    """A short label for a run's reason: its first clause, names of layers elided."""
    label = re.split(r"[:(;]", reason, maxsplit=1)[0].strip().rstrip(",")
    return re.sub(r"'[^']*'", "…", label)


def _module_of(name: str, model: nn.Module) -> str:
    """The module that holds a solved layer's weight: the layer itself, or for an attention
    projection (``<attention>.q_proj``) the attention module."""
    parent, _, leaf = name.rpartition(".")
    if leaf in ("q_proj", "k_proj", "v_proj"):
        owner = model.get_submodule(parent) if parent else model
        if isinstance(owner, nn.MultiheadAttention):
            return parent
    return name


def _left(total: Sequence[str], solved: set[str], rows) -> dict[str, list[str]]:
    """The weight modules not solved, grouped by the run's reason; a module the run does
    not name itself takes the reason of the nearest ancestor it names (an attention's
    output projection), else ``not named by the run``."""
    named = {r.name: r.reason for r in rows if r.reason}
    groups: dict[str, list[str]] = {}
    for name in total:
        if name in solved:
            continue
        parts = name.split(".")  # the model itself ("") names only its own weights
        ancestors = [".".join(parts[:i]) for i in range(len(parts), 0, -1)] if name else [""]
        why = next((named[a] for a in ancestors if a in named), "not named by the run")
        groups.setdefault(why, []).append(name or "(model)")
    return groups


def measure(entry: Entry, root: Path, samples: int, work: Path, batch_size: int = 128) -> Record:
    """Run the solve on one model and check it; an error becomes the record's status."""
    record = Record(name=entry.name)
    out = work / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', entry.name)}.zarr"
    started = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            _measure(entry, root, samples, out, batch_size, record)
        except _TooLarge:
            record.status = "skipped"
        except Exception as exc:
            record.status = "failed"
            record.error = f"{type(exc).__name__}: {first_line(exc)}"
    record.warnings = sorted({f"{w.category.__name__}: {first_line(w.message)}" for w in caught})
    record.seconds = time.perf_counter() - started
    shutil.rmtree(out, ignore_errors=True)  # a large model's store holds two copies of it
    gc.collect()
    return record


class _TooLarge(Exception):
    """The model has more than :data:`MAX_PARAMS` parameters (found once built)."""


def _measure(entry, root, samples, out: Path, batch_size, record: Record) -> None:
    model, x, record.input = model_and_input(entry, root, samples)
    record.params = parameters(model)
    if record.params > MAX_PARAMS:
        raise _TooLarge
    total = weight_modules(model)
    record.total = len(total)
    config = RunConfig(dataset=f"fashion-mnist {record.input}", holdout=None, limit=samples,
                       batch_size=batch_size, shard_size=max(samples, 1))  # fmt: skip
    notes = _Notes()
    try:
        data = torch.utils.data.TensorDataset(x)
        result = compute(config, out, model=model, data=data, device="cpu",
                         cache_memory="4GB", progress=notes, overwrite=True)  # fmt: skip
    except OffTarget as exc:
        result = exc.result
        record.status = "off target"
        record.off_target = list(result.off_target)
    record.notes = notes.lines
    record.solve_seconds, record.passes = result.seconds, result.passes
    solved = result.solved
    modules = {_module_of(s.name, model) for s in solved}  # a projection: its attention
    record.solved = len(modules & set(total))
    record.left = _left(total, modules, result.layers)
    check = float64_check(result.model, x, [s.name for s in solved], batch_size)
    for s in solved:
        mean, std = check[s.name]
        record.layers[s.name] = {"kind": s.kind, "has_bias": s.has_bias, "mean": mean, "std": std}
    means = [abs(v["mean"]) for v in record.layers.values() if v["has_bias"]]
    record.max_abs_mean = max(means, default=None)
    record.max_abs_std_dev = max((abs(v["std"] - 1) for v in record.layers.values()),
                                 default=None)  # fmt: skip


# -- the sweep ------------------------------------------------------------------------------


def sweep(names: Sequence[str] | None, root: Path, samples: int,
          extra: Sequence[Entry] = ()) -> dict:  # fmt: skip
    """Measure the zoo's models (or those named) and return the raw results.

    Raises:
        click.BadParameter: A name that is not in the zoo.
    """
    zoo = {e.name: e for e in [*entries(), *extra]}
    if names is None:
        chosen = list(zoo.values())
    else:
        unknown = [n for n in names if n not in zoo]
        if unknown:
            raise click.BadParameter(f"not in the zoo: {', '.join(unknown)}", param_hint="--models")
        chosen = [zoo[n] for n in names]
    raw = {"samples": samples, "max_params": MAX_PARAMS, "sizes": list(SIZES),
           "load average at start": load_average(), "models": [], "skipped": []}  # fmt: skip
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lsuv-zoo-") as work:
        for entry in chosen:
            size = _size(entry)
            if size is not None and size > MAX_PARAMS:
                raw["skipped"].append({"name": entry.name, "params": size})
                log(f"{entry.name}: skipped, {size / 1e6:.1f}M parameters")
                continue
            record = measure(entry, root, samples, Path(work))
            if record.status == "skipped":
                raw["skipped"].append({"name": entry.name, "params": record.params})
                continue
            raw["models"].append(dataclasses.asdict(record))
            log(f"{entry.name}: {record.status} {record.error} in {record.seconds:.1f} s")
    raw["seconds"] = time.perf_counter() - started
    raw["load average at end"] = load_average()
    return raw


def _size(entry: Entry) -> int | None:
    """Parameters counted without weights (meta tensors), or ``None`` when that fails."""
    if entry.count is None:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return entry.count()
    except Exception:  # some inits cannot run on meta tensors: the real build counts
        return None


# -- the report -----------------------------------------------------------------------------


def _e(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.2e}"


def _cell(text: str) -> str:
    return text.replace("|", "/")  # a pipe would split the markdown cell


def totals(raw: dict) -> dict:
    """Models run, ok, off target and failed; solved and total weight modules."""
    models = raw["models"]
    ran = [m for m in models if m["status"] != "failed"]
    return {
        "models": len(models),
        "ok": sum(m["status"] == "ok" for m in models),
        "off target": sum(m["status"] == "off target" for m in models),
        "failed": sum(m["status"] == "failed" for m in models),
        "skipped": len(raw["skipped"]),
        "solved": sum(m["solved"] for m in ran),
        "total": sum(m["total"] for m in ran),
    }


def _by_label(left: dict[str, list[str]]) -> dict[str, tuple[list[str], str]]:
    """``left`` grouped by :func:`reason_label`: label -> (modules, the first full reason)."""
    out: dict[str, tuple[list[str], str]] = {}
    for reason, names in left.items():
        out.setdefault(reason_label(reason), ([], reason))[0].extend(names)
    return out


def render(raw: dict) -> str:
    """The zoo's Markdown: what was run, the totals, one row per model, the layers left."""
    t = totals(raw)
    rows = []
    for m in raw["models"]:
        params = "-" if m["params"] is None else f"{m['params'] / 1e6:.2f}"
        status = m["status"] if m["status"] != "failed" else f"failed: {m['error']}"
        left = ", ".join(f"{label} {len(n)}" for label, (n, _) in _by_label(m["left"]).items())
        rows.append([
            f"`{m['name']}`", params, m["input"] or "-",
            f"{m['solved']} / {m['total']}" if m["status"] != "failed" else "-",
            _e(m["max_abs_mean"]), _e(m["max_abs_std_dev"]), f"{m['seconds']:.1f}",
            _cell(status), _cell(left) or "-",
        ])  # fmt: skip
    main = table(
        ["model", "params (M)", "input", "solved / total", "max abs(mean) f64",
         "max abs(std−1) f64", "s", "status", "left (by reason)"],
        rows,
    )  # fmt: skip
    left = []
    for m in raw["models"]:
        for names, reason in _by_label(m["left"]).values():
            shown = ", ".join(f"`{n}`" for n in names[:4])
            more = f" and {len(names) - 4} more" if len(names) > 4 else ""
            left.append([f"`{m['name']}`", len(names), _cell(reason), shown + more])
    info = raw.get("machine", {})
    parts = [
        "# Model zoo",
        "",
        f"Written by `{raw.get('command', 'python benchmarks/zoo.py')}`"
        + (f" on {info['date (UTC)']}, commit {info['commit']}" if info else "")
        + f". Each model is built under seed 0 for one input channel and 10 classes and solved "
        f"(tensor mode, the default) on the first {raw['samples']} Fashion-MNIST training "
        f"images at the smallest size of {', '.join(map(str, raw['sizes']))} at which a "
        "forward of 2 samples works (*input*: channels x height x width; the token model "
        f"reads each image at {TOKEN_SIDE}x{TOKEN_SIDE}, quantized to {VOCAB} levels, row "
        f"by row). Models over {raw['max_params'] / 1e6:.0f}M parameters are skipped.",
        "",
        "*solved / total*: weight modules the run solved, of those with parameters of their "
        "own (normalization layers not counted). *max abs(mean) f64* (layers with a bias) and "
        "*max abs(std−1) f64*: the worst solved layer, measured by an independent float64 "
        "forward of a copy of the solved model in eval mode over the same images, every "
        "output element pooled. *s*: wall seconds for the model (building, the solve with "
        "its verification pass, the check). Raw values, per-layer figures, the run's notes "
        "and warnings are in `zoo.json`.",
        "",
        f"Totals: {t['models']} models run: {t['ok']} ok, {t['off target']} off target, "
        f"{t['failed']} failed; {t['skipped']} skipped; {t['solved']} of {t['total']} "
        "weight modules solved in the models that ran"
        + (f"; {raw['seconds'] / 60:.1f} min in all." if "seconds" in raw else "."),
        "",
        main,
    ]
    if left:
        parts += ["", "## Left as they are, by reason", "",
                  table(["model", "modules", "reason", "which"], left, right=1)]  # fmt: skip
    if raw["skipped"]:
        skipped = ", ".join(f"`{s['name']}` ({s['params'] / 1e6:.1f}M)" for s in raw["skipped"])
        parts += ["", f"Skipped (over {raw['max_params'] / 1e6:.0f}M parameters): {skipped}."]
    return "\n".join(parts) + "\n"


def _machine() -> dict:
    """What the zoo ran on and with."""
    return {
        "date (UTC)": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "commit": code_commit(["zoo.*"]),
        "cpu": cpu_model(),
        "torch threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torchvision": version("torchvision"),
        "timm": version("timm"),
    }


@click.command()
@click.option("--quick", is_flag=True, help=f"Only {', '.join(QUICK)}; 64 samples.")
@click.option("--models", "names", help="Comma-separated model names (default: the whole zoo).")
@click.option(
    "--samples",
    type=click.IntRange(min=2),
    help="Fashion-MNIST training images per model [default: 256; 64 with --quick].",
)
@DATA_ROOT
@click.option("--write", is_flag=True, help="Write zoo.md and zoo.json (else print only).")
@OUT
@click.option("--list", "list_only", is_flag=True, help="Print the zoo's model names and exit.")
def main(quick, names, samples, data_root, write, out, list_only):
    """Solve every model of the zoo and check it in float64; print (and write) the table."""
    if list_only:
        click.echo("\n".join(e.name for e in entries()))
        return
    chosen = [n.strip() for n in names.split(",") if n.strip()] if names else None
    if chosen is None and quick:
        chosen = list(QUICK)
    samples = samples or (64 if quick else 256)
    raw = {"machine": _machine(), **sweep(chosen, data_root.resolve(), samples)}
    flags = [f for f, on in (("--quick", quick), (f"--models {names}", names)) if on]
    if samples != (64 if quick else 256):
        flags.append(f"--samples {samples}")
    raw["command"] = " ".join(["python benchmarks/zoo.py", *flags])
    raw["totals"] = totals(raw)
    text = render(raw)
    click.echo(text)
    if write:
        folder = (out or REPO / "benchmarks" / ("quick" if quick else "")).resolve()
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "zoo.json").write_text(json.dumps(raw, indent=1))
        (folder / "zoo.md").write_text(text)
        log(f"wrote {folder / 'zoo.md'}")


if __name__ == "__main__":
    main()
