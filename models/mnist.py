"""MNIST: read the standard files (IDX, gzipped or not, or ``mnist.npz``), split, train, evaluate.

Where no files are given and the machine is online, Keras downloads
``mnist.npz`` into its cache (``~/.keras/datasets``); offline, the error says
which files to put where.
"""

from __future__ import annotations

import gzip
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.errors import DatasetError

from .cnn import build_cnn

IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IMAGES_MAGIC, _LABELS_MAGIC = 2051, 2049


@dataclass(frozen=True)
class MnistData:
    """``(n, 28, 28)`` uint8 images and ``(n,)`` uint8 labels per split; ``train`` may be None."""

    test: tuple[np.ndarray, np.ndarray]
    train: tuple[np.ndarray, np.ndarray] | None
    source: str


def read_idx(path: Path, magic: int) -> np.ndarray:
    """Read one IDX file (``.gz`` or raw) whose magic number must be ``magic``."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DatasetError(path, f"cannot read the file: {exc}") from exc
    if len(raw) < 8:
        raise DatasetError(path, f"Expected an IDX file. Got {len(raw)} bytes instead.")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise DatasetError(path, f"Expected IDX magic number {magic}. Got {found} instead.")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    header = 4 + 4 * ndim
    expected = int(np.prod(dims))
    if len(raw) - header != expected:
        raise DatasetError(
            path,
            f"Expected {expected} bytes of data for shape {dims}. Got {len(raw) - header} instead.",
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _find(folder: Path, stem: str) -> Path | None:
    for name in (f"{stem}.gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def load_mnist(data_dir: Path | None, *, download: bool = True) -> MnistData:
    """Load MNIST from ``data_dir`` (``mnist.npz`` or IDX files), or download it through Keras."""
    if data_dir is not None:
        data_dir = Path(data_dir)
        if not data_dir.is_dir():
            raise DatasetError(data_dir, "no such folder")
        npz = data_dir / "mnist.npz"
        if npz.is_file():
            return _load_npz(npz)
        splits = {}
        for split, (images_name, labels_name) in IDX_FILES.items():
            images, labels = _find(data_dir, images_name), _find(data_dir, labels_name)
            if images is None and labels is None:
                continue
            if images is None or labels is None:
                missing = images_name if images is None else labels_name
                raise DatasetError(
                    data_dir, f"has half of the {split} split: {missing}(.gz) is missing"
                )
            x, y = read_idx(images, _IMAGES_MAGIC), read_idx(labels, _LABELS_MAGIC)
            if len(x) != len(y):
                raise DatasetError(images, f"{len(x)} images but {labels.name} has {len(y)} labels")
            splits[split] = (x, y)
        if "test" in splits or "train" in splits:
            test = splits.get("test") or splits["train"]
            train = splits.get("train") if "test" in splits else None
            return MnistData(test=test, train=train, source=f"IDX files in {data_dir}")
        if not download:
            raise DatasetError(data_dir, _expected_files())
    try:
        import keras

        (x_train, y_train), (x_test, y_test) = keras.datasets.mnist.load_data()
    except Exception as exc:  # offline, proxy, corrupt cache...
        where = data_dir if data_dir is not None else Path("~/.keras/datasets/mnist.npz")
        raise DatasetError(
            where, f"{_expected_files()}; downloading through Keras failed: {exc}"
        ) from exc
    return MnistData(test=(x_test, y_test), train=(x_train, y_train), source="keras download")


def _expected_files() -> str:
    names = ", ".join(f"{n}.gz" for pair in IDX_FILES.values() for n in pair)
    return f"Expected mnist.npz or the IDX files ({names}) in it"


def _load_npz(path: Path) -> MnistData:
    try:
        with np.load(path) as npz:
            train = (npz["x_train"], npz["y_train"])
            test = (npz["x_test"], npz["y_test"])
    except (OSError, ValueError, KeyError) as exc:
        raise DatasetError(
            path, f"Expected x_train, y_train, x_test, y_test arrays: {exc}"
        ) from exc
    return MnistData(test=test, train=train, source=str(path))


def holdout_split(
    x: np.ndarray, y: np.ndarray, *, n_train: int, n_holdout: int, seed: int = 0
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """A fixed-seed random split into ``n_train`` and ``n_holdout`` disjoint samples."""
    if n_train + n_holdout > len(x):
        raise ValueError(
            f"Expected n_train + n_holdout <= {len(x)}. "
            f"Received: n_train={n_train}, n_holdout={n_holdout}"
        )
    order = np.random.default_rng(seed).permutation(len(x))
    train, held = order[:n_train], order[n_train : n_train + n_holdout]
    return (x[train], y[train]), (x[held], y[held])


@dataclass
class MnistResult:
    model: object = field(repr=False)
    held_out_accuracy: float
    held_out_loss: float
    history: dict[str, list[float]]
    seconds: float


def train_mnist(
    train: tuple[np.ndarray, np.ndarray],
    held_out: tuple[np.ndarray, np.ndarray],
    *,
    epochs: int = 5,
    batch_size: int = 64,
    seed: int = 0,
) -> MnistResult:
    """Train :func:`build_cnn` on ``train`` and evaluate it on ``held_out`` (images 0-255)."""
    import keras

    keras.utils.set_random_seed(seed)
    x_train = train[0].astype("float32")[..., None] / 255.0
    x_held = held_out[0].astype("float32")[..., None] / 255.0
    model = build_cnn((28, 28, 1), 10, filters=(32, 64), dropout=0.25, name="mnist_cnn")
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    started = time.perf_counter()
    history = model.fit(
        x_train, train[1], epochs=epochs, batch_size=batch_size, verbose=0, shuffle=True
    )
    loss, accuracy = model.evaluate(x_held, held_out[1], batch_size=256, verbose=0)
    return MnistResult(
        model=model,
        held_out_accuracy=float(accuracy),
        held_out_loss=float(loss),
        history={k: [float(v) for v in vs] for k, vs in history.history.items()},
        seconds=time.perf_counter() - started,
    )
