"""Dataset registry and the prepared format, on small data the tests write in the real formats."""

from __future__ import annotations

import pickle
import tempfile
from pathlib import Path

import numpy as np
import pytest

from edc.data import load_prepared, prepare, stratified_split
from edc.errors import DataError
from edc.params import DatasetParams
from tests.helpers import make_cifar10, make_cifar100, make_imagefolder


def run_prepare(tmp_path, seed=0, **cfg):
    out = Path(tempfile.mkdtemp(prefix="prepared-", dir=tmp_path))
    facts = prepare(DatasetParams(**cfg), seed, out)
    return facts, load_prepared(out)


def test_mnist5k_default_is_a_stratified_4000_1000_split(tmp_path):
    facts, ds = run_prepare(tmp_path)
    assert (facts.channels, facts.height, facts.width, facts.num_classes) == (1, 28, 28, 10)
    assert len(ds.train) == 4000 and len(ds.test) == 1000
    assert facts.counts == {"train": [400] * 10, "test": [100] * 10}
    x = ds.train.images.astype(np.float64) / 255
    assert facts.mean == pytest.approx([x.mean()]) and facts.std == pytest.approx([x.std()])
    # no image is in both splits
    train_rows = {r.tobytes() for r in ds.train.images}
    assert sum(r.tobytes() in train_rows for r in ds.test.images) <= 2  # MNIST has a few exact duplicates


def test_validation_split_is_carved_from_train_stratified_and_leaves_test_alone(tmp_path):
    _, base = run_prepare(tmp_path)
    facts, ds = run_prepare(tmp_path, val_size=500)
    assert ds.has_val and not base.has_val and len(ds.val) == 500 and len(ds.train) == 3500
    assert facts.counts["val"] == [50] * 10 and facts.counts["train"] == [350] * 10
    assert np.array_equal(ds.test.images, base.test.images)  # the test split does not move
    rows = lambda split: {r.tobytes() for r in split.images}  # noqa: E731
    assert rows(ds.train) | rows(ds.val) == rows(base.train)
    assert len(rows(ds.train) & rows(ds.val)) <= 2  # MNIST has a few exact duplicates
    # the train mean/std are those of what remains of train
    assert facts.mean == pytest.approx([ds.train.images.mean() / 255])
    with pytest.raises(DataError, match="dataset.val_size must be between 1 and 3999"):
        run_prepare(tmp_path, val_size=4000)


def test_split_is_seeded(tmp_path):
    _, a = run_prepare(tmp_path, seed=0)
    _, b = run_prepare(tmp_path, seed=1)
    _, a2 = run_prepare(tmp_path, seed=0)
    assert np.array_equal(a.test.images, a2.test.images)
    assert not np.array_equal(a.test.images, b.test.images)


def test_stratified_split_keeps_class_shares_with_unbalanced_classes():
    labels = np.array([0] * 50 + [1] * 30 + [2] * 20)
    train, test = stratified_split(labels, 10, 3, seed=3)
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(100))
    assert np.bincount(labels[test], minlength=3).tolist() == [5, 3, 2]


def test_cifar10_python_batches(tmp_path):
    root = make_cifar10(tmp_path / "src")
    facts, ds = run_prepare(tmp_path, name="cifar10", root=str(root))
    assert (facts.channels, facts.height, facts.num_classes) == (3, 32, 10)
    assert facts.class_names[3] == "class3"
    assert len(ds.train) == 30 + 4 * 2 and len(ds.test) == 20
    # CIFAR rows are channel-major (1024 R, then G, then B): image 0 must round-trip to CHW exactly.
    with open(root / "cifar-10-batches-py" / "data_batch_1", "rb") as f:
        row = pickle.load(f, encoding="bytes")[b"data"][0]
    assert np.array_equal(ds.train.images[0], row.reshape(3, 32, 32))


def test_cifar100_fine_labels(tmp_path):
    facts, ds = run_prepare(tmp_path, name="cifar100", root=str(make_cifar100(tmp_path / "src")))
    assert facts.num_classes == 100 and facts.class_names[:2] == ["c00", "c01"]
    assert facts.counts["train"] == [2] * 100


def test_imagefolder_sorted_classes_and_resize(tmp_path):
    root = make_imagefolder(tmp_path / "src", classes=("zebra", "ant", "mole"), size=12)
    facts, ds = run_prepare(tmp_path, name="imagefolder", root=str(root), image_size=16)
    assert facts.class_names == ["ant", "mole", "zebra"]
    assert (facts.channels, facts.height, facts.width) == (3, 16, 16)
    assert facts.counts == {"train": [3, 3, 3], "test": [3, 3, 3]}


def test_imagefolder_grayscale_stays_one_channel(tmp_path):
    facts, _ = run_prepare(tmp_path, name="imagefolder", root=str(make_imagefolder(tmp_path / "s", mode="L")))
    assert facts.channels == 1


def test_npz_with_and_without_test_arrays(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8), np.repeat(np.arange(4), 10)
    np.savez(tmp_path / "full.npz", x_train=x, y_train=y, x_test=x[:8], y_test=y[::5],
             class_names=np.array(["a", "b", "c", "d"]))
    facts, ds = run_prepare(tmp_path, name="npz", root=str(tmp_path / "full.npz"))
    assert facts.class_names == ["a", "b", "c", "d"] and ds.train.images.shape == (40, 3, 8, 8)
    assert np.array_equal(ds.train.images[5], x[5].transpose(2, 0, 1))
    np.savez(tmp_path / "train_only.npz", x_train=x[..., 0], y_train=y)
    facts, ds = run_prepare(tmp_path, name="npz", root=str(tmp_path / "train_only.npz"), test_size=8)
    assert facts.channels == 1 and facts.counts["test"] == [2, 2, 2, 2]


# --- clear errors ------------------------------------------------------------------------------

def expect_error(tmp_path, match, **cfg):
    with pytest.raises(DataError, match=match):
        run_prepare(tmp_path, **cfg)


def test_missing_root(tmp_path):
    expect_error(tmp_path, r"dataset.root: .*nowhere does not exist", name="cifar10", root=str(tmp_path / "nowhere"))


def test_wrong_format(tmp_path):
    (tmp_path / "src").mkdir()
    expect_error(tmp_path, r"data_batch_1: missing \(expected the standard CIFAR python batches\)",
                 name="cifar10", root=str(tmp_path / "src"))
    np.savez(tmp_path / "bad.npz", images=np.zeros((2, 4, 4), np.uint8))
    expect_error(tmp_path, r"bad.npz: expected arrays x_train, y_train", name="npz", root=str(tmp_path / "bad.npz"))
    np.savez(tmp_path / "float.npz", x_train=np.zeros((2, 4, 4)), y_train=np.zeros(2, int))
    expect_error(tmp_path, r"x_train must be uint8", name="npz", root=str(tmp_path / "float.npz"))


def test_corrupt_files(tmp_path):
    root = make_cifar10(tmp_path / "src")
    f = root / "cifar-10-batches-py" / "data_batch_3"
    f.write_bytes(f.read_bytes()[:100])
    expect_error(tmp_path, r"data_batch_3: corrupt", name="cifar10", root=str(root))
    folder = make_imagefolder(tmp_path / "imgs")
    (folder / "train" / "dog" / "1.png").write_bytes(b"\x89PNG not really")
    expect_error(tmp_path, r"train/dog/1.png: corrupt or unreadable image", name="imagefolder", root=str(folder))


def test_class_absent_from_a_split(tmp_path):
    folder = make_imagefolder(tmp_path / "imgs")
    for p in (folder / "val" / "emu").iterdir():
        p.unlink()
    expect_error(tmp_path, r"class\(es\) 'emu' absent from the test split", name="imagefolder", root=str(folder))


def test_prepared_format_errors_name_the_file(tmp_path):
    run_prepare(tmp_path)
    (out,) = tmp_path.glob("prepared-*")
    (out / "test_labels.npy").unlink()
    with pytest.raises(DataError, match="test_labels.npy: missing"):
        load_prepared(out)
    with pytest.raises(DataError, match="facts.json: not found"):
        load_prepared(tmp_path)
