"""Datasets by name, their preprocessing, fixed shards, and the dataset fingerprint.

A :class:`Source` is one split of a dataset, addressed by index ranges:
``source.batch(start, stop)`` returns the preprocessed float32 batch of those samples, in
dataset order, the same bytes every time. A pass covers the split in fixed shards
(``source.shards(shard_size)``: contiguous ranges whose size does not depend on how many
workers run them), each read in batches, so every executor computes the same per-shard moments
and their merge in shard order gives the same bits.

Where sources come from:

* :func:`open_source` opens a :class:`DatasetSpec`: a name of :data:`DATASETS` (``mnist``,
  ``fashion-mnist``, ``cifar10``, ``cifar100``) or ``imagefolder:PATH``, a split, a limit and
  the dataset's options, under a data root. Any process (a dask worker included) reopens the
  same source from the spec.
* :func:`source_from` wraps a user's own data given through the Python API: a map-style
  ``torch.utils.data.Dataset`` or a sized, re-iterable sequence of batches (a ``DataLoader``
  without shuffling, a list of tensors). Such sources have no spec; they travel by pickling.
* :func:`limited` is the view of the first ``limit`` samples of any of them (``--limit``).
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import itertools
import json
import math
import os
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from . import moments as mom
from .errors import ConfigError, DataError

__all__ = [
    "DATASETS",
    "DatasetSpec",
    "Shard",
    "Source",
    "TensorSource",
    "batches",
    "limited",
    "open_source",
    "resolve_root",
    "shards",
    "source_from",
]

DEFAULT_ROOT = "data"
ROOT_ENV = "LSUV_DATA_ROOT"


class _Options(dict):
    """A read-only dict of JSON values that hashes by content: the options of a frozen spec.

    Nested lists are stored as tuples (JSON writes them back as lists), so nothing inside can
    change under the spec's hash. It pickles and serializes to JSON like a plain dict.
    """

    __slots__ = ()

    def __hash__(self) -> int:
        return hash(json.dumps(self, sort_keys=True))

    def __reduce__(self):
        return (_Options, (dict(self),))

    def _read_only(self, *args, **kwargs):
        raise TypeError("dataset options are read-only; use dataclasses.replace(spec, options=...)")

    __setitem__ = __delitem__ = __ior__ = _read_only
    clear = pop = popitem = setdefault = update = _read_only


def _freeze(value):
    if isinstance(value, dict):
        return _Options((k, _freeze(v)) for k, v in value.items())
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


@dataclass(frozen=True, kw_only=True)
class DatasetSpec:
    """Which samples a run reads: a named dataset, split, limit and options under a root.

    Attributes:
        name: A key of :data:`DATASETS` (e.g. ``"mnist"``) or ``"imagefolder:PATH"``.
        split: ``"train"`` or ``"test"`` (image folders also take ``"val"``).
        root: Folder holding the dataset in torchvision's layout.
        limit: Use only the first ``limit`` samples of the split, in dataset order.
        download: Fetch the files when they are missing.
        options: The dataset's own settings, JSON values (e.g. ``{"resize": 128}`` for an
            image folder); stored read-only, with lists as tuples, so the spec stays hashable.
    """

    name: str
    split: str = "train"
    root: str = DEFAULT_ROOT
    limit: int | None = None
    download: bool = True
    options: Mapping = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.options, Mapping):
            raise ConfigError(
                f"dataset options must be a mapping, got {type(self.options).__name__}"
            )
        try:  # a JSON round trip: what the store records is what the loader sees
            plain = json.loads(json.dumps(dict(self.options), sort_keys=True, allow_nan=False))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"dataset options must be JSON values ({exc})") from None
        object.__setattr__(self, "options", _freeze(plain))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> DatasetSpec:
        return cls(**d)

    def key(self) -> str:
        """Return the spec as canonical JSON: a stable cache key across processes."""
        return json.dumps(self.to_dict(), sort_keys=True)


@dataclass(frozen=True)
class Shard:
    """A contiguous range ``[start, stop)`` of sample indices, the unit of work of a pass."""

    index: int
    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start


class Source:
    """One split of a dataset, preprocessed on demand, addressed by index ranges."""

    name: str
    split: str
    count: int
    sample_shape: tuple[int, ...]
    num_classes: int | None
    fingerprint: str
    transform: dict
    #: How another process opens the same source (``None``: only by pickling this object).
    spec: DatasetSpec | None = None

    def batch(self, start: int, stop: int) -> torch.Tensor:
        """Return samples ``[start, stop)`` preprocessed, as one float32 batch."""
        raise NotImplementedError

    def shards(self, shard_size: int) -> list[Shard]:
        """Split the source into the fixed shards of a pass (see :func:`shards`)."""
        return shards(self.count, shard_size)

    def batch_ranges(self, shard: Shard, batch_size: int) -> list[tuple[int, int]]:
        """Return the ``[start, stop)`` ranges :meth:`batches` reads for ``shard``."""
        return batches(shard, batch_size)

    def batches(self, shard: Shard, batch_size: int) -> Iterator[torch.Tensor]:
        """Yield the shard's samples in order, ``batch_size`` at a time."""
        for start, stop in self.batch_ranges(shard, batch_size):
            yield self.batch(start, stop)

    def reopen_options(self) -> dict:
        """Options that let :func:`open_source` reopen this source without repeating work."""
        return {}

    def describe(self) -> dict:
        """Return what the store records about this source."""
        return {
            "name": self.name,
            "split": self.split,
            "count": self.count,
            "sample_shape": list(self.sample_shape),
            "num_classes": self.num_classes,
            "fingerprint": self.fingerprint,
            "transform": self.transform,
        }


def _normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``(x / 255 - mean) / std`` in float32: torchvision's ``ToTensor`` then ``Normalize``."""
    x = images.to(torch.float32).div(255)  # (N, C, H, W)
    return x.sub_(mean).div_(std)


class TensorSource(Source):
    """A split held in memory as raw uint8 images, normalized per batch.

    ``batch`` computes ``(x / 255 - mean) / std`` per channel in float32, the same
    operations as torchvision's ``ToTensor()`` followed by ``Normalize(mean, std)``.
    """

    def __init__(
        self,
        *,
        name: str,
        split: str,
        images: torch.Tensor,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        num_classes: int | None = None,
    ) -> None:
        if images.dtype != torch.uint8:
            raise TypeError(f"expected uint8 images, got {images.dtype}")
        if images.ndim == 3:
            images = images.unsqueeze(1)  # (N, H, W) -> (N, 1, H, W)
        self.name = name
        self.split = split
        self.images = images.contiguous()  # (N, C, H, W) uint8
        self.count = images.shape[0]
        self.sample_shape = tuple(images.shape[1:])
        self.num_classes = num_classes
        channels = self.sample_shape[0]
        self._mean = torch.tensor(mean, dtype=torch.float32).view(channels, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32).view(channels, 1, 1)
        self.transform = {
            "to_float": "x / 255",
            "normalize": {"mean": list(mean), "std": list(std)},
        }
        self.fingerprint = _fingerprint(self.images, self.transform)

    def batch(self, start: int, stop: int) -> torch.Tensor:
        return _normalize(self.images[start:stop], self._mean, self._std)


def _fingerprint(images: torch.Tensor, transform: dict) -> str:
    """sha256 over the sample bytes in order, their shape, and the preprocessing."""
    h = hashlib.sha256()
    h.update(json.dumps({"shape": list(images.shape), "transform": transform}).encode())
    h.update(images.numpy().tobytes())
    return "sha256:" + h.hexdigest()


def resolve_root(root: str | os.PathLike | None) -> Path:
    """Return the data root: ``root``, else ``$LSUV_DATA_ROOT``, else ``data/``.

    Raises:
        DataError: An explicitly given root (argument or environment) does not exist.
    """
    explicit = root if root is not None else os.environ.get(ROOT_ENV) or None
    if explicit is None:
        return Path(DEFAULT_ROOT)
    path = Path(explicit).expanduser()
    if not path.is_dir():
        how = "--data-root" if root is not None else f"${ROOT_ENV}"
        raise DataError(f"data root {str(path)!r} (from {how}) is not a directory")
    return path


# -- options -------------------------------------------------------------------------


def _check_option_names(name: str, options: Mapping, known: Iterable[str]) -> None:
    known = sorted(known)
    unknown = sorted(set(options) - set(known))
    if not unknown:
        return
    if not known:
        raise ConfigError(f"dataset {name!r} takes no options, got: {', '.join(unknown)}")
    raise ConfigError(
        f"unknown option(s) for dataset {name!r}: {', '.join(unknown)}; "
        f"known: {', '.join(k for k in known if not k.startswith('_'))}"  # _name: internal
    )


def _int_option(name: str, options: Mapping, key: str, default: int) -> int:
    value = options.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(
            f"option {key!r} of dataset {name!r} must be an integer >= 1, got {value!r}"
        )
    return value


def _floats_option(name: str, options: Mapping, key: str, channels: int) -> tuple[float, ...]:
    value = options[key]
    ok = isinstance(value, (list, tuple)) and len(value) == channels
    ok = ok and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    ok = ok and all(math.isfinite(v) for v in value)
    if not ok or (key == "std" and min(value) <= 0):
        what = "positive numbers" if key == "std" else "finite numbers"
        raise ConfigError(
            f"option {key!r} of dataset {name!r} must be a list of {channels} {what} "
            f"(one per channel), got {value!r}"
        )
    return tuple(float(v) for v in value)


# -- torchvision datasets ------------------------------------------------------------


@contextlib.contextmanager
def _stdout_to_stderr():
    """torchvision prints download progress to stdout; keep stdout for results."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


def _train_flag(name: str, split: str) -> bool:
    if split not in ("train", "test"):
        raise ConfigError(f"dataset {name!r} has splits 'train' and 'test', not {split!r}")
    return split == "train"


def _open_torchvision(name: str, cls_name: str, folder: str, root: Path, train: bool, download):
    """Construct torchvision's dataset class; a missing dataset or failed download is a DataError.

    ``folder`` is where the class keeps its files under ``root``; error messages name it.
    """
    import torchvision.datasets as tvd

    cls = getattr(tvd, cls_name)
    where = str(root / folder)
    try:
        return cls(root=str(root), train=train, download=False)
    except RuntimeError:
        if not download:
            raise DataError(
                f"{name} not found under {where!r} (missing or corrupt files) and downloading "
                f"is off; point --data-root (or $LSUV_DATA_ROOT) at a folder that holds {folder}"
            ) from None
    try:
        with _stdout_to_stderr():
            return cls(root=str(root), train=train, download=True)
    except Exception as exc:
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else repr(exc)
        raise DataError(
            f"{name} not found under {where!r} and the download failed ({reason}); point "
            f"--data-root (or $LSUV_DATA_ROOT) at a folder that holds {folder}"
        ) from None


def _torchvision_idx(cls_name: str, mean: float, std: float) -> Callable[..., Source]:
    """Loader for the MNIST-format datasets of torchvision (IDX files under raw/)."""

    def load(name: str, split: str, root: Path, download: bool, options: Mapping) -> Source:
        _check_option_names(name, options, ())
        train = _train_flag(name, split)
        ds = _open_torchvision(name, cls_name, f"{cls_name}/raw", root, train, download)
        return TensorSource(
            name=name,
            split=split,
            images=ds.data,
            mean=(mean,),
            std=(std,),
            num_classes=len(ds.classes),
        )

    return load


def _torchvision_cifar(
    cls_name: str, folder: str, mean: tuple[float, ...], std: tuple[float, ...]
) -> Callable[..., Source]:
    """Loader for CIFAR-10 / CIFAR-100 (torchvision's python-pickle batches under ``folder``)."""

    def load(name: str, split: str, root: Path, download: bool, options: Mapping) -> Source:
        _check_option_names(name, options, ())
        train = _train_flag(name, split)
        ds = _open_torchvision(name, cls_name, folder, root, train, download)
        images = torch.from_numpy(ds.data).permute(0, 3, 1, 2)  # (N, H, W, C) -> (N, C, H, W)
        return TensorSource(
            name=name, split=split, images=images, mean=mean, std=std, num_classes=len(ds.classes)
        )

    return load


# -- image folders -------------------------------------------------------------------

IMAGEFOLDER = "imagefolder"
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # torchvision's ImageNet reference recipes
IMAGENET_STD = (0.229, 0.224, 0.225)
_FOLDER_OPTIONS = ("resize", "crop", "grayscale", "mean", "std", "normalize", "_computed")
_SPLIT_FOLDERS = {"train": ("train",), "test": ("test", "val"), "val": ("val", "test")}
#: Images decoded at a time while computing the folder's statistics.
_STATS_CHUNK = 64


def _load_imagefolder(name: str, split: str, root: Path, download: bool, options: Mapping):
    """Open ``imagefolder:PATH``: an ImageFolder tree ``PATH/<class>/<image>``, decoded lazily.

    ``PATH`` is absolute or relative to the data root. With ``PATH/train``, ``PATH/test`` or
    ``PATH/val`` present, split ``"train"`` reads ``PATH/train`` and ``"test"`` / ``"val"``
    read ``PATH/test`` or else ``PATH/val`` (``"val"``: the other way round); without them,
    ``PATH`` itself is the only split, ``"train"``. Files are in ImageFolder's order (classes
    sorted, then paths sorted) with torchvision's image extensions.

    Each image is preprocessed, deterministically, as:

    1. decoded by PIL and converted to ``"RGB"`` (``"L"``, one channel, with ``grayscale``);
    2. resized so its shorter side is ``resize`` pixels (default 256; bilinear with PIL's
       antialiasing, torchvision's ``Resize(resize)``);
    3. center-cropped to ``crop`` x ``crop`` (default 224; ``CenterCrop(crop)``);
    4. scaled to ``x / 255`` in float32 and normalized per channel, ``(x - mean) / std``,
       with ``mean`` / ``std`` from the options (default ImageNet's, RGB only) or, with
       ``normalize="compute"``, the population mean / std per channel over every pixel of
       every image of the split after steps 1-3, computed once when the source opens
       (streamed moments, Chan et al. merge in file order; over the whole split even
       under ``--limit``, so a limited run reads the first samples of the same data).

    Options: ``resize`` (int), ``crop`` (int, at most ``resize``), ``grayscale`` (bool),
    ``mean`` / ``std`` (one number per channel), ``normalize`` (``"fixed"``, the default,
    or ``"compute"``). Every choice, including computed numbers, is recorded in ``transform``
    and so enters the fingerprint, with each file's relative path, size and ``mtime_ns`` (files
    are stat-ed, not hashed) and the class list. ``download`` is ignored. The internal option
    ``_computed`` is what :func:`open_source` adds to the source's spec after computing the
    statistics (with a digest of the files): reopening that spec, e.g. on a dask worker,
    reuses the numbers instead of decoding the folder again, unless the files changed.

    Raises:
        ConfigError: A bad option, or a split the folder does not have.
        DataError: The folder is missing, has no class folders, a class without images, or
            an image cannot be read.
    """
    path = name.partition(":")[2]
    if not path:
        raise ConfigError(
            f"dataset {IMAGEFOLDER!r} needs a folder: {IMAGEFOLDER}:PATH "
            "(absolute, or relative to the data root)"
        )
    settings = _folder_settings(name, options)
    base = Path(path).expanduser()
    base = (base if base.is_absolute() else root / base).absolute()
    if not base.is_dir():
        raise DataError(f"image folder {str(base)!r} (dataset {name!r}) not found")
    folder = _split_folder(name, base, split)
    return _FolderSource(name=name, split=split, folder=folder, **settings)


def _folder_settings(name: str, options: Mapping) -> dict:
    _check_option_names(name, options, _FOLDER_OPTIONS)
    resize = _int_option(name, options, "resize", 256)
    crop = _int_option(name, options, "crop", 224)
    if crop > resize:
        raise ConfigError(
            f"option 'crop' of dataset {name!r} ({crop}) must not exceed 'resize' ({resize}): "
            "the crop is taken inside the resized image"
        )
    grayscale = options.get("grayscale", False)
    if not isinstance(grayscale, bool):
        raise ConfigError(f"option 'grayscale' of dataset {name!r} must be true or false")
    normalize = options.get("normalize", "fixed")
    if normalize not in ("fixed", "compute"):
        raise ConfigError(
            f"option 'normalize' of dataset {name!r} must be 'fixed' or 'compute', "
            f"got {normalize!r}"
        )
    channels = 1 if grayscale else 3
    given = [k for k in ("mean", "std") if k in options]
    if normalize == "compute" and given:
        raise ConfigError(
            f"dataset {name!r}: normalize='compute' computes mean and std; do not also give "
            f"{' and '.join(given)}"
        )
    if normalize == "fixed" and len(given) == 1:
        raise ConfigError(f"dataset {name!r}: give both 'mean' and 'std', or neither")
    if normalize == "fixed" and not given and grayscale:
        raise ConfigError(
            f"dataset {name!r}: with grayscale there is no default normalization; give "
            "'mean' and 'std' (one number each) or normalize='compute'"
        )
    if "_computed" in options and normalize != "compute":
        raise ConfigError(f"dataset {name!r}: '_computed' goes only with normalize='compute'")
    mean = std = None
    if normalize == "fixed":
        mean = _floats_option(name, options, "mean", channels) if given else IMAGENET_MEAN
        std = _floats_option(name, options, "std", channels) if given else IMAGENET_STD
    return {
        "resize": resize,
        "crop": crop,
        "grayscale": grayscale,
        "mean": mean,
        "std": std,
        "normalize_from": ("options" if given else "imagenet")
        if normalize == "fixed"
        else "computed",
        "computed": options.get("_computed"),
    }


def _split_folder(name: str, base: Path, split: str) -> Path:
    present = [s for s in ("train", "test", "val") if (base / s).is_dir()]
    if not present:
        if split == "train":
            return base
        raise ConfigError(
            f"dataset {name!r} has only the split 'train' ({str(base)!r} has no train/, test/ "
            f"or val/ folder), not {split!r}"
        )
    for candidate in _SPLIT_FOLDERS.get(split, ()):
        if candidate in present:
            return base / candidate
    splits = (["train"] if "train" in present else []) + (
        ["test", "val"] if {"test", "val"} & set(present) else []
    )
    raise ConfigError(
        f"dataset {name!r} has splits {', '.join(repr(s) for s in splits)} "
        f"(folders {', '.join(p + '/' for p in present)} in {str(base)!r}), not {split!r}"
    )


class _FolderSource(Source):
    """An image folder split: file list and stats in memory, images decoded per batch.

    See :func:`_load_imagefolder` for the layout and the preprocessing. Pickles as its file
    list and numbers (no open files, no decoded images).
    """

    def __init__(
        self,
        *,
        name: str,
        split: str,
        folder: Path,
        resize: int,
        crop: int,
        grayscale: bool,
        mean: tuple[float, ...] | None,
        std: tuple[float, ...] | None,
        normalize_from: str,
        computed: Mapping | None,
    ) -> None:
        self.name = name
        self.split = split
        self.folder = folder
        self.classes, self.files, stats = _scan_folder(folder)
        self.count = len(self.files)
        self.num_classes = len(self.classes)
        self.resize, self.crop, self.mode = resize, crop, "L" if grayscale else "RGB"
        channels = 1 if grayscale else 3
        self.sample_shape = (channels, crop, crop)
        decode = {
            "decode": f"PIL Image.convert({self.mode!r})",
            "resize": {"shorter_side": resize, "interpolation": "bilinear", "antialias": True},
            "center_crop": [crop, crop],
            "to_float": "x / 255",
        }
        h = hashlib.sha256()  # the samples before normalization: files, order, classes, decode
        h.update(json.dumps({"classes": self.classes, "decode": decode}).encode())
        for rel, (size, mtime_ns) in zip(self.files, stats, strict=True):
            h.update(json.dumps([rel, size, mtime_ns]).encode())
        self._files_digest = h.hexdigest()
        if mean is None:  # normalize="compute"
            if computed is not None and computed.get("files") == self._files_digest:
                mean = _floats_option(name, computed, "mean", channels)  # opened before
                std = _floats_option(name, computed, "std", channels)
            else:
                mean, std = self._folder_stats()
        self._mean = torch.tensor(mean, dtype=torch.float32).view(channels, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32).view(channels, 1, 1)
        self._stats_computed = normalize_from == "computed"
        self.transform = {
            **decode,
            "normalize": {"mean": list(mean), "std": list(std), "from": normalize_from},
        }
        tail = hashlib.sha256(json.dumps(self.transform["normalize"]).encode()).hexdigest()
        self.fingerprint = (
            "sha256:" + hashlib.sha256((self._files_digest + tail).encode()).hexdigest()
        )

    def _decode(self, index: int) -> torch.Tensor:
        """Decode, convert, resize and crop one image: ``(C, crop, crop)`` uint8."""
        import torchvision.transforms.functional as F
        from PIL import Image

        path = self.folder / self.files[index]
        try:
            with Image.open(path) as im:
                img = im.convert(self.mode)
        except (OSError, Image.DecompressionBombError) as exc:
            raise DataError(f"cannot read image {str(path)!r}: {exc}") from None
        img = F.resize(img, self.resize, interpolation=F.InterpolationMode.BILINEAR)
        img = F.center_crop(img, [self.crop, self.crop])
        return F.pil_to_tensor(img)

    def _images(self, start: int, stop: int) -> torch.Tensor:
        stop = min(stop, self.count)
        if start >= stop:
            return torch.empty((0, *self.sample_shape), dtype=torch.uint8)
        return torch.stack([self._decode(i) for i in range(start, stop)])  # (N, C, H, W)

    def _folder_stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel population mean / std of ``x / 255`` over the split, streamed."""
        parts = (
            mom.from_batch(self._images(start, start + _STATS_CHUNK).to(torch.float32).div(255))
            for start in range(0, self.count, _STATS_CHUNK)
        )
        total = mom.merge_all(parts)
        mean, std = tuple(total.mean.tolist()), tuple(total.std.tolist())
        if min(std) == 0:
            raise DataError(
                f"image folder {str(self.folder)!r}: a channel is constant over every image, "
                "so normalize='compute' would divide by a zero std; give 'mean' and 'std'"
            )
        return mean, std

    def batch(self, start: int, stop: int) -> torch.Tensor:
        return _normalize(self._images(start, stop), self._mean, self._std)

    def reopen_options(self) -> dict:
        if not self._stats_computed:
            return {}
        norm = self.transform["normalize"]
        return {
            "_computed": {"files": self._files_digest, "mean": norm["mean"], "std": norm["std"]}
        }


def _scan_folder(folder: Path) -> tuple[list[str], list[str], list[tuple[int, int]]]:
    """Return the classes, the image paths relative to ``folder`` in ImageFolder order, and
    each file's ``(size, mtime_ns)``."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    try:
        classes, class_to_idx = find_classes(folder)
    except FileNotFoundError:
        raise DataError(
            f"image folder {str(folder)!r} has no class folders; expected {folder}/<class>/<image>"
        ) from None
    try:
        samples = make_dataset(folder, class_to_idx, extensions=IMG_EXTENSIONS)
    except FileNotFoundError as exc:
        raise DataError(f"image folder {str(folder)!r}: {exc}".strip()) from None
    files, stats = [], []
    for path, _ in samples:
        try:
            st = os.stat(path)
        except OSError as exc:
            raise DataError(f"cannot read image {path!r}: {exc}") from None
        files.append(Path(os.path.relpath(path, folder)).as_posix())
        stats.append((st.st_size, st.st_mtime_ns))
    return classes, files, stats


# -- the registry ----------------------------------------------------------------------

#: Dataset name -> loader(name, split, root, download, options) -> Source. Normalization
#: constants are the training split's per-channel population mean / std of the pixel values
#: scaled to [0, 1]. MNIST's are the customary ones (PyTorch's examples/mnist). CIFAR's are
#: np.mean / np.std (ddof=0) of ``train_data / 255`` over all pixels and images, to 8
#: places, as widely published (CIFAR-100: weiaicunzai/pytorch-cifar100,
#: conf/global_settings.py). They are NOT the often copied CIFAR-10 std (0.2023, 0.1994,
#: 0.2010), which averages per-image stds. ``imagefolder:PATH`` is
#: :func:`_load_imagefolder`.
DATASETS: dict[str, Callable[..., Source]] = {
    "mnist": _torchvision_idx("MNIST", 0.1307, 0.3081),
    "fashion-mnist": _torchvision_idx("FashionMNIST", 0.2860, 0.3530),
    "cifar10": _torchvision_cifar(
        "CIFAR10",
        "cifar-10-batches-py",
        mean=(0.49139968, 0.48215841, 0.44653091),
        std=(0.24703223, 0.24348513, 0.26158784),
    ),
    "cifar100": _torchvision_cifar(
        "CIFAR100",
        "cifar-100-python",
        mean=(0.50707516, 0.48654887, 0.44091784),
        std=(0.26733429, 0.25643846, 0.27615047),
    ),
    IMAGEFOLDER: _load_imagefolder,
}


def _loader(name: str) -> Callable[..., Source]:
    prefix, colon, _ = name.partition(":")
    loader = DATASETS.get(prefix) if colon else DATASETS.get(name)
    if loader is None or (colon and prefix != IMAGEFOLDER):
        names = sorted(k + ":PATH" if k == IMAGEFOLDER else k for k in DATASETS)
        raise DataError(f"unknown dataset {name!r}; choose one of: {', '.join(names)}")
    return loader


def open_source(spec: DatasetSpec) -> Source:
    """Open the split ``spec`` describes, downloading it if allowed and missing.

    The source's ``spec`` is ``spec``, plus any option that spares a reopening the work this
    opening did (an image folder's computed statistics, checked against its files).

    Raises:
        DataError: Unknown dataset, missing files, or a failed download.
        ConfigError: Unknown split, bad options, or a limit below 1.
    """
    loader = _loader(spec.name)
    if spec.limit is not None and spec.limit < 1:
        raise ConfigError(f"--limit must be at least 1, got {spec.limit}")
    source = loader(spec.name, spec.split, Path(spec.root), spec.download, spec.options)
    if source.count == 0:
        raise DataError(f"dataset {spec.name!r} split {spec.split!r} has no samples")
    extra = source.reopen_options()
    source = limited(source, spec.limit)
    source.spec = replace(spec, options={**spec.options, **extra}) if extra else spec
    return source


# -- limits --------------------------------------------------------------------------


def limited(source: Source, limit: int | None) -> Source:
    """Return the first ``limit`` samples of ``source``, in its order (``None``: all).

    The view reads the same bytes as ``source`` for those samples, keeps its shard and batch
    structure (cut at ``limit``), and has a fingerprint of its own. A limit at or above the
    count returns ``source`` itself.

    Raises:
        ConfigError: ``limit`` below 1.
    """
    if limit is None:
        return source
    if limit < 1:
        raise ConfigError(f"--limit must be at least 1, got {limit}")
    if limit >= source.count:
        return source
    view = _Limited(source, limit)
    if source.spec is not None:
        view.spec = replace(source.spec, limit=limit)
    return view


class _Limited(Source):
    """The first ``limit`` samples of another source."""

    def __init__(self, inner: Source, limit: int) -> None:
        self.inner = inner
        self.name = inner.name
        self.split = inner.split
        self.count = min(limit, inner.count)
        self.sample_shape = inner.sample_shape
        self.num_classes = inner.num_classes
        self.transform = inner.transform
        self.fingerprint = _limited_fingerprint(inner, self.count)

    def batch(self, start: int, stop: int) -> torch.Tensor:
        return self.inner.batch(start, min(stop, self.count))

    def shards(self, shard_size: int) -> list[Shard]:
        cut = (
            Shard(s.index, s.start, min(s.stop, self.count)) for s in self.inner.shards(shard_size)
        )
        return [s for s in cut if s.start < s.stop]

    def batch_ranges(self, shard: Shard, batch_size: int) -> list[tuple[int, int]]:
        if shard.start >= self.count:
            return []
        cut = Shard(shard.index, shard.start, min(shard.stop, self.count))
        return [(a, min(b, self.count)) for a, b in self.inner.batch_ranges(cut, batch_size)]


def _limited_fingerprint(inner: Source, count: int) -> str:
    if isinstance(inner, TensorSource):
        return _fingerprint(inner.images[:count], inner.transform)
    h = hashlib.sha256(f"{inner.fingerprint}[:{count}]".encode())
    return "sha256:" + h.hexdigest()


# -- user data -----------------------------------------------------------------------

#: Samples a spot-check fingerprint reads, evenly spaced from the first to the last.
SPOT_CHECK = 64


def source_from(
    data,
    *,
    name: str = "user",
    split: str = "train",
    fingerprint: str | None = None,
    collate: Callable | None = None,
) -> Source:
    """Wrap a user's own data as a :class:`Source` (spec ``None``: it travels by pickling).

    ``data`` is one of:

    * a :class:`Source`: returned as is;
    * a map-style ``torch.utils.data.Dataset`` (``__len__`` and ``__getitem__``): random
      access, ``batch(start, stop)`` reads items ``start..stop-1``. An item is a tensor or a
      tuple whose first element is one (``(x, y)``: ``x`` is taken). ``collate(items)``, if
      given, turns the list of items as the dataset returns them into the batch (a tensor or
      a tuple starting with one); by default the ``x``'s are stacked;
    * any other sized, re-iterable collection of batches, each a tensor ``(B, ...)`` or a
      tuple starting with one: a ``DataLoader`` without shuffling, a list of tensors, a list
      of ``(x, y)`` pairs. ``collate(batch)``, if given, maps each yielded batch to its
      tensor. See :class:`_BatchesSource` for what sequential access implies.

    Only ``Dataset`` instances are read item by item; anything else is taken as batches, so a
    plain list of single-sample tensors would be misread (wrap it in a ``TensorDataset``).
    Prefer passing a ``Dataset`` over a ``DataLoader`` of it: random access, no counting pass.
    Batches must be floating point (they are cast to float32); preprocessing is the data's
    own business, done before it gets here. The source is shipped to dask workers by
    pickling, so ``data`` and ``collate`` must pickle for a cluster run.

    Args:
        data: The samples, as above.
        name: Name recorded for the dataset.
        split: Split name recorded for it (e.g. ``"test"`` for a held-out set).
        fingerprint: Identity of the data, recorded and compared on resume; by default a
            sha256 spot check (see below), which does not see changes between the samples
            it reads: give your own (e.g. a data version) when that matters.
        collate: As above.

    The default fingerprint hashes the number of samples, ``data``'s type name, the batch
    sizes (iterables) and the bytes of at most :data:`SPOT_CHECK` preprocessed samples
    evenly spaced from the first to the last (for an iterable: the first sample of evenly
    spaced batches, plus the very last sample). It is a spot check, not a hash of all data.

    Raises:
        ConfigError: An unsized iterable, a one-shot iterator, a shuffling ``DataLoader``,
            an ``IterableDataset``, or batches that are not floating-point tensors.
        DataError: ``data`` holds no samples.
    """
    from torch.utils.data import Dataset, IterableDataset

    if isinstance(data, Source):
        return data
    if fingerprint is not None and (not isinstance(fingerprint, str) or not fingerprint):
        raise ConfigError(f"fingerprint must be a non-empty string, got {fingerprint!r}")
    if isinstance(data, IterableDataset):
        raise ConfigError(
            f"{_type_name(data)} is an IterableDataset, read one sample at a time without "
            "random access; wrap it in a DataLoader(batch_size=...) without shuffling"
        )
    if isinstance(data, Dataset):
        return _DatasetSource(
            data, name=name, split=split, fingerprint=fingerprint, collate=collate
        )
    return _BatchesSource(data, name=name, split=split, fingerprint=fingerprint, collate=collate)


def _type_name(obj) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def _callable_name(fn: Callable) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__qualname__)}"


def _first(item) -> object:
    """``x`` of an item or batch: the item itself, or the first element of a tuple / list."""
    return item[0] if isinstance(item, (tuple, list)) and len(item) > 0 else item


def _float_batch(value, what: str, *, batch: bool = True) -> torch.Tensor:
    """The float32 CPU tensor in ``value`` (a tensor or a tuple starting with one)."""
    x = _first(value)
    if not isinstance(x, torch.Tensor):
        raise ConfigError(
            f"{what} is a {type(x).__name__}, not a tensor (or a tuple starting with one); "
            "pass collate= to build the batch"
        )
    if not x.is_floating_point():
        raise ConfigError(
            f"{what} has dtype {x.dtype}; expected floating-point, preprocessed samples "
            "(convert and normalize them in the dataset or in collate=)"
        )
    if batch and x.ndim < 1:
        raise ConfigError(f"{what} is a scalar, not a batch")
    return x.detach().to(device="cpu", dtype=torch.float32)


def _spot_indices(n: int) -> list[int]:
    """At most :data:`SPOT_CHECK` indices evenly spaced over ``range(n)``, first and last in."""
    if n <= SPOT_CHECK:
        return list(range(n))
    return sorted({round(j * (n - 1) / (SPOT_CHECK - 1)) for j in range(SPOT_CHECK)})


class _DatasetSource(Source):
    """A map-style dataset: random access, items collated per batch (see :func:`source_from`)."""

    def __init__(self, data, *, name, split, fingerprint, collate) -> None:
        self.data = data
        self.collate = collate
        self.name = name
        self.split = split
        self.count = len(data)
        if self.count == 0:
            raise DataError(f"dataset {name!r} ({_type_name(data)}) has no samples")
        self.sample_shape = tuple(self._collated(0, 1).shape[1:])
        classes = getattr(data, "classes", None)
        self.num_classes = len(classes) if isinstance(classes, (list, tuple)) else None
        self.transform = {
            "user": {
                "kind": "dataset",
                "type": _type_name(data),
                "collate": _callable_name(collate) if collate else "torch.stack of the samples",
            }
        }
        self.fingerprint = fingerprint or self._spot_check()

    def _collated(self, start: int, stop: int) -> torch.Tensor:
        items = [self.data[i] for i in range(start, stop)]
        what = f"dataset {self.name!r} items {start}..{stop - 1}"
        if self.collate is not None:
            return _float_batch(self.collate(items), what)
        return torch.stack([_float_batch(item, what, batch=False) for item in items])

    def batch(self, start: int, stop: int) -> torch.Tensor:
        stop = min(stop, self.count)
        if start >= stop:
            return torch.empty((0, *self.sample_shape))
        x = self._collated(start, stop)
        if x.shape[0] != stop - start or tuple(x.shape[1:]) != self.sample_shape:
            raise DataError(
                f"dataset {self.name!r} items {start}..{stop - 1} collate to shape "
                f"{tuple(x.shape)}, expected {(stop - start, *self.sample_shape)}"
            )
        return x

    def _spot_check(self) -> str:
        h = hashlib.sha256()
        head = {"kind": "dataset", "type": _type_name(self.data), "count": self.count}
        h.update(json.dumps({**head, "sample_shape": list(self.sample_shape)}).encode())
        for i in _spot_indices(self.count):
            h.update(f"{i}:".encode())
            h.update(self.batch(i, i + 1).numpy().tobytes())
        return "sha256:" + h.hexdigest()


class _BatchesSource(Source):
    """A sized, re-iterable collection of batches: sequential access only.

    Opening it iterates once to read every batch's size (``count`` is their sum) and to take
    the spot-check fingerprint; the batch layout is then fixed, and a later iteration that
    yields other sizes is a :class:`DataError`.

    Shards and batches follow the iterable's own batches: :meth:`shards` groups whole
    consecutive batches, as many as fit in ``shard_size`` samples (at least one), and
    :meth:`batches` yields the iterable's batches as they are, ignoring the caller's
    ``batch_size``. Shards cut elsewhere (e.g. by :func:`shards`) still work: a batch that
    straddles a shard boundary is split there, so every sample is read exactly once.

    ``batch(start, stop)`` iterates from the start, keeping a cursor: requests in increasing
    order (one pass, shard after shard) continue the same iteration at no extra cost; a
    request behind the cursor starts a new iteration and skips the batches before it, which
    re-reads them (a dask worker given shards out of order pays this). ``iterations``
    counts the iterations started after opening.
    """

    def __init__(self, data, *, name, split, fingerprint, collate) -> None:
        from torch.utils.data import DataLoader

        try:
            batches_count = len(data)
        except TypeError:
            raise ConfigError(
                f"{_type_name(data)} has no len(): only a sized, re-iterable collection of "
                "batches (a DataLoader, a list) can be read the same way every pass"
            ) from None
        if isinstance(data, Iterator):
            raise ConfigError(
                f"{_type_name(data)} is an iterator, which can be read only once; pass a "
                "re-iterable collection (a DataLoader, a list)"
            )
        if not isinstance(data, Iterable) and not hasattr(data, "__getitem__"):
            raise ConfigError(f"{_type_name(data)} is neither a Dataset nor iterable")
        if isinstance(data, DataLoader) and _shuffles(data):
            raise ConfigError(
                "the DataLoader shuffles (a random sampler), so every pass would read another "
                "order; build it with shuffle=False"
            )
        self.data = data
        self.collate = collate
        self.name = name
        self.split = split
        self.iterations = 0
        self._reset()
        spot = _spot_indices(batches_count)
        h = hashlib.sha256()
        sizes: list[int] = []
        first_shape = x = None
        for i, raw in enumerate(data):
            x = self._tensor(raw, i)
            if first_shape is None:
                first_shape = tuple(x.shape[1:])
            elif tuple(x.shape[1:]) != first_shape:
                raise ConfigError(
                    f"batch {i} of {name!r} has samples of shape {tuple(x.shape[1:])}, "
                    f"batch 0 has {first_shape}"
                )
            sizes.append(x.shape[0])
            if i in spot:
                h.update(f"{i}:".encode())
                h.update(x[0].numpy().tobytes())
        if not sizes:
            raise DataError(f"dataset {name!r} ({_type_name(data)}) yields no batches")
        h.update(x[-1].numpy().tobytes())
        self._offsets = [0, *itertools.accumulate(sizes)]  # batch i is [offsets[i], offsets[i+1])
        self.count = self._offsets[-1]
        self.sample_shape = first_shape
        classes = getattr(getattr(data, "dataset", data), "classes", None)
        self.num_classes = len(classes) if isinstance(classes, (list, tuple)) else None
        self.transform = {
            "user": {
                "kind": "batches",
                "type": _type_name(data),
                "collate": _callable_name(collate) if collate else "first element of each batch",
            }
        }
        head = {"kind": "batches", "type": _type_name(data), "count": self.count, "sizes": sizes}
        h.update(json.dumps({**head, "sample_shape": list(first_shape)}).encode())
        self.fingerprint = fingerprint or "sha256:" + h.hexdigest()

    def _reset(self) -> None:
        self._lock = threading.Lock()  # dask worker threads may share one source
        self._it: Iterator | None = None
        self._pos = 0  # batches the current iteration has yielded
        self._last: tuple[int, torch.Tensor] | None = None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        for key in ("_lock", "_it", "_pos", "_last"):
            del state[key]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reset()

    def _tensor(self, raw, index: int) -> torch.Tensor:
        value = self.collate(raw) if self.collate is not None else raw
        x = _float_batch(value, f"batch {index} of {self.name!r}")
        if x.shape[0] == 0:
            raise ConfigError(f"batch {index} of {self.name!r} is empty")
        return x

    def _fetch(self, index: int) -> torch.Tensor:
        """Batch ``index`` of the iterable, continuing the current iteration when possible."""
        with self._lock:
            if self._last is not None and self._last[0] == index:
                return self._last[1]
            if self._it is None or index < self._pos:
                self._it, self._pos = iter(self.data), 0
                self.iterations += 1
            try:
                while self._pos < index:
                    next(self._it)
                    self._pos += 1
                x = self._tensor(next(self._it), index)
            except StopIteration:
                raise DataError(
                    f"{self.name!r} yielded fewer batches than the {len(self._offsets) - 1} it "
                    "had when opened"
                ) from None
            self._pos += 1
            expected = self._offsets[index + 1] - self._offsets[index]
            if x.shape[0] != expected:
                raise DataError(
                    f"batch {index} of {self.name!r} has {x.shape[0]} samples, {expected} when "
                    "opened: the data changed between passes"
                )
            self._last = (index, x)
            return x

    def batch(self, start: int, stop: int) -> torch.Tensor:
        stop = min(stop, self.count)
        if start >= stop:
            return torch.empty((0, *self.sample_shape))
        first = bisect.bisect_right(self._offsets, start) - 1
        end = bisect.bisect_left(self._offsets, stop)  # batches [first, end) overlap the range
        pieces = []
        for i in range(first, end):
            lo = self._offsets[i]
            pieces.append(
                self._fetch(i)[max(start, lo) - lo : min(stop, self._offsets[i + 1]) - lo]
            )
        return torch.cat(pieces)  # a new tensor: callers never share the cursor's batch

    def shards(self, shard_size: int) -> list[Shard]:
        if shard_size < 1:
            raise ConfigError(f"shard size must be at least 1, got {shard_size}")
        out, start = [], 0
        for lo, hi in itertools.pairwise(self._offsets):
            if hi - start > shard_size and lo > start:  # batch lo..hi does not fit: close
                out.append(Shard(len(out), start, lo))
                start = lo
        out.append(Shard(len(out), start, self.count))
        return out

    def batch_ranges(self, shard: Shard, batch_size: int) -> list[tuple[int, int]]:
        first = bisect.bisect_right(self._offsets, shard.start) - 1
        ranges = []
        for i in range(max(first, 0), len(self._offsets) - 1):
            lo, hi = self._offsets[i], self._offsets[i + 1]
            if lo >= shard.stop:
                break
            a, b = max(lo, shard.start), min(hi, shard.stop, self.count)
            if a < b:
                ranges.append((a, b))
        return ranges


def _shuffles(loader) -> bool:
    """Whether a ``DataLoader`` draws its order at random."""
    from torch.utils.data import RandomSampler, SubsetRandomSampler, WeightedRandomSampler

    random = (RandomSampler, SubsetRandomSampler, WeightedRandomSampler)
    samplers = [loader.sampler, getattr(loader.batch_sampler, "sampler", None)]
    return any(isinstance(s, random) or getattr(s, "shuffle", False) is True for s in samplers)


# -- shards --------------------------------------------------------------------------


def shards(count: int, shard_size: int) -> list[Shard]:
    """Split ``range(count)`` into contiguous shards of ``shard_size`` (the last may be short)."""
    if shard_size < 1:
        raise ConfigError(f"shard size must be at least 1, got {shard_size}")
    return [
        Shard(i, start, min(start + shard_size, count))
        for i, start in enumerate(range(0, count, shard_size))
    ]


def batches(shard: Shard, batch_size: int) -> list[tuple[int, int]]:
    """Split a shard into ``[start, stop)`` batches of ``batch_size`` (the last may be short)."""
    return [
        (start, min(start + batch_size, shard.stop))
        for start in range(shard.start, shard.stop, batch_size)
    ]
