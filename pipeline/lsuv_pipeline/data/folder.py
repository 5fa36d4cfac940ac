"""Image folders (torchvision's ImageFolder layout), decoded lazily per batch."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from .. import moments as mom
from ..errors import ConfigError, DataError
from .base import Source, check_option_names, floats_option, int_option, normalize_images
from .loading import ordered_map

# -- image folders -------------------------------------------------------------------

IMAGEFOLDER = "imagefolder"
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # torchvision's ImageNet reference recipes
IMAGENET_STD = (0.229, 0.224, 0.225)
_FOLDER_OPTIONS = ("resize", "crop", "grayscale", "mean", "std", "normalize", "_computed")
_SPLIT_FOLDERS = {"train": ("train",), "test": ("test", "val"), "val": ("val", "test")}
#: Images decoded at a time while computing the folder's statistics.
_STATS_CHUNK = 64


def load_imagefolder(name: str, split: str, root: Path, download: bool, options: Mapping):
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
    check_option_names(name, options, _FOLDER_OPTIONS)
    resize = int_option(name, options, "resize", 256)
    crop = int_option(name, options, "crop", 224)
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
        mean = floats_option(name, options, "mean", channels) if given else IMAGENET_MEAN
        std = floats_option(name, options, "std", channels) if given else IMAGENET_STD
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

    See :func:`load_imagefolder` for the layout and the preprocessing. Pickles as its file
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
                mean = floats_option(name, computed, "mean", channels)  # opened before
                std = floats_option(name, computed, "std", channels)
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
        images = ordered_map(self._decode, range(start, stop), self.loader_workers)
        return torch.stack(images)  # (N, C, H, W)

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
        return self.from_raw(self._images(start, stop))

    def raw_batch(self, start: int, stop: int) -> torch.Tensor:
        return self._images(start, stop)  # (N, C, H, W) uint8: decoded, resized, cropped

    def from_raw(self, raw: torch.Tensor) -> torch.Tensor:
        return normalize_images(raw, self._mean, self._std)

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
