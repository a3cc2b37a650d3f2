"""The condensed-dataset format: stored soft labels replay exactly, bad shards are named, plain
webdataset reads it."""

from __future__ import annotations

import re
import shutil
import tarfile

import numpy as np
import pytest
import torch
from torch import nn

from edc.data import DatasetFacts
from edc.errors import ArtifactError
from edc.io import md5_file
from edc.plan import augment, crop_resize, make_plan, sample_boxes
from edc.relabel import teacher_logits
from edc.shards import CondensedWriter, load_condensed, read_meta
from tests.helpers import ROOT, teachers, toy_images, write_set


def test_replayed_soft_labels_equal_the_teachers_on_the_fly(tmp_path):
    plans = write_set(tmp_path / "set")
    ds = load_condensed(tmp_path / "set")
    t = teachers()
    for e in range(3):
        plan, xa = plans[e]
        got = list(ds.epoch(e))
        assert [len(b[0]) for b in got] == [4, 4, 2]
        x = torch.cat([b[0] for b in got])
        assert torch.equal(x, xa)  # the replayed augmentation is the one the labels were made on
        stored = torch.cat([b[1] for b in got])
        fresh = teacher_logits(t, x)
        torch.testing.assert_close(stored, fresh.half().float(), rtol=0, atol=0)  # float16 of the same logits
        assert torch.equal(torch.cat([b[2] for b in got]), (torch.arange(10) % 4)[plan.order])


def test_topk_keeps_the_largest_logits(tmp_path):
    write_set(tmp_path / "full")
    write_set(tmp_path / "top2", topk=2)
    full, top = load_condensed(tmp_path / "full"), load_condensed(tmp_path / "top2")
    (xf, lf, _), (xt, lt, _) = next(iter(full)), next(iter(top))
    assert torch.equal(xf, xt)
    kept = torch.isfinite(lt)
    assert kept.sum(1).tolist() == [2] * len(lt)
    assert torch.equal(lt[kept].view(-1, 2).sort(1).values, lf.topk(2, dim=1).values.sort(1).values)


def test_hard_label_mode(tmp_path):
    write_set(tmp_path / "s")
    x, target, hard = next(iter(load_condensed(tmp_path / "s", labels="hard")))
    assert torch.equal(target, hard) and target.dtype == torch.int64


def test_shards_are_byte_identical_on_rerun(tmp_path):
    write_set(tmp_path / "a")
    write_set(tmp_path / "b")
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == ["epoch-0000.tar", "epoch-0001.tar", "epoch-0002.tar", "images-000000.tar", "meta.json"]
    assert all(md5_file(tmp_path / "a" / n) == md5_file(tmp_path / "b" / n) for n in names)
    with tarfile.open(tmp_path / "a" / "epoch-0000.tar") as tf:
        members = tf.getmembers()
    assert {m.mtime for m in members} == {0}
    assert all(m.name.count(".") == 1 or m.name.endswith(".npy") and m.name.count(".") == 2 for m in members)
    assert all("." not in m.name.split(".")[0] for m in members)  # keys have no dots


def test_bad_shards_are_named(tmp_path):
    write_set(tmp_path / "s")
    write_set(tmp_path / "other", seed=1, images=toy_images(seed=5))
    s = tmp_path / "s"
    # truncated epoch shards: inside a sample, after a whole sample, in the tar's end padding
    data = (s / "epoch-0001.tar").read_bytes()
    for cut, said in ((700, r"truncated or corrupt shard"),
                      (2048, r"1 batches, meta.json says 3 per epoch \(truncated"),
                      (len(data) - 512, r"altered or truncated")):
        (s / "epoch-0001.tar").write_bytes(data[:cut])
        with pytest.raises(ArtifactError, match=r"epoch-0001.tar: .*" + said):
            list(load_condensed(s).epoch(1))
    # an epoch shard from another condensed set
    shutil.copy(tmp_path / "other" / "epoch-0002.tar", s / "epoch-0002.tar")
    with pytest.raises(ArtifactError, match=r"epoch-0002.tar: belongs to another condensed set"):
        list(load_condensed(s).epoch(2))
    # a missing epoch
    (s / "epoch-0000.tar").unlink()
    with pytest.raises(ArtifactError, match=r"epoch-0000.tar: missing \(meta.json lists 3 epochs\)"):
        list(load_condensed(s).epoch(0))
    # image shard from another set
    shutil.copy(tmp_path / "other" / "images-000000.tar", s / "images-000000.tar")
    with pytest.raises(ArtifactError, match="images-000000.tar: belongs to another condensed set"):
        load_condensed(s)
    with pytest.raises(ArtifactError, match="meta.json: missing"):
        read_meta(tmp_path)


def test_boxes_follow_random_resized_crop():
    b = sample_boxes(2000, 28, 28, (0.25, 1.0), torch.Generator().manual_seed(0))
    top, left, h, w = b.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 28).all() and (left + w <= 28).all()
    area = (h * w).float() / 784
    assert area.min() > 0.2 and area.max() <= 1.0
    x = torch.randn(2, 3, 8, 8)
    whole = torch.tensor([[0, 0, 8, 8, 0], [0, 0, 8, 8, 1]])
    out = augment(x, whole, None)
    torch.testing.assert_close(out[0], x[0])
    torch.testing.assert_close(out[1], x[1].flip(-1))
    mix = torch.tensor([[1, 0, 0, 4, 8], [0, 0, 0, 4, 8]])  # left half from the partner
    out = augment(x, whole[:1].repeat(2, 1), mix)
    torch.testing.assert_close(out[0, :, :, :4], x[1, :, :, :4])
    torch.testing.assert_close(out[0, :, :, 4:], x[0, :, :, 4:])


def test_planned_crops_are_bilinear_samples_at_the_output_pixel_centres():
    """crop_resize against a brute-force bilinear sampler (x = left + (j + 0.5) * width / W - 0.5, edge
    pixels repeated), and against torchvision's roi_align, which it replaced in the format."""
    from torchvision.ops import roi_align

    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 2, 9, 7, generator=g, dtype=torch.float64)
    boxes = torch.tensor([[0, 0, 9, 7], [2, 1, 4, 3], [0, 3, 9, 4], [5, 0, 4, 7], [1, 1, 1, 1], [3, 2, 6, 5]])
    got = crop_resize(x, *boxes.T)

    def sample(img, yy, xx):
        yy, xx = min(max(yy, 0.0), 8.0), min(max(xx, 0.0), 6.0)
        y0, x0 = int(yy), int(xx)
        y1, x1 = min(y0 + 1, 8), min(x0 + 1, 6)
        fy, fx = yy - y0, xx - x0
        return ((1 - fy) * (1 - fx) * img[:, y0, x0] + (1 - fy) * fx * img[:, y0, x1]
                + fy * (1 - fx) * img[:, y1, x0] + fy * fx * img[:, y1, x1])

    for b, (top, left, bh, bw) in enumerate(boxes.tolist()):
        for i in range(9):
            for j in range(7):
                want = sample(x[b], top + (i + 0.5) * bh / 9 - 0.5, left + (j + 0.5) * bw / 7 - 0.5)
                torch.testing.assert_close(got[b, :, i, j], want, rtol=1e-12, atol=1e-12)
    top, left, bh, bw = boxes.T.double()
    rois = torch.stack([torch.arange(6, dtype=torch.float64), left, top, left + bw, top + bh], 1)
    ref = roi_align(x, rois, output_size=(9, 7), spatial_scale=1.0, sampling_ratio=1, aligned=True)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


def test_readme_example_reads_a_shard_with_plain_webdataset(tmp_path, monkeypatch):
    """The README's example, run as written against a condensed set."""
    write_set(tmp_path / "condensed" / "shards")
    readme = (ROOT / "README.md").read_text()
    code = re.search(r"<!-- webdataset-example -->\s*```python\n(.*?)```", readme, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["images"].shape == (10, 10, 10, 3) and scope["images"].dtype == np.uint8
    assert torch.allclose(scope["soft"].sum(1), torch.ones(len(scope["soft"])))
    assert len(scope["hard"]) == 10 and scope["soft"].shape[1] == 4


def test_teacher_logits_are_the_mean_of_the_teachers_logits():
    ts = teachers()
    with torch.no_grad():
        ts[1][-1].bias += 3.0  # the two teachers differ clearly
    x = torch.randn(5, 3, 10, 10)
    with torch.no_grad():
        want = (ts[0](x) + ts[1](x)) / 2
    torch.testing.assert_close(teacher_logits(ts, x, chunk=2), want)
    torch.testing.assert_close(teacher_logits(ts[:1], x), ts[0](x).detach())


def test_cutmix_box_is_torchvisions():
    """lam ~ U(0, 1), a centre drawn uniformly, sides sqrt(1 - lam) of the image, clipped: the box
    recomputed by hand from the same generator draws."""
    import math

    from edc.plan import cutmix_box

    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        lam = float(torch.rand((), generator=g))
        cx, cy = int(torch.randint(32, (), generator=g)), int(torch.randint(24, (), generator=g))
        half_w, half_h = int(0.5 * math.sqrt(1 - lam) * 32), int(0.5 * math.sqrt(1 - lam) * 24)
        want = [max(cx - half_w, 0), max(cy - half_h, 0), min(cx + half_w, 32), min(cy + half_h, 24)]
        assert cutmix_box(24, 32, torch.Generator().manual_seed(seed)).tolist() == want
    # unclipped, the box covers 1 - lam of the image (up to the integer sides)
    areas = []
    for seed in range(400):
        x1, y1, x2, y2 = cutmix_box(1000, 1000, torch.Generator().manual_seed(seed)).tolist()
        areas.append((x2 - x1) * (y2 - y1) / 1e6)
    assert 0.2 < sum(areas) / len(areas) < 0.45  # E[1 - lam] = 0.5 before clipping to the image


def test_planned_epochs_follow_min_steps():
    from edc.plan import planned_epochs

    assert planned_epochs(200, 1000, 10, 25) == 1000  # ipc 1, 10 classes: one step per epoch
    assert planned_epochs(200, 1000, 100, 25) == 250  # ipc 10: four steps per epoch
    assert planned_epochs(200, 1000, 500, 25) == 200  # ipc 50: epochs already give 4,000 steps
    assert planned_epochs(200, 0, 10, 25) == 200
    assert planned_epochs(3, 10, 7, 2) == 3 and planned_epochs(2, 10, 7, 2) == 3  # 4 steps per epoch


@pytest.mark.parametrize("workers", [0, 2])
def test_a_dataloader_yields_every_planned_batch_once_in_order(tmp_path, workers):
    write_set(tmp_path / "s", epochs=3, batch_size=4)  # 10 images: 3 batches per epoch
    ds = load_condensed(tmp_path / "s")
    assert len(ds) == 9
    want = [(x, t, y) for e in range(3) for x, t, y in ds.epoch(e)]
    got = list(torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers))
    assert len(got) == len(want) == 9
    for (x, t, y), (wx, wt, wy) in zip(got, want):
        assert torch.equal(x, wx) and torch.equal(t, wt) and torch.equal(y, wy)


def test_a_plain_webdataset_pipeline_sees_batches_only(tmp_path):
    import webdataset as wds

    write_set(tmp_path / "s", epochs=3)
    url = str(tmp_path / "s" / "epoch-{0000..0002}.tar")
    keys = [b["__key__"] for b in wds.WebDataset(url, shardshuffle=False).decode()]
    assert keys == ["b00000", "b00001", "b00002"] * 3
    meta = read_meta(tmp_path / "s")
    assert meta["batches_per_epoch"] == 3 and set(meta["shards"]) == {
        "images-000000.tar", "epoch-0000.tar", "epoch-0001.tar", "epoch-0002.tar"}
    sizes = {n: (tmp_path / "s" / n).stat().st_size for n in meta["shards"]}
    assert meta["bytes"]["images"] == sizes["images-000000.tar"]
    assert meta["bytes"]["soft_labels"] == sum(v for n, v in sizes.items() if n.startswith("epoch"))
    assert meta["bytes"]["soft_labels_per_image_epoch"] == round(meta["bytes"]["soft_labels"] / 3 / 10, 2)


def test_a_set_is_read_and_trained_from_over_http_and_pipe(tmp_path):
    """A set served by a local HTTP server (started here) and read through a pipe: command gives the
    same batches as the directory; one epoch trains a model from the served set."""
    import functools
    import http.server
    import threading

    write_set(tmp_path / "s", epochs=2)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/s"
        local = list(load_condensed(tmp_path / "s"))
        for remote in (load_condensed(url), load_condensed(f"pipe:cat {tmp_path / 's'}/{{}}")):
            got = list(remote)
            assert len(got) == len(local) == 6
            assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(got, local))
        served = load_condensed(url)
        net = nn.Sequential(nn.Flatten(), nn.Linear(300, 4))
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        for x, t, _ in served.epoch(0):
            loss = nn.functional.kl_div(net(x).log_softmax(1), t.softmax(1), reduction="batchmean")
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert torch.isfinite(loss)
        with pytest.raises(ArtifactError, match=r"/nope/meta.json: missing or unreadable"):
            load_condensed(url.replace("/s", "/nope"))
    finally:
        server.shutdown()


def test_map_style_images_with_torchvision_transforms(tmp_path):
    from torchvision.transforms import v2

    from edc.shards import CondensedImages, mean_soft_logits, read_epoch

    write_set(tmp_path / "s", epochs=2, cutmix=False)
    tf = v2.Compose([v2.RandomHorizontalFlip(), v2.ToDtype(torch.float32, scale=True)])
    hard = CondensedImages(tmp_path / "s", transform=tf)
    assert len(hard) == 10 and hard.classes == list("abcd")
    x, y = hard[3]
    assert x.shape == (3, 10, 10) and x.dtype == torch.float32 and y == 3
    soft = CondensedImages(tmp_path / "s", target="soft")
    ds = load_condensed(tmp_path / "s")
    # brute force: every stored view's logits, averaged per image
    views = {i: [] for i in range(10)}
    for e in range(2):
        for b in read_epoch(ds.path, ds.meta, e):
            for i, lg in zip(b["ids"], b["logits"]):
                views[int(i)].append(torch.from_numpy(lg))
    for i in range(10):
        torch.testing.assert_close(soft[i][1], torch.stack(views[i]).mean(0))
    torch.testing.assert_close(mean_soft_logits(ds), torch.stack([soft[i][1] for i in range(10)]))
    loader = torch.utils.data.DataLoader(hard, batch_size=4, shuffle=True, num_workers=0)
    xb, yb = next(iter(loader))
    assert xb.shape == (4, 3, 10, 10) and yb.shape == (4,)


def test_export_imagefolder_and_the_documented_training_loop(tmp_path, monkeypatch):
    """`edc export` writes a folder torchvision's ImageFolder reads in class order, with the soft
    labels and the card; the loop in docs/format.md trains on it as written."""
    import csv
    import json

    from PIL import Image

    from edc.cli import main as cli
    from edc.shards import mean_soft_logits

    u8 = torch.randint(0, 256, (8, 1, 28, 28), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    y = torch.arange(8) % 4
    facts = DatasetFacts(name="grey", channels=1, height=28, width=28, num_classes=4,
                         class_names=["zero", "one/1", "two", "three"], mean=[0.5], std=[0.25],
                         counts={"train": [2] * 4, "test": [1] * 4})
    out = tmp_path / "set"
    out.mkdir()
    meta = {"dataset": facts.to_dict(), "class_names": facts.class_names, "num_classes": 4, "ipc": 2,
            "teachers": ["t"], "epochs": 2, "batch_size": 4, "topk": 0, "cutmix": False,
            "aug": {"scale_min": 0.5, "flip": False}, "params": {}}
    w = CondensedWriter(out, u8, y, meta)
    for e in range(2):
        plan = make_plan(8, 28, 28, 4, 0.5, False, False, torch.Generator().manual_seed(e))
        w.write_epoch(e, plan, 4, torch.randn(8, 4, generator=torch.Generator().manual_seed(e)), 0)
    w.close()
    cli(["export", str(out), str(tmp_path / "edc-set")])
    folder = tmp_path / "edc-set"
    assert sorted(p.name for p in folder.iterdir()) == ["000_zero", "001_one_1", "002_two", "003_three",
                                                         "labels.csv", "meta.json", "soft_logits.npy"]
    rows = list(csv.DictReader(open(folder / "labels.csv")))
    assert [int(r["class_index"]) for r in rows] == y.tolist()
    for r in rows:
        img = np.asarray(Image.open(folder / r["file"]))
        assert np.array_equal(img, u8[int(r["id"]), 0].numpy())
    np.testing.assert_array_equal(np.load(folder / "soft_logits.npy"), mean_soft_logits(load_condensed(out)).numpy())
    assert json.loads((folder / "meta.json").read_text())["set_id"] == read_meta(out)["set_id"]
    with pytest.raises(SystemExit):  # a non-empty target is refused (one line, exit 2)
        cli(["export", str(out), str(folder)])

    doc = (ROOT / "docs/format.md").read_text()
    code = re.search(r"<!-- imagefolder-example -->\s*```python\n(.*?)```", doc, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "docs/format.md", "exec"), scope)
    assert scope["data"].classes == ["000_zero", "001_one_1", "002_two", "003_three"]
    assert torch.isfinite(scope["loss"])
