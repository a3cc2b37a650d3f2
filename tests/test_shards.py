"""The condensed-dataset format: stored soft labels replay exactly, bad shards are named, plain
webdataset reads it."""

from __future__ import annotations

import io
import re
import shutil
import tarfile

import numpy as np
import pytest
import torch
from torch import nn

from edc.data import DatasetFacts, normalize
from edc.errors import ArtifactError
from edc.io import md5_file
from edc.plan import augment, batches, crop_resize, make_plan, sample_boxes
from edc.relabel import teacher_logits
from edc.shards import CondensedWriter, LabelLayout, load_condensed, read_meta
from tests.helpers import FACTS, ROOT, teachers, toy_images, write_set


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
    assert names == ["images-000000.tar", "labels-000000.tar", "meta.json"]
    assert all(md5_file(tmp_path / "a" / n) == md5_file(tmp_path / "b" / n) for n in names)
    for name in names[:2]:
        with tarfile.open(tmp_path / "a" / name) as tf:
            members = tf.getmembers()
        assert {m.mtime for m in members} == {0}
        assert all(m.name.endswith(".npy") and m.name.count(".") == 2 for m in members)  # keys have no dots


def test_bad_shards_are_named(tmp_path):
    write_set(tmp_path / "s")
    write_set(tmp_path / "other", seed=1, images=toy_images(seed=5))
    s = tmp_path / "s"
    # truncated label shards: inside a member's header, inside an array, in the end-of-archive blocks
    data = (s / "labels-000000.tar").read_bytes()
    for cut, said in ((300, r"truncated or corrupt shard"), (700, r"truncated or corrupt shard"),
                      (len(data) - 512, r"altered or truncated")):
        (s / "labels-000000.tar").write_bytes(data[:cut])
        with pytest.raises(ArtifactError, match=r"labels-000000.tar: .*" + said):
            list(load_condensed(s).epoch(1))
    # a label shard from another condensed set
    shutil.copy(tmp_path / "other" / "labels-000000.tar", s / "labels-000000.tar")
    with pytest.raises(ArtifactError, match=r"labels-000000.tar: belongs to another condensed set"):
        list(load_condensed(s).epoch(2))
    # a missing label shard, an epoch the set does not have
    (s / "labels-000000.tar").unlink()
    with pytest.raises(ArtifactError, match=r"labels-000000.tar: missing \(one of the 1 label shards meta"):
        list(load_condensed(s).epoch(0))
    with pytest.raises(ArtifactError, match=r"epoch 3: meta.json lists 3 epochs"):
        list(load_condensed(s).epoch(3))
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


@pytest.mark.parametrize("codec", ["int8", "float16"])
def test_readme_example_reads_a_set_with_plain_webdataset(tmp_path, monkeypatch, codec):
    """The README's example, run as written against a condensed set of two label shards, gives the
    project reader's images, views and labels, for the default int8 logits and for float16."""
    write_set(tmp_path / "condensed" / "shards", epochs=5, stored=3, shard_bytes=400, codec=codec)
    readme = (ROOT / "README.md").read_text()
    code = re.search(r"<!-- webdataset-example -->\s*```python\n(.*?)```", readme, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    ds = load_condensed(tmp_path / "condensed" / "shards")
    assert len(ds.meta["label_shards"]) == 2
    assert np.array_equal(scope["images"], ds.images_u8.numpy()) and np.array_equal(scope["hard"], ds.hard.numpy())
    from edc.shards import read_epoch

    for epoch in range(5):
        e = epoch % 3
        for b, start in zip(read_epoch(ds.path, ds.meta, epoch), range(0, 10, 4)):
            assert np.array_equal(scope["ids"][e, start:start + 4], b["ids"])
            assert np.array_equal(scope["crops"][e, start:start + 4], b["crops"])
            assert np.array_equal(scope["logits"][e, start:start + 4], b["logits"])
    # the loop's last batch: epoch 4 replays stored epoch 1, images 8 and 9
    last = read_epoch(ds.path, ds.meta, 4)[-1]
    assert np.array_equal(scope["batch_images"], ds.images_u8.numpy()[last["ids"]])
    want = torch.softmax(torch.from_numpy(last["logits"]) / 4.0, 1).numpy()
    np.testing.assert_allclose(scope["soft"], want, rtol=1e-5, atol=1e-6)


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


def test_label_layout_gives_each_shard_consecutive_epochs_and_the_last_one_the_rest(tmp_path):
    layout = LabelLayout(stored_epochs=5, per_shard=2)
    assert layout.shards == 3 and layout.names == ["labels-000000.tar", "labels-000001.tar", "labels-000002.tar"]
    assert [list(layout.epochs(j)) for j in range(3)] == [[0, 1], [2, 3], [4]]
    assert [layout.locate(e) for e in range(5)] == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0)]
    assert LabelLayout(stored_epochs=4, per_shard=4).shards == 1
    # a written set's meta.json describes the same layout: writer and reader agree
    write_set(tmp_path / "s", epochs=6, stored=5, shard_bytes=400)
    meta = read_meta(tmp_path / "s")
    got = LabelLayout.of(meta)
    assert meta["label_shards"] == got.names and got.stored_epochs == 5 and 1 <= got.per_shard < 5


def test_storage_is_counted_by_kind_and_adds_up_to_the_files(tmp_path):
    """meta.json's bytes: the arrays of each kind (counted here from the shards' members), the
    container as the rest of every file including meta.json itself, and per image per epoch."""
    write_set(tmp_path / "s", epochs=6, stored=4, cutmix=True, topk=2, shard_bytes=400)
    meta = read_meta(tmp_path / "s")
    assert meta["epochs_per_shard"] == 2 and meta["label_shards"] == ["labels-000000.tar", "labels-000001.tar"]
    files = {n: (tmp_path / "s" / n).stat().st_size for n in [*meta["shards"], "meta.json"]}
    want = {"images": 0, "labels": 0, "plan": 0}
    for name in meta["shards"]:
        with tarfile.open(tmp_path / "s" / name) as tf:
            for m in tf.getmembers():
                a = np.load(io.BytesIO(tf.extractfile(m).read()))
                kind = "images" if name.startswith("images") else \
                    "plan" if m.name.split(".")[1] in ("ids", "crops", "mix") else "labels"
                want[kind] += a.size * a.itemsize
    got = meta["bytes"]
    assert {k: got[k] for k in want} == want
    assert want["images"] == 10 * 3 * 10 * 10 + 10  # uint8 pixels and uint8 classes
    assert want["labels"] == 4 * 10 * 2 * (2 + 1)  # 4 stored epochs x 10 views x top-2 float16 values + uint8 indices
    assert want["plan"] == 4 * 10 * (1 + 5 + 5)  # uint8 ids, crops and CutMix rows
    assert got["total"] == sum(files.values()) == sum(want.values()) + got["container"]
    assert got["per_image_epoch"] == {k: round(got[k] / (10 * 6), 3) for k in ("images", "labels", "plan",
                                                                               "container", "total")}


@pytest.mark.parametrize("ipc, codec", [(1, "float16"), (10, "float16"), (10, "default")])
def test_container_is_at_most_5_percent_of_the_labels_with_default_sizes(tmp_path, default_params, ipc, codec):
    """A set of the default shape (MNIST 28 x 28 grey, 10 classes, params.yaml's relabel plan and stored
    epochs: every epoch at ipc 1, 150 of 250 at ipc 10) with all logits, in float16 and in params.yaml's
    codec (int8: 14 bytes a view instead of 20) at the default ipc, and a card as big as the relabel stage
    writes: the container (tar framing, .npy headers, meta.json) is at most 5 % of the label payload."""
    from edc.data import DatasetFacts as Facts
    from edc.params import Params
    from edc.plan import planned_epochs, stored_epochs

    cfg = Params.model_validate(default_params).relabel
    if codec != "default":
        cfg = cfg.model_copy(update={"codec": codec})
    assert (ipc, codec) != (10, "default") or (default_params["ipc"], cfg.codec) == (10, "int8")
    n = 10 * ipc
    epochs = planned_epochs(cfg.epochs, cfg.min_steps, n, cfg.batch_size)
    stored = stored_epochs(cfg.label_epochs, epochs, cfg.label_views, ipc)
    facts = Facts(name="mnist5k", channels=1, height=28, width=28, num_classes=10,
                  class_names=[str(i) for i in range(10)], mean=[0.13], std=[0.31],
                  counts={"train": [400] * 10, "test": [100] * 10})
    meta = {"dataset": facts.to_dict(), "class_names": facts.class_names, "num_classes": 10, "ipc": ipc,
            "teachers": cfg.teachers, "epochs": epochs, "stored_epochs": stored, "batch_size": cfg.batch_size,
            "codec": cfg.codec, "topk": cfg.topk, "cutmix": cfg.cutmix, "aug": cfg.aug.model_dump(),
            "params": {"seed": 0, "relabel": cfg.model_dump(), "synthesis": {  # as stages/relabel.py writes it
                "alpha": 0.5, "seed": 0, "params": default_params["synth"], "init": "rded", "dataset": "mnist5k",
                "ipc": ipc}}}
    g = torch.Generator().manual_seed(0)
    u8 = torch.randint(0, 256, (n, 1, 28, 28), generator=g, dtype=torch.uint8)
    w = CondensedWriter(tmp_path, u8, torch.arange(n) % 10, meta)
    for e in range(stored):
        plan = make_plan(n, 28, 28, cfg.batch_size, cfg.aug.scale_min, cfg.aug.flip, cutmix=cfg.cutmix, gen=g)
        w.write_epoch(e, plan, cfg.batch_size, torch.randn(n, 10, generator=g), cfg.topk)
    w.close()
    b = read_meta(tmp_path)["bytes"]
    per_view = {"float16": 10 * 2, "int8": 10 + 2 + 2}[cfg.codec]
    assert (stored, b["labels"]) == ({1: 1000, 10: 150}[ipc], n * stored * per_view)
    assert b["container"] <= 0.05 * b["labels"], b
    print(f"ipc {ipc} {cfg.codec}: {b}")  # the figures docs/format.md quotes (pytest -s)


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
        plan = make_plan(8, 28, 28, 4, 0.5, False, cutmix=False, gen=torch.Generator().manual_seed(e))
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


def _stored_arrays(path) -> dict[str, np.ndarray]:
    """Every label shard's arrays, read with tarfile and numpy alone, concatenated over the shards."""
    meta = read_meta(path)
    got: dict[str, list] = {}
    for name in meta["label_shards"]:
        with tarfile.open(path / name) as tf:
            for m in tf.getmembers():
                got.setdefault(m.name.split(".")[1], []).append(np.load(io.BytesIO(tf.extractfile(m).read())))
    return {k: np.concatenate(v) for k, v in got.items()}


def _brute_force_decode(a: dict[str, np.ndarray], k: int) -> np.ndarray:
    """Dense float32 logits from the stored arrays, one view at a time, as the format's docstring says."""
    epochs, n = a["ids"].shape
    out = np.full((epochs, n, k), -np.inf, dtype=np.float32)
    for e in range(epochs):
        for v in range(n):
            if "q" in a:
                values = [float(a["offset"][e, v]) + float(a["scale"][e, v]) * int(q) for q in a["q"][e, v]]
            else:
                values = [float(x) for x in a["topv" if "topi" in a else "logits"][e, v]]
            classes = [int(c) for c in a["topi"][e, v]] if "topi" in a else range(k)
            for c, x in zip(classes, values):
                out[e, v, c] = x
    return out


@pytest.mark.parametrize("codec, topk", [("float16", 0), ("float16", 2), ("int8", 0), ("int8", 3)])
def test_label_codecs_decode_as_a_brute_force_reading_of_the_arrays(tmp_path, codec, topk):
    """Each codec: the reader's labels are the brute-force decode of the stored arrays; those are the
    teachers' logits on the replayed views to the codec's precision (float16 rounding; int8: within
    half a step of the row's scale); top-k keeps the k largest with uint8 class indices."""
    plans = write_set(tmp_path / "s", epochs=3, topk=topk, codec=codec, cutmix=False, shard_bytes=300)
    ds = load_condensed(tmp_path / "s")
    assert len(ds.meta["label_shards"]) > 1
    a = _stored_arrays(tmp_path / "s")
    want = _brute_force_decode(a, 4)
    if topk:
        assert a["topi"].dtype == np.uint8 and a["topi"].shape == (3, 10, topk)
    if codec == "int8":
        assert a["q"].dtype == np.uint8 and a["scale"].dtype == a["offset"].dtype == np.float16
    for e in range(3):
        got = list(ds.epoch(e))
        stored = torch.cat([b[1] for b in got]).numpy()
        np.testing.assert_array_equal(stored, want[e])
        fresh = teacher_logits(teachers(), plans[e][1]).numpy()
        top = np.argsort(-fresh, axis=1, kind="stable")[:, :topk or 4]
        kept = np.take_along_axis(stored, top, 1)
        assert np.isfinite(kept).all() and np.isinf(stored).sum() == 10 * (4 - (topk or 4))
        exact = np.take_along_axis(fresh, top, 1)
        if codec == "float16":
            np.testing.assert_array_equal(kept, exact.astype(np.float16).astype(np.float32))
        else:
            step = a["scale"][e].astype(np.float32)[:, None]
            assert (np.abs(kept - exact) <= step / 2 + 1e-5).all()
            assert (np.abs(kept - exact) > 0).any()  # 8 bits do lose something


def test_int8_rows_span_their_values_and_constant_rows_survive():
    from edc.shards import decode_labels, encode_labels

    logits = np.array([[[-3.2, 0.0, 7.7, 1.1], [2.5, 2.5, 2.5, 2.5], [1e-3, -1e-3, 0.0, 5e-4]]], dtype=np.float32)
    enc = encode_labels(logits, "int8", 0)
    assert enc["q"].min() == 0 and enc["q"][0, 0].max() == 255  # the row's range uses all 8 bits
    dec = decode_labels(enc, "int8", 4)
    assert (np.abs(dec - logits) <= enc["scale"].astype(np.float32)[..., None] / 2 + 1e-6).all()
    assert dec[0, 1].tolist() == [2.5] * 4


def test_fewer_stored_epochs_are_replayed_in_order_with_their_own_views(tmp_path):
    """label_epochs: 7 training epochs over 3 stored ones. Epoch e replays stored epoch e % 3: the very
    views its labels were computed on (the teachers, run again on the replayed views, give the stored
    labels), and only 3 epochs' plans and labels are stored."""
    write_set(tmp_path / "s", epochs=7, stored=3)
    ds = load_condensed(tmp_path / "s")
    assert ds.epochs == 7 and ds.stored_epochs == 3 and len(ds) == 7 * 3
    assert _stored_arrays(tmp_path / "s")["ids"].shape == (3, 10)
    t = teachers()
    epochs = [list(ds.epoch(e)) for e in range(7)]
    for e, got in enumerate(epochs):
        x, stored = torch.cat([b[0] for b in got]), torch.cat([b[1] for b in got])
        torch.testing.assert_close(stored, teacher_logits(t, x).half().float(), rtol=0, atol=0)
        same = epochs[e % 3]
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(got, same))
    assert not torch.equal(epochs[0][0][0], epochs[1][0][0])  # stored epochs differ from each other


@pytest.mark.parametrize(("label_epochs", "epochs", "label_views", "ipc", "stored"), [
    (0, 1000, 1000, 1, 1000),  # ipc 1, the default budget: every epoch (one view per class each)
    (0, 250, 1000, 10, 100),   # ipc 10: 100 epochs x 10 images = 1,000 views per class
    (0, 200, 1000, 50, 20),
    (0, 500, 1000, 3, 334),    # ceil(1000 / 3): at least the budget
    (0, 250, 0, 10, 250),      # no budget: every epoch
    (0, 30, 1000, 10, 30),     # never more than the training epochs
    (0, 250, 1, 10, 1),        # at least one
    (50, 250, 1000, 10, 50),   # label_epochs, when set, is the count
    (50, 20, 1000, 10, 20),
])
def test_stored_epochs_give_each_class_label_views_views(label_epochs, epochs, label_views, ipc, stored):
    from edc.plan import stored_epochs

    assert stored_epochs(label_epochs, epochs, label_views, ipc) == stored


def test_relabel_stores_label_epochs_and_runs_teachers_on_them_only(tmp_path):
    """relabel_set with label_epochs 2 of 5 epochs: the set stores 2 epochs, each epoch_plan_logits'
    plan and logits for that epoch, and training epoch 4 replays epoch 0."""
    from edc.distributed import World
    from edc.params import RelabelParams
    from edc.relabel import epoch_plan_logits, relabel_set
    from edc.resume import Checkpointer
    from edc.shards import read_epoch

    u8, y = toy_images()
    x = normalize(u8, FACTS)
    cfg = RelabelParams(teachers=["t0", "t1"], epochs=5, batch_size=4, aug={"scale_min": 0.3, "flip": True},
                        cutmix=False, codec="int8", topk=0, label_epochs=2, shard_bytes=2**20)
    meta = {"dataset": FACTS.to_dict(), "class_names": FACTS.class_names, "num_classes": 4, "ipc": 2,
            "teachers": ["t0", "t1"], "epochs": 5, "stored_epochs": 2, "batch_size": 4, "codec": "int8", "topk": 0,
            "cutmix": False, "aug": {"scale_min": 0.3, "flip": True}, "params": {}}
    out = tmp_path / "set"
    ckpt = Checkpointer(out, "fp")
    set_meta, _ = relabel_set(u8, x, y, teachers(), cfg, seed=0, bf16=False, meta=meta, world=World(), ckpt=ckpt,
                              out=out)
    assert set_meta["stored_epochs"] == 2 and set_meta["codec"] == "int8"
    ds = load_condensed(out)
    for e in (0, 1, 4):
        plan, logits, _ = epoch_plan_logits(x, y, teachers(), cfg, 0, e % 2)
        assert torch.equal(torch.cat([torch.from_numpy(b["ids"]) for b in read_epoch(ds.path, ds.meta, e)]),
                           plan.order)
        stored = torch.cat([b[1] for b in ds.epoch(e)])
        assert (stored - logits).abs().max() < 0.1  # int8 of the same logits


def test_hard_label_sets_store_the_plan_only(tmp_path):
    from edc.shards import mean_soft_logits

    write_set(tmp_path / "s", codec="hard")
    a = _stored_arrays(tmp_path / "s")
    assert set(a) == {"ids", "crops", "mix"}
    meta = read_meta(tmp_path / "s")
    assert meta["bytes"]["labels"] == 0
    ds = load_condensed(tmp_path / "s")  # labels="soft" asked, hard is what there is
    assert ds.labels == "hard"
    x, target, hard = next(iter(ds))
    assert torch.equal(target, hard)
    write_set(tmp_path / "f")
    assert torch.equal(x, next(iter(load_condensed(tmp_path / "f")))[0])  # the same plan as a set with soft labels
    with pytest.raises(ArtifactError, match="stores hard labels only"):
        mean_soft_logits(ds)


def test_a_version_2_set_is_still_read(tmp_path):
    """A set in the previous format (one tar per epoch, a sample per batch, a PNG per image), written
    here as version 2 wrote it, gives its images, plan and top-k labels."""
    import hashlib
    import json

    import webdataset as wds
    from PIL import Image

    u8, y = toy_images()
    out = tmp_path / "v2"
    out.mkdir()
    g = torch.Generator().manual_seed(3)
    plan = make_plan(10, 10, 10, 4, 0.3, True, cutmix=False, gen=g)
    logits = torch.randn(10, 4, generator=g)

    def tar(name, samples):
        with wds.TarWriter(str(out / name), encoder=False, mtime=0) as w:
            for s in samples:
                w.write(s)

    def png(img):
        buf = io.BytesIO()
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(buf, format="PNG")
        return buf.getvalue()

    def npy(a):
        buf = io.BytesIO()
        np.save(buf, a)
        return buf.getvalue()

    tar("images-000000.tar", [{"__key__": f"img{i:06d}", "png": png(u8[i]), "cls": str(int(y[i])).encode()}
                              for i in range(10)])
    top = logits.topk(2, dim=1)
    tar("epoch-0000.tar", [{"__key__": f"b{j:05d}", "ids.npy": npy(ids.numpy().astype(np.int32)),
                            "crops.npy": npy(crops.numpy().astype(np.int16)),
                            "topv.npy": npy(top.values[j * 4:(j + 1) * 4].numpy().astype(np.float16)),
                            "topi.npy": npy(top.indices[j * 4:(j + 1) * 4].numpy().astype(np.int32))}
                           for j, (ids, crops, _) in enumerate(batches(plan, 4))])
    from edc.shards import set_id

    shards = {n: {"sha256": hashlib.sha256((out / n).read_bytes()).hexdigest(), "bytes": 0}
              for n in ("images-000000.tar", "epoch-0000.tar")}
    (out / "meta.json").write_text(json.dumps({
        "format": "edc-condensed/2", "set_id": set_id(u8, y), "num_images": 10, "dataset": FACTS.to_dict(),
        "class_names": FACTS.class_names, "num_classes": 4, "epochs": 1, "batch_size": 4, "batches_per_epoch": 3,
        "topk": 2, "cutmix": False, "image_shards": ["images-000000.tar"], "epoch_shards": ["epoch-0000.tar"],
        "shards": shards}))
    ds = load_condensed(out)
    assert torch.equal(ds.images_u8, u8) and torch.equal(ds.hard, y)
    got = list(ds.epoch(0))
    x = torch.cat([b[0] for b in got])
    assert torch.equal(x, torch.cat([augment(ds.images[i], c, m) for i, c, m in batches(plan, 4)]))
    stored = torch.cat([b[1] for b in got])
    want = torch.full((10, 4), -torch.inf).scatter(1, top.indices, top.values.half().float())
    assert torch.equal(stored, want)
