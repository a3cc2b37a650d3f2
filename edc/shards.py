"""The condensed-dataset format: WebDataset tar shards with the images, the plan and stored soft labels.

A condensed set is a directory::

    meta.json            format, set_id, dataset facts, class names, ipc, teachers, epochs,
                         batch_size, topk, cutmix, augmentation, shard names, the params that made it
    images-000000.tar    one sample per image, key img000000...:  .png (lossless), .cls (class index)
    epoch-0000.tar       one sample per batch of epoch 0, key b00000...:
                           ids.npy    int32 (B,)    image indices (the n in imgNNNNNN) in batch order
                           crops.npy  int16 (B, 5)  top, left, height, width, flip (RandomResizedCrop box)
                           mix.npy    int16 (B, 5)  CutMix partner position in the batch, x1, y1, x2, y2
                                                    (only when CutMix is on)
                           logits.npy float16 (B, K) the teachers' mean logits on the augmented batch, or,
                           topv.npy / topi.npy      with top-k labels, float16 / int32 (B, k) values and
                                                    class indices
                         and a sample ``header`` (.json: set_id, epoch, batch count) that ties the shard
                         to its set
    epoch-0001.tar ...

Everything is written with ``mtime=0`` and in a fixed order (byte-identical on rerun); keys contain no
dots; arrays are ``.npy`` (no pickle). Plain ``webdataset`` + numpy read it (README example);
:func:`load_condensed` gives a torch dataset that replays the plan with its soft labels.
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
from edc.io import dumps_json, read_json, write_json
from edc.relabel import EpochPlan, augment, batches

FORMAT = "edc-condensed/1"
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
        n_batches = (len(plan.order) + batch_size - 1) // batch_size
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
            w.write({"__key__": "header", "json": dumps_json({"set_id": self.sid, "epoch": epoch,
                                                              "batches": n_batches}).encode()})
        os.replace(tmp, self.out / name)  # a shard is complete or absent, also after a kill
        self.meta["epoch_shards"].append(name)

    def keep_epoch(self, epoch: int) -> None:
        """Count epoch ``epoch``'s shard, written by an earlier (interrupted) run, as part of the set."""
        name = epoch_shard_name(epoch)
        if not (self.out / name).is_file():
            raise ArtifactError(f"{self.out / name}: missing from the checkpoint")
        self.meta["epoch_shards"].append(name)

    def close(self) -> None:
        write_json(self.out / "meta.json", self.meta)


# --- reading ---------------------------------------------------------------------------------------

def _members(shard: Path) -> dict[str, dict[str, bytes]]:
    """{key: {extension: bytes}} of a tar shard; any tar damage is reported with the shard's name."""
    if not shard.is_file():
        raise ArtifactError(f"{shard}: missing")
    samples: dict[str, dict[str, bytes]] = {}
    try:
        with tarfile.open(shard, "r") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                key, _, ext = m.name.partition(".")
                f = tf.extractfile(m)
                data = f.read() if f else b""
                if len(data) != m.size:
                    raise tarfile.ReadError("unexpected end of data")
                samples.setdefault(key, {})[ext] = data
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise ArtifactError(f"{shard}: truncated or corrupt shard ({exc})") from None
    return samples


def _array(shard: Path, key: str, member: dict[str, bytes], ext: str) -> np.ndarray:
    if ext not in member:
        raise ArtifactError(f"{shard}: sample {key} lacks {ext}")
    try:
        return np.load(io.BytesIO(member[ext]), allow_pickle=False)
    except ValueError as exc:
        raise ArtifactError(f"{shard}: sample {key}: unreadable {ext} ({exc})") from None


def read_meta(path: str | Path) -> dict[str, Any]:
    f = Path(path) / "meta.json"
    if not f.is_file():
        raise ArtifactError(f"{f}: missing; is {path} a condensed set written by the relabel stage?")
    meta = read_json(f)
    if meta.get("format") != FORMAT:
        raise ArtifactError(f"{f}: format {meta.get('format')!r}, this version reads {FORMAT!r}")
    return meta


def read_images(path: str | Path, meta: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """All images (uint8 (N, C, H, W)) and hard labels of a condensed set, checked against meta.json."""
    from PIL import Image

    path = Path(path)
    facts = meta["dataset"]
    images, labels = [], []
    for name in meta["image_shards"]:
        shard = path / name
        for key, member in sorted(_members(shard).items()):
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
    shard = Path(path) / epoch_shard_name(epoch)
    if not shard.is_file():
        raise ArtifactError(f"{shard}: missing (meta.json lists {meta['epochs']} epochs)")
    samples = _members(shard)
    header = samples.pop("header", {}).get("json")
    if header is None:
        raise ArtifactError(f"{shard}: no header sample (truncated, or not an epoch shard of this format)")
    h = json.loads(header)
    if h.get("set_id") != meta["set_id"]:
        raise ArtifactError(f"{shard}: belongs to another condensed set (set_id {h.get('set_id')}, meta.json has "
                            f"{meta['set_id']})")
    if h.get("epoch") != epoch:
        raise ArtifactError(f"{shard}: holds epoch {h.get('epoch')}, expected epoch {epoch}")
    if len(samples) != h["batches"]:
        raise ArtifactError(f"{shard}: {len(samples)} batches, its header says {h['batches']} (truncated?)")
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
    (B, K) float32; ``labels="hard"``: targets are the hard labels."""

    def __init__(self, path: str | Path, labels: str = "soft"):
        if labels not in ("soft", "hard"):
            raise ValueError(f"labels must be 'soft' or 'hard', got {labels!r}")
        self.path, self.labels = Path(path), labels
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

    def epoch(self, e: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        for b in read_epoch(self.path, self.meta, e):
            ids = torch.from_numpy(b["ids"])
            mix = None if b["mix"] is None else torch.from_numpy(b["mix"])
            x = augment(self.images[ids], torch.from_numpy(b["crops"]), mix)
            y = self.hard[ids]
            yield x, (torch.from_numpy(b["logits"]) if self.labels == "soft" else y), y

    def __iter__(self):
        for e in range(self.epochs):
            yield from self.epoch(e)


def load_condensed(path: str | Path, labels: str = "soft") -> CondensedDataset:
    """Open a condensed set (a directory of shards + meta.json) as a torch dataset; see
    :class:`CondensedDataset`."""
    return CondensedDataset(path, labels)
