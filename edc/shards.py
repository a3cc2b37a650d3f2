"""The condensed-dataset format: WebDataset tar shards with the images, the plan and stored soft labels.

A condensed set is a directory::

    meta.json            format, set_id, dataset facts, class names, ipc, teachers, epochs,
                         batch_size, batches_per_epoch, topk, cutmix, augmentation, shard names, the
                         params that made it; ``shards``: each shard's sha256 and size, which ties
                         every shard to this set; ``bytes``: the set's storage (images, soft labels)
    images-000000.tar    one sample per image, key img000000...:  .png (lossless), .cls (class index)
    epoch-0000.tar       one sample per batch of epoch 0, key b00000...:
                           ids.npy    int32 (B,)    image indices (the n in imgNNNNNN) in batch order
                           crops.npy  int16 (B, 5)  top, left, height, width, flip (RandomResizedCrop box);
                                                    with RandAugment (B, 5 + 2k): k pairs of operation
                                                    index and signed magnitude bin (edc.randaugment)
                           mix.npy    int16 (B, 5)  CutMix partner position in the batch, x1, y1, x2, y2
                                                    (only when CutMix is on)
                           logits.npy float16 (B, K) the teachers' mean logits on the augmented batch, or,
                           topv.npy / topi.npy      with top-k labels, float16 / int32 (B, k) values and
                                                    class indices
    epoch-0001.tar ...

Epoch shards hold batch samples only (the format's version 1 had a ``header`` sample that plain
pipelines had to skip; its facts now live in meta.json), so ``wds.WebDataset(".../epoch-{0000..0999}.tar")``
yields batches and nothing else.

Everything is written with ``mtime=0`` and in a fixed order (byte-identical on rerun); keys contain no
dots; arrays are ``.npy`` (no pickle). Plain ``webdataset`` + numpy read it (README example);
:func:`load_condensed` gives a torch dataset that replays the plan with its soft labels, from a
local directory, an ``http(s)://`` URL or a ``pipe:`` command (through ``webdataset.gopen``).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edc.data.prepared import DatasetFacts, normalize
from edc.errors import ArtifactError
from edc.io import write_json
from edc.plan import EpochPlan, augment, batches

FORMAT = "edc-condensed/2"
IMAGES_PER_SHARD = 10_000


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def _png(img_u8: torch.Tensor) -> bytes:
    from PIL import Image

    arr = img_u8.permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr).save(buf, format="PNG")
    return buf.getvalue()


def set_id(images_u8: torch.Tensor, labels: torch.Tensor) -> str:
    """A fingerprint of the image set, stamped into every shard that belongs to it."""
    h = hashlib.sha256(images_u8.numpy().tobytes())
    h.update(labels.numpy().astype(np.int64).tobytes())
    return h.hexdigest()[:16]


def _tar_writer(path: Path):
    import webdataset as wds

    return wds.TarWriter(str(path), encoder=False, mtime=0, user="edc", group="edc")


def epoch_shard_name(epoch: int) -> str:
    return f"epoch-{epoch:04d}.tar"


class CondensedWriter:
    """Writes a condensed set: the images once, then one shard per epoch (call in epoch order)."""

    def __init__(self, out: str | Path, images_u8: torch.Tensor, labels: torch.Tensor, meta: dict[str, Any],
                 write_images: bool = True):
        self.out = Path(out)
        self.sid = set_id(images_u8, labels)
        self.meta = {**meta, "format": FORMAT, "set_id": self.sid, "num_images": len(labels), "epoch_shards": []}
        self.meta["image_shards"] = []
        for s, start in enumerate(range(0, len(labels), IMAGES_PER_SHARD)):
            name = f"images-{s:06d}.tar"
            self.meta["image_shards"].append(name)
            if not write_images:  # another process writes them (torchrun ranks > 0 write epochs only)
                continue
            with _tar_writer(self.out / name) as w:
                for i in range(start, min(start + IMAGES_PER_SHARD, len(labels))):
                    w.write({"__key__": f"img{i:06d}", "png": _png(images_u8[i]), "cls": str(int(labels[i])).encode()})

    def write_epoch(self, epoch: int, plan: EpochPlan, batch_size: int, logits: torch.Tensor, topk: int) -> None:
        """``logits`` (N, K) are the teachers' mean logits in plan order (aligned with ``plan.order``)."""
        name = epoch_shard_name(epoch)
        tmp = self.out / f".{name}.tmp"
        with _tar_writer(tmp) as w:
            for j, (ids, crops, mix) in enumerate(batches(plan, batch_size)):
                sample = {"__key__": f"b{j:05d}", "ids.npy": _npy(ids.numpy().astype(np.int32)),
                          "crops.npy": _npy(crops.numpy().astype(np.int16))}
                if mix is not None:
                    sample["mix.npy"] = _npy(mix.numpy().astype(np.int16))
                lg = logits[j * batch_size:(j + 1) * batch_size]
                if topk:
                    v, i = lg.topk(topk, dim=1)
                    sample["topv.npy"] = _npy(v.numpy().astype(np.float16))
                    sample["topi.npy"] = _npy(i.numpy().astype(np.int32))
                else:
                    sample["logits.npy"] = _npy(lg.numpy().astype(np.float16))
                w.write(sample)
        os.replace(tmp, self.out / name)  # a shard is complete or absent, also after a kill
        self.meta["epoch_shards"].append(name)

    def keep_epoch(self, epoch: int) -> None:
        """Count epoch ``epoch``'s shard, written by an earlier (interrupted) run, as part of the set."""
        name = epoch_shard_name(epoch)
        if not (self.out / name).is_file():
            raise ArtifactError(f"{self.out / name}: missing from the checkpoint")
        self.meta["epoch_shards"].append(name)

    def close(self) -> None:
        """Write meta.json, with every shard's sha256 and size and the set's storage in bytes."""
        shards = {}
        for name in [*self.meta["image_shards"], *self.meta["epoch_shards"]]:
            data = (self.out / name).read_bytes()
            shards[name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        images = sum(shards[n]["bytes"] for n in self.meta["image_shards"])
        labels = sum(shards[n]["bytes"] for n in self.meta["epoch_shards"])
        epochs = max(len(self.meta["epoch_shards"]), 1)
        self.meta["batches_per_epoch"] = -(-self.meta["num_images"] // self.meta["batch_size"])
        self.meta["shards"] = shards
        self.meta["bytes"] = {"images": images, "soft_labels": labels, "total": images + labels,
                              "soft_labels_per_image_epoch": round(labels / epochs / max(self.meta["num_images"], 1),
                                                                   2)}
        write_json(self.out / "meta.json", self.meta)


# --- reading ---------------------------------------------------------------------------------------

def is_url(path: str | Path) -> bool:
    """Whether ``path`` is read through ``webdataset.gopen``: ``http(s)://...`` or ``pipe:CMD``."""
    return isinstance(path, str) and ("://" in path or path.startswith("pipe:"))


def member_url(base: str | Path, name: str) -> str | Path:
    """Where file ``name`` of the set at ``base`` lives: ``base/name`` for a directory or a URL; for
    ``pipe:`` commands ``base`` holds ``{}``, replaced by the name (``pipe:aws s3 cp s3://b/set/{} -``)."""
    if isinstance(base, str) and base.startswith("pipe:"):
        if "{}" not in base:
            raise ArtifactError(f"{base}: a pipe: set needs {{}} where the file name goes, "
                                f"e.g. 'pipe:cat /sets/a/{{}}'")
        return base.replace("{}", name)
    if is_url(base):
        return f"{str(base).rstrip('/')}/{name}"
    return Path(base) / name


def read_bytes(base: str | Path, name: str, what: str = "") -> bytes:
    """The bytes of file ``name`` of the set at ``base`` (a directory, URL or pipe: command)."""
    src = member_url(base, name)
    if not is_url(src):
        if not Path(src).is_file():
            raise ArtifactError(f"{src}: missing{what}")
        return Path(src).read_bytes()
    import webdataset as wds

    try:
        with wds.gopen(str(src)) as f:
            data = f.read()
    except Exception as exc:  # curl's or the command's exit status, however gopen reports it
        raise ArtifactError(f"{src}: missing or unreadable{what} ({exc})") from None
    if not data:
        raise ArtifactError(f"{src}: missing or empty{what}")
    return data


def _members(shard: str | Path, data: bytes) -> dict[str, dict[str, bytes]]:
    """{key: {extension: bytes}} of a tar shard's bytes; any tar damage is reported with the shard's name."""
    samples: dict[str, dict[str, bytes]] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                key, _, ext = m.name.partition(".")
                f = tf.extractfile(m)
                blob = f.read() if f else b""
                if len(blob) != m.size:
                    raise tarfile.ReadError("unexpected end of data")
                samples.setdefault(key, {})[ext] = blob
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise ArtifactError(f"{shard}: truncated or corrupt shard ({exc})") from None
    return samples


def _check_sha(shard: str | Path, name: str, data: bytes, meta: dict[str, Any]) -> None:
    want = meta["shards"].get(name, {}).get("sha256")
    if hashlib.sha256(data).hexdigest() != want:
        raise ArtifactError(f"{shard}: belongs to another condensed set, or was altered or truncated (its sha256 "
                            f"differs from the one meta.json records for set {meta['set_id']})")


def _array(shard: Path, key: str, member: dict[str, bytes], ext: str) -> np.ndarray:
    if ext not in member:
        raise ArtifactError(f"{shard}: sample {key} lacks {ext}")
    try:
        return np.load(io.BytesIO(member[ext]), allow_pickle=False)
    except ValueError as exc:
        raise ArtifactError(f"{shard}: sample {key}: unreadable {ext} ({exc})") from None


def read_meta(path: str | Path) -> dict[str, Any]:
    where = member_url(path, "meta.json")
    try:
        meta = json.loads(read_bytes(path, "meta.json", f"; is {path} a condensed set written by the relabel stage?"))
    except ValueError as exc:
        raise ArtifactError(f"{where}: not JSON ({exc})") from None
    if meta.get("format") != FORMAT:
        raise ArtifactError(f"{where}: format {meta.get('format')!r}, this version reads {FORMAT!r} "
                            f"(rerun relabel to rewrite the set)")
    return meta


def read_images(path: str | Path, meta: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """All images (uint8 (N, C, H, W)) and hard labels of a condensed set, checked against meta.json."""
    from PIL import Image

    facts = meta["dataset"]
    images, labels = [], []
    for name in meta["image_shards"]:
        shard = member_url(path, name)
        data = read_bytes(path, name)
        members = _members(shard, data)
        _check_sha(shard, name, data, meta)
        for key, member in sorted(members.items()):
            if "png" not in member or "cls" not in member:
                raise ArtifactError(f"{shard}: sample {key} lacks its .png or .cls")
            arr = np.asarray(Image.open(io.BytesIO(member["png"])))
            images.append(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))
            labels.append(int(member["cls"]))
    if len(images) != meta["num_images"]:
        raise ArtifactError(f"{path}: {len(images)} images in the image shards, meta.json says {meta['num_images']}")
    x = torch.from_numpy(np.stack(images))
    y = torch.tensor(labels, dtype=torch.int64)
    if tuple(x.shape[1:]) != (facts["channels"], facts["height"], facts["width"]):
        raise ArtifactError(f"{path}: images are {tuple(x.shape[1:])}, meta.json's dataset says "
                            f"{(facts['channels'], facts['height'], facts['width'])}")
    if set_id(x, y) != meta["set_id"]:
        raise ArtifactError(f"{path}: the image shards do not match meta.json (set_id differs)")
    return x, y


def read_epoch(path: str | Path, meta: dict[str, Any], epoch: int) -> list[dict[str, np.ndarray]]:
    """The batches of one epoch: dicts with ids, crops, mix (or None) and dense float32 logits (B, K);
    with top-k labels the classes outside the top k get -inf (probability 0 after softmax)."""
    name = epoch_shard_name(epoch)
    shard = member_url(path, name)
    data = read_bytes(path, name, f" (meta.json lists {meta['epochs']} epochs)")
    samples = _members(shard, data)
    if len(samples) != meta["batches_per_epoch"]:
        raise ArtifactError(f"{shard}: {len(samples)} batches, meta.json says {meta['batches_per_epoch']} per epoch "
                            f"(truncated?)")
    _check_sha(shard, name, data, meta)
    k, topk = meta["num_classes"], meta["topk"]
    out = []
    for key in sorted(samples):
        m = samples[key]
        ids = _array(shard, key, m, "ids.npy").astype(np.int64)
        if topk:
            v, i = _array(shard, key, m, "topv.npy"), _array(shard, key, m, "topi.npy")
            logits = np.full((len(ids), k), -np.inf, dtype=np.float32)
            np.put_along_axis(logits, i.astype(np.int64), v.astype(np.float32), axis=1)
        else:
            logits = _array(shard, key, m, "logits.npy").astype(np.float32)
        if logits.shape != (len(ids), k) or ids.min(initial=0) < 0 or ids.max(initial=0) >= meta["num_images"]:
            raise ArtifactError(f"{shard}: sample {key}: labels {logits.shape} or image ids do not fit "
                                f"{meta['num_images']} images of {k} classes")
        out.append({"ids": ids, "crops": _array(shard, key, m, "crops.npy").astype(np.int64),
                    "mix": _array(shard, key, m, "mix.npy").astype(np.int64) if "mix.npy" in m else None,
                    "logits": logits})
    return out


class CondensedDataset(torch.utils.data.IterableDataset):
    """Replays a condensed set's stored plan: iterating yields, epoch after epoch, batches of
    ``(images, targets, hard_labels)`` with images augmented exactly as when the labels were made and
    normalised with the dataset's mean/std. ``labels="soft"``: targets are the stored teacher logits
    (B, K) float32; ``labels="hard"``: targets are the hard labels.

    The items are whole batches (the plan fixes them), so a DataLoader takes ``batch_size=None``.
    ``len()`` is the number of planned batches; under a DataLoader with ``num_workers=W``, worker w
    yields the batches whose index is w modulo W, so every planned batch comes exactly once and, as
    the DataLoader takes one item from each worker in turn, in the planned order."""

    def __init__(self, path: str | Path, labels: str = "soft"):
        if labels not in ("soft", "hard"):
            raise ValueError(f"labels must be 'soft' or 'hard', got {labels!r}")
        self.path, self.labels = (path if is_url(path) else Path(path)), labels
        self.meta = read_meta(path)
        self.facts = DatasetFacts.from_dict(self.meta["dataset"])
        self.images_u8, self.hard = read_images(path, self.meta)
        self.images = normalize(self.images_u8, self.facts)

    @property
    def epochs(self) -> int:
        return self.meta["epochs"]

    @property
    def batch_size(self) -> int:
        return self.meta["batch_size"]

    @property
    def batches_per_epoch(self) -> int:
        return (self.meta["num_images"] + self.batch_size - 1) // self.batch_size

    def __len__(self) -> int:
        return self.epochs * self.batches_per_epoch

    def _batch(self, b: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ids = torch.from_numpy(b["ids"])
        mix = None if b["mix"] is None else torch.from_numpy(b["mix"])
        x = augment(self.images[ids], torch.from_numpy(b["crops"]), mix, (self.facts.mean, self.facts.std))
        y = self.hard[ids]
        return x, (torch.from_numpy(b["logits"]) if self.labels == "soft" else y), y

    def epoch(self, e: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        for b in read_epoch(self.path, self.meta, e):
            yield self._batch(b)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        workers, me = (info.num_workers, info.id) if info is not None else (1, 0)
        per = self.batches_per_epoch
        for e in range(self.epochs):
            mine = [j for j in range(per) if (e * per + j) % workers == me]
            if not mine:
                continue
            batches_e = read_epoch(self.path, self.meta, e)
            for j in mine:
                yield self._batch(batches_e[j])


def load_condensed(path: str | Path, labels: str = "soft") -> CondensedDataset:
    """Open a condensed set as a torch dataset (:class:`CondensedDataset`). ``path``: the set's
    directory, an ``http(s)://`` URL of it, or a ``pipe:`` command with ``{}`` for the file name."""
    return CondensedDataset(path, labels)


def mean_soft_logits(ds: CondensedDataset) -> torch.Tensor:
    """(N, K) float32: for each image, the mean of the stored teachers' logits over every planned view
    of it (all epochs; a CutMix view counts for the image that holds the box's outside). A per-image
    summary for training without the plan; the plan's per-view labels are what post-evaluation uses."""
    k = ds.meta["num_classes"]
    total = torch.zeros(ds.meta["num_images"], k, dtype=torch.float64)
    count = torch.zeros(ds.meta["num_images"], dtype=torch.float64)
    for e in range(ds.epochs):
        for b in read_epoch(ds.path, ds.meta, e):
            ids = torch.from_numpy(b["ids"])
            logits = torch.from_numpy(b["logits"]).double()
            logits = torch.where(torch.isfinite(logits), logits, logits.new_tensor(0.0))  # top-k: unknown -> 0
            total.index_add_(0, ids, logits)
            count.index_add_(0, ids, torch.ones(len(ids), dtype=torch.float64))
    return (total / count.clamp_min(1)[:, None]).float()


class CondensedImages(torch.utils.data.Dataset):
    """Map-style view of a condensed set for users who bring their own augmentation: item i is
    ``(transform(image), target)`` with the image a uint8 (C, H, W) tensor (what torchvision
    transforms v2 take) and the target its class index (``target="hard"``) or, with
    ``target="soft"``, its :func:`mean_soft_logits` row (float32 (K,))."""

    def __init__(self, path: str | Path, target: str = "hard", transform=None):
        if target not in ("soft", "hard"):
            raise ValueError(f"target must be 'soft' or 'hard', got {target!r}")
        self.set = CondensedDataset(path, labels="soft")
        self.target, self.transform = target, transform
        self.soft = mean_soft_logits(self.set) if target == "soft" else None
        self.classes = list(self.set.meta["class_names"])

    def __len__(self) -> int:
        return len(self.set.hard)

    def __getitem__(self, i: int):
        img = self.set.images_u8[i]
        if self.transform is not None:
            img = self.transform(img)
        return img, (self.soft[i] if self.soft is not None else int(self.set.hard[i]))
