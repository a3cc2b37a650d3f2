"""``dataset.storage: files``: an image folder of JPEGs listed by prepare and decoded on the fly.

The storage is a storage choice only: every stage must see the same pixels as with ``storage:
arrays``, read a batch at a time, and give the same bytes end to end.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from edc.data import load_prepared, prepare
from edc.errors import DataError, ParamsError
from edc.io import md5_file
from edc.params import DatasetParams, load_params
from edc.stats import collect_bn_stats
from tests.helpers import make_imagefolder, run_stages, tiny_params, write_yaml

SIZES = ((20, 14), (14, 20), (16, 16), (9, 30))  # (h, w): portrait, landscape, square, small


def both(tmp_path, root: Path, workers: int = 0, **cfg):
    out = {}
    for storage in ("arrays", "files"):
        d = tmp_path / f"prepared-{storage}"
        d.mkdir()
        prepare(DatasetParams(name="imagefolder", root=str(root), storage=storage, **cfg), 0, d, workers)
        out[storage] = load_prepared(d, workers)
    return out["arrays"], out["files"]


@pytest.mark.parametrize("workers", [0, 2])
def test_files_storage_reads_the_pixels_arrays_storage_stores(tmp_path, workers):
    root = make_imagefolder(tmp_path / "jpegs", n=4, size=SIZES, ext=".jpg")
    arrays, files = both(tmp_path, root, workers, image_size=12)
    assert not (tmp_path / "prepared-files" / "train_images.npy").exists()
    assert (tmp_path / "prepared-files" / "train_files.txt").read_text().splitlines()[:2] == \
        ["train/cat/0.jpg", "train/cat/1.jpg"]
    fa, ff = arrays.facts.to_dict(), files.facts.to_dict()
    assert (ff.pop("storage"), ff.pop("root"), fa.pop("storage"), fa.pop("root")) == \
        ("files", str(root.resolve()), "arrays", None)
    assert fa == ff  # same classes, counts, and exactly the same mean/std
    for split in ("train", "test"):
        xa, ya = arrays.normalized(split)
        xf, yf = files.normalized(split)
        assert torch.equal(xa, xf) and torch.equal(ya, yf)
    order = torch.tensor([7, 0, 11, 3])
    assert torch.equal(files.take("train", order), arrays.take("train", order))


def test_files_storage_decodes_one_batch_at_a_time(tmp_path, monkeypatch):
    import edc.data.stream as stream

    root = make_imagefolder(tmp_path / "jpegs", n=10, size=12, ext=".jpg")
    _, files = both(tmp_path, root, image_size=12)
    calls = []
    real = stream.load_image
    monkeypatch.setattr(stream, "load_image", lambda *a: calls.append(a[0]) or real(*a))
    batches = iter(files.batches("train", 4))
    x, y = next(batches)
    assert x.shape == (4, 3, 12, 12) and len(calls) == 4  # the 26 other images are not read yet
    assert len(list(batches)) == 7 and len(calls) == 30


def test_arrays_storage_is_memory_mapped(tmp_path):
    root = make_imagefolder(tmp_path / "pngs", n=2)
    arrays, _ = both(tmp_path, root, image_size=12)
    assert isinstance(arrays.train.images, np.memmap)


def test_non_square_images_are_resized_by_the_shorter_side_and_centre_cropped(tmp_path):
    root = tmp_path / "bands"
    for split in ("train", "val"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            img = np.zeros((10, 30, 3), np.uint8)  # h 10, w 30: red | green | blue thirds
            img[:, :10, 0] = img[:, 10:20, 1] = img[:, 20:, 2] = 255
            Image.fromarray(img).save(root / split / c / "0.png")
    arrays, files = both(tmp_path, root, image_size=10)
    for ds in (arrays, files):
        u8 = np.asarray(ds.train.images) if ds.train.images is not None else None
        x, _ = ds.normalized("train")
        pixels = (x * torch.tensor(ds.facts.std).view(1, 3, 1, 1) + torch.tensor(ds.facts.mean).view(1, 3, 1, 1))
        centre = (pixels * 255).round()[:, :, :, 2:8]  # the crop is the green third (bicubic rings at its edges)
        assert torch.all(centre[:, 1] == 255) and torch.all(centre[:, 0] == 0) and torch.all(centre[:, 2] == 0)
        if u8 is not None:
            assert u8.shape == (2, 3, 10, 10)


def test_statistics_stream_equal_statistics_in_memory(tmp_path):
    from edc.models import create_model

    root = make_imagefolder(tmp_path / "jpegs", n=5, size=SIZES, ext=".jpg")
    arrays, files = both(tmp_path, root, workers=2, image_size=12)
    torch.manual_seed(0)
    model = create_model("convnet", in_channels=3, num_classes=3, image_size=12, width=8, depth=2,
                         norm="batch").eval()
    x, y = arrays.normalized("train")
    ref = collect_bn_stats(model, x, y, 3, batch_size=4)
    got = collect_bn_stats(model, files.view("train"), None, 3, batch_size=4)
    for layer, s in ref.items():
        for k in ("mean", "var", "class_mean", "class_var", "class_count"):
            assert torch.equal(getattr(got[layer], k), getattr(s, k)), (layer, k)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_corrupt_or_vanished_file_is_named(tmp_path, workers):
    root = make_imagefolder(tmp_path / "jpegs", n=3, ext=".jpg")
    (root / "train" / "dog" / "1.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    d = tmp_path / "prepared"
    d.mkdir()
    cfg = DatasetParams(name="imagefolder", root=str(root), storage="files", image_size=12)
    with pytest.raises(DataError, match=r"^[^\n]*train/dog/1.jpg: corrupt or unreadable image[^\n]*$"):
        prepare(cfg, 0, d, workers)
    (root / "train" / "dog" / "1.jpg").unlink()
    prepare(cfg, 0, d, workers)
    (root / "val" / "emu" / "2.jpg").unlink()  # the folder changed after prepare
    with pytest.raises(DataError, match=r"val/emu/2.jpg: not found \(did the image folder change after prepare"):
        load_prepared(d, workers).normalized("test")


def test_files_storage_params_checks(tmp_path):
    p = tiny_params()
    p["dataset"].update(name="cifar10", root="/somewhere", storage="files")
    with pytest.raises(ParamsError, match=r"dataset.storage: .*image folders only .*not 'cifar10'"):
        load_params(write_yaml(tmp_path / "a.yaml", p))
    p["dataset"].update(name="imagefolder", image_size=None)
    with pytest.raises(ParamsError, match=r"dataset.storage: .*needs dataset.image_size"):
        load_params(write_yaml(tmp_path / "b.yaml", p))


def test_pipeline_on_files_storage_gives_the_bytes_of_arrays_storage(tmp_path):
    """All seven stages on a JPEG folder, RDED init included: the condensed images, the stored soft
    labels and the accuracies are byte-identical whichever storage prepare used."""
    root = make_imagefolder(tmp_path / "jpegs", n=8, size=SIZES, ext=".jpg")
    out = {}
    for storage in ("arrays", "files"):
        p = tiny_params()
        p["dataset"].update(name="imagefolder", root=str(root), image_size=16, storage=storage)
        p["workers"] = 2
        p["init"].update(candidates=4, crops=2, factor=2, batch_size=8)  # RDED reads one class per chunk
        p["ipc"] = 1
        p["stats"]["batch_size"] = 5
        work = tmp_path / storage
        run_stages(work, write_yaml(tmp_path / f"{storage}.yaml", p))
        out[storage] = work
    for rel in ("stats/tiny.safetensors", "condensed/init/images.npy", "condensed/images/images.npy",
                "reports/metrics.json"):
        assert md5_file(out["arrays"] / rel) == md5_file(out["files"] / rel), rel
    shards = sorted((out["files"] / "condensed/shards").glob("*.tar"))
    assert shards and all(md5_file(f) == md5_file(out["arrays"] / "condensed/shards" / f.name) for f in shards)
