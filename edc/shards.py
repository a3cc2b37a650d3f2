"""The condensed-dataset format: WebDataset tar shards with the images, the plan and stored soft labels.

A condensed set (format ``edc-condensed/3``) is a directory::

    meta.json            format, set_id, dataset facts, class names, ipc, teachers, epochs (training),
                         stored_epochs, epochs_per_shard, batch_size, batches_per_epoch, codec, topk,
                         cutmix, augmentation, shard names, the params that made it; ``shards``: each
                         shard's sha256 and size, which ties every shard to this set; ``bytes``: the set's
                         storage (see below)
    images-000000.tar    one sample, key i000000 (its first image), as many images as fit the shard
                         size target (``shard_bytes``: relabel.shard_bytes, default SHARD_BYTES):
                           images.npy uint8 (n, C, H, W)   the images, ids first..first+n-1
                           cls.npy    uint  (n,)           their classes
    labels-000000.tar    one sample, key e000000 (its first stored epoch), for ``epochs_per_shard``
                         stored epochs (P of them; the last shard may hold fewer), N images each, the
                         plan's arrays in the smallest integer type that holds their values:
                           ids.npy    uint (P, N)        image ids in visiting order; batch b of an epoch
                                                         is positions b*batch_size .. (b+1)*batch_size-1
                           crops.npy  int  (P, N, 5)     top, left, height, width, flip of each view; with
                                                         RandAugment (P, N, 5 + 2k): k pairs of operation
                                                         index and signed magnitude bin (edc.randaugment)
                           mix.npy    uint (P, N, 5)     CutMix partner position in the batch, x1, y1, x2, y2
                                                         (only when CutMix is on)
                           the labels of each view, by ``codec`` and ``topk`` (:func:`encode_labels`):
                           float16, topk 0   logits.npy float16 (P, N, K)  the teachers' mean logits
                           float16, topk k   topv.npy   float16 (P, N, k)  the k largest, and
                                             topi.npy   uint    (P, N, k)  their classes (uint8 when K <= 256)
                           int8              q.npy      uint8   (P, N, W)  values (W = K, or k with topi.npy)
                                             scale.npy, offset.npy float16 (P, N): value = offset + scale * q
                           hard              nothing: the students train on the classes

Training epoch ``e`` replays stored epoch ``e % stored_epochs`` (:func:`edc.plan.stored_epoch`): its
views and their labels. With ``stored_epochs == epochs`` every epoch has its own views; fewer stored
epochs are reused in a fixed cycle, views and labels together, so a label always belongs to the view
it was computed on (meta.json's ``replay`` says so in words). Label shards hold whole stored epochs,
as many as fit ``shard_bytes``. A tar member costs a 512-byte header and padding to 512 bytes, so
each array of a shard is one member, and the tar's padding to a 10,240-byte record is cut: the
container is about 0.9 KB per array (header, .npy header, padding) and 1 KB per shard.

``bytes`` in meta.json: ``images`` (the image arrays), ``labels`` (the label arrays), ``plan`` (ids,
crops, mix), ``container`` (everything else: tar headers and padding, .npy headers, meta.json itself),
``total`` (all files), and ``per_image_epoch``: each divided by images x training epochs. meta.json
is compact JSON (sorted keys, no indentation, which alone would be a tenth of the container at ipc 1;
``python -m json.tool meta.json`` shows it indented).

Everything is written with ``mtime=0`` and in a fixed order (byte-identical on rerun); keys contain no
dots; arrays are ``.npy`` (no pickle). Plain ``webdataset`` + numpy read it (README example);
:func:`load_condensed` gives a torch dataset that replays the plan with its soft labels, from a
local directory, an ``http(s)://`` URL or a ``pipe:`` command (through ``webdataset.gopen``). Sets
of format ``edc-condensed/2`` (one tar per epoch, one sample per batch, one per image) are read too.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edc.data.prepared import DatasetFacts, normalize
from edc.errors import ArtifactError
from edc.io import atomic_file
from edc.plan import EpochPlan, augment, stored_epoch

FORMAT = "edc-condensed/3"
FORMAT_V2 = "edc-condensed/2"
SHARD_BYTES = 64 * 2**20  # target size of a shard: large enough that framing is noise, small enough to stream
CODECS = ("float16", "int8", "hard")


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def set_id(images_u8: torch.Tensor, labels: torch.Tensor) -> str:
    """A fingerprint of the image set, stamped into every shard that belongs to it."""
    h = hashlib.sha256(images_u8.numpy().tobytes())
    h.update(labels.numpy().astype(np.int64).tobytes())
    return h.hexdigest()[:16]


def uint_for(largest: int) -> np.dtype:
    """The smallest unsigned integer type that holds 0..``largest``."""
    for t in (np.uint8, np.uint16, np.uint32):
        if largest <= np.iinfo(t).max:
            return np.dtype(t)
    return np.dtype(np.uint64)


def int_for(values: np.ndarray) -> np.dtype:
    """The smallest integer type that holds ``values`` (unsigned when none is negative)."""
    lo, hi = int(values.min(initial=0)), int(values.max(initial=0))
    if lo >= 0:
        return uint_for(hi)
    for t in (np.int8, np.int16, np.int32):
        if np.iinfo(t).min <= lo and hi <= np.iinfo(t).max:
            return np.dtype(t)
    return np.dtype(np.int64)


# --- label codecs ----------------------------------------------------------------------------------

def _quantise(values: np.ndarray) -> dict[str, np.ndarray]:
    """8 bits per value with a per-row float16 offset and scale: value ~ offset + scale * q, q in
    0..255, offset at or below the row's minimum and offset + 255 * scale at or above its maximum, so
    every value is within scale / 2 of its decode (up to float32 rounding)."""
    lo, hi = values.min(-1), values.max(-1)
    offset = lo.astype(np.float16)
    offset = np.where(offset.astype(np.float32) > lo, np.nextafter(offset, np.float16(-np.inf)), offset)
    scale = ((hi - offset.astype(np.float32)) / 255).astype(np.float16)
    short = offset.astype(np.float32) + 255 * scale.astype(np.float32) < hi
    scale = np.where(short, np.nextafter(scale, np.float16(np.inf)), scale)
    s32 = scale.astype(np.float32)[..., None]
    q = np.where(s32 > 0, np.rint((values - offset.astype(np.float32)[..., None]) / np.where(s32 > 0, s32, 1)), 0)
    return {"q": np.clip(q, 0, 255).astype(np.uint8), "scale": scale, "offset": offset}


def encode_labels(logits: np.ndarray, codec: str, topk: int) -> dict[str, np.ndarray]:
    """The arrays (by member name, without ``.npy``) that store float32 ``logits`` (..., K) under
    ``codec`` (float16 | int8 | hard) keeping the ``topk`` largest per view (0 = all)."""
    if codec == "hard":
        return {}
    out: dict[str, np.ndarray] = {}
    values = logits.astype(np.float32)
    if topk:
        idx = np.argsort(-values, axis=-1, kind="stable")[..., :topk]
        values = np.take_along_axis(values, idx, -1)
        out["topi"] = idx.astype(uint_for(logits.shape[-1] - 1))
    if codec == "int8":
        out.update(_quantise(values))
    else:
        out["topv" if topk else "logits"] = values.astype(np.float16)
    return out


def decode_labels(arrays: dict[str, np.ndarray], codec: str, num_classes: int) -> np.ndarray | None:
    """Dense float32 logits (..., K) from :func:`encode_labels`' arrays; classes outside a top-k get
    -inf (probability 0 after softmax). None for hard labels."""
    if codec == "hard":
        return None
    if codec == "int8":
        values = arrays["offset"].astype(np.float32)[..., None] + \
            arrays["scale"].astype(np.float32)[..., None] * arrays["q"].astype(np.float32)
    else:
        values = arrays["topv" if "topi" in arrays else "logits"].astype(np.float32)
    if "topi" not in arrays:
        return values
    dense = np.full((*values.shape[:-1], num_classes), -np.inf, dtype=np.float32)
    np.put_along_axis(dense, arrays["topi"].astype(np.int64), values, axis=-1)
    return dense


def label_members(codec: str, topk: int) -> tuple[str, ...]:
    """The label arrays a shard holds under ``codec`` and ``topk``."""
    if codec == "hard":
        return ()
    values = ("q", "scale", "offset") if codec == "int8" else ("topv",) if topk else ("logits",)
    return (*values, "topi") if topk else values


def view_bytes(meta: dict[str, Any]) -> int:
    """Payload bytes of one stored view (plan row and labels) of a set described by ``meta``."""
    k, topk, codec = meta["num_classes"], meta["topk"], meta.get("codec", "float16")
    facts = meta["dataset"]
    small = uint_for(max(facts["height"], facts["width"], meta["batch_size"])).itemsize
    columns = 5 + 2 * (meta.get("aug") or {}).get("randaugment", 0) + (5 if meta["cutmix"] else 0)
    plan = uint_for(meta["num_images"] - 1).itemsize + columns * small
    width = topk or k
    labels = {"hard": 0, "float16": 2 * width, "int8": width + 4}[codec]
    return plan + labels + (uint_for(k - 1).itemsize * topk if topk and codec != "hard" else 0)


def epochs_per_shard(meta: dict[str, Any], shard_bytes: int = SHARD_BYTES) -> int:
    """How many stored epochs share a label shard: as many as fit ``shard_bytes``, at least one."""
    per_epoch = max(view_bytes(meta) * meta["num_images"], 1)
    return max(1, min(meta["stored_epochs"], shard_bytes // per_epoch))


def label_shard_name(j: int) -> str:
    return f"labels-{j:06d}.tar"


@dataclass(frozen=True)
class LabelLayout:
    """Which stored epochs each label shard holds: shard j (member :func:`label_shard_name` (j)) the
    ``per_shard`` consecutive epochs from ``j * per_shard``, the last shard the rest. The writer, the
    reader and the relabel stage's work units all take it from here."""

    stored_epochs: int
    per_shard: int

    @classmethod
    def plan(cls, meta: dict[str, Any], shard_bytes: int = SHARD_BYTES) -> LabelLayout:
        """The layout a set described by ``meta`` is written with (:func:`epochs_per_shard`)."""
        return cls(meta["stored_epochs"], epochs_per_shard(meta, shard_bytes))

    @classmethod
    def of(cls, meta: dict[str, Any]) -> LabelLayout:
        """The layout of a written set, from its meta.json."""
        return cls(meta["stored_epochs"], meta["epochs_per_shard"])

    @property
    def shards(self) -> int:
        return -(-self.stored_epochs // self.per_shard)

    @property
    def names(self) -> list[str]:
        return [label_shard_name(j) for j in range(self.shards)]

    def epochs(self, j: int) -> range:
        """The stored epochs label shard ``j`` holds."""
        return range(j * self.per_shard, min((j + 1) * self.per_shard, self.stored_epochs))

    def locate(self, stored_epoch: int) -> tuple[int, int]:
        """(the shard that holds ``stored_epoch``, its row there)."""
        return divmod(stored_epoch, self.per_shard)


def _tar_bytes(key: str, arrays: dict[str, np.ndarray]) -> bytes:
    """One WebDataset sample ``key`` of .npy members as tar bytes: mtime 0, members in the given order,
    and the end-of-archive blocks without tarfile's padding to a 10,240-byte record (readers do not
    need it; at ipc 1 it would be most of the container)."""
    import webdataset as wds

    buf = io.BytesIO()
    w = wds.TarWriter(buf, encoder=False, mtime=0, user="edc", group="edc")
    w.write({"__key__": key, **{f"{name}.npy": _npy(a) for name, a in arrays.items()}})
    end = w.tarstream.offset + 2 * tarfile.BLOCKSIZE
    w.close()
    return buf.getvalue()[:end]


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)  # a shard is complete or absent, also after a kill


class CondensedWriter:
    """Writes a condensed set: the images at once, then the stored epochs' plans and labels (by
    :meth:`write_epoch` in epoch order, or a whole label shard by :meth:`write_shard`), then meta.json
    (:meth:`close`).

    ``meta`` gives at least dataset, num_classes, epochs, batch_size, topk and cutmix; ``codec``
    (default float16) and ``stored_epochs`` (default ``epochs``) choose the label storage."""

    def __init__(self, out: str | Path, images_u8: torch.Tensor, labels: torch.Tensor, meta: dict[str, Any],
                 write_images: bool = True, shard_bytes: int = SHARD_BYTES):
        self.out = Path(out)
        self.sid = set_id(images_u8, labels)
        n = len(labels)
        self.meta = {"codec": "float16", "stored_epochs": meta["epochs"], **meta, "format": FORMAT,
                     "set_id": self.sid, "num_images": n}
        if self.meta["codec"] not in CODECS:
            raise ValueError(f"codec must be one of {CODECS}, got {self.meta['codec']!r}")
        if not 1 <= self.meta["stored_epochs"] <= self.meta["epochs"]:
            raise ValueError(f"stored_epochs must be 1..epochs ({self.meta['epochs']}), "
                             f"got {self.meta['stored_epochs']}")
        self.meta["replay"] = "training epoch e replays stored epoch e % stored_epochs (views and labels)"
        self.layout = LabelLayout.plan(self.meta, shard_bytes)
        self.meta["epochs_per_shard"] = self.layout.per_shard
        self.meta["batches_per_epoch"] = -(-n // self.meta["batch_size"])
        self.meta["label_shards"] = self.layout.names
        per_image = max(int(np.prod(images_u8.shape[1:])), 1)
        step = max(1, shard_bytes // per_image)
        self.meta["image_shards"] = [f"images-{s:06d}.tar" for s in range(-(-n // step))]
        self._pending: dict[int, tuple[EpochPlan, torch.Tensor | None]] = {}
        if not write_images:  # another process writes them (torchrun ranks > 0 write labels only)
            return
        cls_type = uint_for(max(self.meta["num_classes"] - 1, 0))
        for s, name in enumerate(self.meta["image_shards"]):
            sl = slice(s * step, (s + 1) * step)
            arrays = {"images": images_u8[sl].numpy().astype(np.uint8), "cls": labels[sl].numpy().astype(cls_type)}
            _write_atomic(self.out / name, _tar_bytes(f"i{s * step:06d}", arrays))

    def write_shard(self, j: int, epochs: list[tuple[EpochPlan, torch.Tensor | None]]) -> None:
        """Label shard ``j``: the plans of its stored epochs and the teachers' mean logits (N, K) on
        each plan's views in plan order (None for hard labels)."""
        meta = self.meta
        if len(epochs) != len(self.layout.epochs(j)):
            raise ValueError(f"label shard {j} holds {len(self.layout.epochs(j))} epochs, got {len(epochs)}")
        arrays = {"ids": np.stack([p.order.numpy() for p, _ in epochs]).astype(uint_for(meta["num_images"] - 1)),
                  "crops": np.stack([p.crops.numpy() for p, _ in epochs])}
        if meta["cutmix"]:
            arrays["mix"] = np.stack([p.mix.numpy() for p, _ in epochs])
        for name in ("crops", "mix"):  # boxes, positions and RandAugment's signed bins: small integers
            if name in arrays:
                arrays[name] = arrays[name].astype(int_for(arrays[name]))
        if meta["codec"] != "hard":
            logits = np.stack([lg.float().numpy() for _, lg in epochs])
            arrays.update(encode_labels(logits, meta["codec"], meta["topk"]))
        _write_atomic(self.out / label_shard_name(j), _tar_bytes(f"e{self.layout.epochs(j).start:06d}", arrays))

    def write_epoch(self, epoch: int, plan: EpochPlan, batch_size: int, logits: torch.Tensor | None,
                    topk: int) -> None:
        """Stored epoch ``epoch``: its plan and the teachers' mean logits (N, K) on its views in plan
        order; the shard is written once all its epochs are in. ``batch_size`` and ``topk`` must be
        meta.json's (they are the format's, checked here)."""
        if batch_size != self.meta["batch_size"] or topk != self.meta["topk"]:
            raise ValueError(f"batch_size {batch_size} / topk {topk} differ from the set's "
                             f"{self.meta['batch_size']} / {self.meta['topk']}")
        self._pending[epoch] = (plan, logits)
        j, _ = self.layout.locate(epoch)
        if all(e in self._pending for e in self.layout.epochs(j)):
            self.write_shard(j, [self._pending.pop(e) for e in self.layout.epochs(j)])

    def close(self) -> None:
        """Write meta.json, with every shard's sha256 and size and the set's storage in bytes."""
        shards, payload = {}, {"images": 0, "labels": 0, "plan": 0}
        for name in [*self.meta["image_shards"], *self.meta["label_shards"]]:
            if not (self.out / name).is_file():
                raise ArtifactError(f"{self.out / name}: missing (not written, or lost from the checkpoint)")
            data = (self.out / name).read_bytes()
            shards[name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
            for key, member in _members(self.out / name, data).items():
                for ext in member:
                    kind = ("images" if name.startswith("images") else
                            "plan" if ext in ("ids.npy", "crops.npy", "mix.npy") else "labels")
                    payload[kind] += _array(self.out / name, key, member, ext).nbytes
        self.meta["shards"] = shards
        files = sum(s["bytes"] for s in shards.values())
        size = 0
        while True:  # meta.json counts in its own container bytes: grow the size until the text fits it
            self.meta["bytes"] = storage(payload, files + size - sum(payload.values()),
                                         self.meta["num_images"] * self.meta["epochs"])
            text = json.dumps(self.meta, sort_keys=True, separators=(",", ":"), allow_nan=False) + "\n"
            if len(text.encode()) <= size:
                break
            size = len(text.encode())
        with atomic_file(self.out / "meta.json") as f:  # spaces before the final newline make up the size
            f.write(text[:-1] + " " * (size - len(text.encode())) + "\n")


def storage(payload: dict[str, int], container: int, image_epochs: int) -> dict[str, Any]:
    """meta.json's ``bytes``: payload by kind, the container, the total, and each per image per
    training epoch (``image_epochs`` = images x epochs)."""
    out: dict[str, Any] = {**payload, "container": container, "total": sum(payload.values()) + container}
    out["per_image_epoch"] = {k: round(v / max(image_epochs, 1), 3) for k, v in out.items()}
    return out


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
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:  # shards are never compressed
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
        raise ArtifactError(f"{shard}: truncated or corrupt shard ({' '.join(str(exc).split())})") from None
    return samples


def _check_sha(shard: str | Path, name: str, data: bytes, meta: dict[str, Any]) -> None:
    want = meta["shards"].get(name, {}).get("sha256")
    if hashlib.sha256(data).hexdigest() != want:
        raise ArtifactError(f"{shard}: belongs to another condensed set, or was altered or truncated (its sha256 "
                            f"differs from the one meta.json records for set {meta['set_id']})")


def _array(shard: str | Path, key: str, member: dict[str, bytes], ext: str) -> np.ndarray:
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
    if meta.get("format") not in (FORMAT, FORMAT_V2):
        raise ArtifactError(f"{where}: format {meta.get('format')!r}, this version reads {FORMAT!r} and "
                            f"{FORMAT_V2!r} (rerun relabel to rewrite the set)")
    if meta["format"] == FORMAT_V2:  # its labels are float16 or top-k float16, one stored epoch per epoch
        meta = {**meta, "codec": "float16", "stored_epochs": meta["epochs"]}
    return meta


def _shard(path: str | Path, meta: dict[str, Any], name: str, what: str = "") -> tuple[str | Path, dict]:
    """(where, {key: {extension: bytes}}) of shard ``name``, checked against meta.json's sha256."""
    shard = member_url(path, name)
    data = read_bytes(path, name, what)
    members = _members(shard, data)
    _check_sha(shard, name, data, meta)
    return shard, members


def _single(shard: str | Path, members: dict[str, dict[str, bytes]]) -> tuple[str, dict[str, bytes]]:
    if len(members) != 1:
        raise ArtifactError(f"{shard}: {len(members)} samples, the format has one per shard")
    return next(iter(members.items()))


def read_images(path: str | Path, meta: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """All images (uint8 (N, C, H, W)) and hard labels of a condensed set, checked against meta.json."""
    facts = meta["dataset"]
    if meta["format"] == FORMAT_V2:
        x, y = _read_images_v2(path, meta)
    else:
        images, labels = [], []
        for name in meta["image_shards"]:
            shard, members = _shard(path, meta, name)
            key, member = _single(shard, members)
            images.append(_array(shard, key, member, "images.npy"))
            labels.append(_array(shard, key, member, "cls.npy").astype(np.int64))
        x, y = torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))
    if len(x) != meta["num_images"]:
        raise ArtifactError(f"{path}: {len(x)} images in the image shards, meta.json says {meta['num_images']}")
    if tuple(x.shape[1:]) != (facts["channels"], facts["height"], facts["width"]):
        raise ArtifactError(f"{path}: images are {tuple(x.shape[1:])}, meta.json's dataset says "
                            f"{(facts['channels'], facts['height'], facts['width'])}")
    if set_id(x, y) != meta["set_id"]:
        raise ArtifactError(f"{path}: the image shards do not match meta.json (set_id differs)")
    return x, y


def _read_images_v2(path: str | Path, meta: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    from PIL import Image

    images, labels = [], []
    for name in meta["image_shards"]:
        shard, members = _shard(path, meta, name)
        for key, member in sorted(members.items()):
            if "png" not in member or "cls" not in member:
                raise ArtifactError(f"{shard}: sample {key} lacks its .png or .cls")
            arr = np.asarray(Image.open(io.BytesIO(member["png"])))
            images.append(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))
            labels.append(int(member["cls"]))
    if not images:
        return torch.zeros(0, dtype=torch.uint8), torch.zeros(0, dtype=torch.int64)
    return torch.from_numpy(np.stack(images)), torch.tensor(labels, dtype=torch.int64)


def _label_shard(path: str | Path, meta: dict[str, Any], j: int) -> dict[str, np.ndarray]:
    """The arrays of label shard ``j``, checked. The last two read are kept (the epochs of a shard are
    read one after the other), keyed by the set's meta.json and, for a local file, its size and time."""
    src = member_url(path, meta["label_shards"][j])
    stamp = None
    if not is_url(src) and Path(src).is_file():
        st = Path(src).stat()
        stamp = (st.st_size, st.st_mtime_ns)
    return _read_label_shard(str(path), json.dumps(meta, sort_keys=True), j, stamp)


@functools.lru_cache(maxsize=2)
def _read_label_shard(path: str, meta_json: str, j: int, stamp: tuple[int, int] | None) -> dict[str, np.ndarray]:
    meta = json.loads(meta_json)
    name = meta["label_shards"][j]
    shard, members = _shard(path, meta, name, f" (one of the {len(meta['label_shards'])} label shards meta.json lists)")
    key, member = _single(shard, members)
    n = meta["num_images"]
    held = len(LabelLayout.of(meta).epochs(j))
    names = ["ids", "crops", *(["mix"] if meta["cutmix"] else []), *label_members(meta["codec"], meta["topk"])]
    arrays = {m: _array(shard, key, member, f"{m}.npy") for m in names}
    crops = arrays["crops"]
    if arrays["ids"].shape != (held, n) or crops.ndim != 3 or crops.shape[:2] != (held, n) or crops.shape[2] < 5:
        raise ArtifactError(f"{shard}: sample {key}: ids {arrays['ids'].shape} / crops {arrays['crops'].shape}, "
                            f"meta.json says {held} epochs of {n} images")
    if arrays["ids"].max(initial=0) >= n:
        raise ArtifactError(f"{shard}: sample {key}: image ids beyond the set's {n} images")
    return arrays


def read_epoch(path: str | Path, meta: dict[str, Any], epoch: int) -> list[dict[str, np.ndarray | None]]:
    """The batches of training epoch ``epoch``: dicts with ids, crops, mix (or None) and dense float32
    logits (B, K), or None for a set of hard labels; with top-k labels the classes outside the top k
    get -inf (probability 0 after softmax). The epoch replays stored epoch ``epoch % stored_epochs``."""
    if not 0 <= epoch < meta["epochs"]:
        raise ArtifactError(f"{path}: epoch {epoch}: meta.json lists {meta['epochs']} epochs")
    if meta["format"] == FORMAT_V2:
        return _read_epoch_v2(path, meta, epoch)
    s = stored_epoch(epoch, meta["stored_epochs"])
    j, r = LabelLayout.of(meta).locate(s)
    arrays = _label_shard(path, meta, j)
    k = meta["num_classes"]
    labels = decode_labels({m: a[r] for m, a in arrays.items()}, meta["codec"], k)
    if labels is not None and labels.shape != (meta["num_images"], k):
        raise ArtifactError(f"{member_url(path, meta['label_shards'][j])}: labels {labels.shape} do not fit "
                            f"{meta['num_images']} images of {k} classes")
    bs, out = meta["batch_size"], []
    for start in range(0, meta["num_images"], bs):
        sl = slice(start, start + bs)
        out.append({"ids": arrays["ids"][r, sl].astype(np.int64), "crops": arrays["crops"][r, sl].astype(np.int64),
                    "mix": arrays["mix"][r, sl].astype(np.int64) if "mix" in arrays else None,
                    "logits": None if labels is None else labels[sl]})
    return out


def _read_epoch_v2(path: str | Path, meta: dict[str, Any], epoch: int) -> list[dict[str, np.ndarray]]:
    name = f"epoch-{epoch:04d}.tar"
    shard = member_url(path, name)
    data = read_bytes(path, name, f" (meta.json lists {meta['epochs']} epochs)")
    samples = _members(shard, data)
    if len(samples) != meta["batches_per_epoch"]:
        raise ArtifactError(f"{shard}: {len(samples)} batches, meta.json says {meta['batches_per_epoch']} per epoch "
                            f"(truncated?)")
    _check_sha(shard, name, data, meta)
    k, out = meta["num_classes"], []
    for key in sorted(samples):
        m = samples[key]
        ids = _array(shard, key, m, "ids.npy").astype(np.int64)
        arrays = {ext[:-4]: _array(shard, key, m, ext) for ext in ("topv.npy", "topi.npy", "logits.npy") if ext in m}
        logits = decode_labels(arrays, "float16", k)
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
    (B, K) float32; ``labels="hard"``: targets are the hard labels, as they are for every set stored
    with hard labels (codec ``hard``: ``self.labels`` says which the targets are).

    The items are whole batches (the plan fixes them), so a DataLoader takes ``batch_size=None``.
    ``len()`` is the number of planned batches; under a DataLoader with ``num_workers=W``, worker w
    yields the batches whose index is w modulo W, so every planned batch comes exactly once and, as
    the DataLoader takes one item from each worker in turn, in the planned order."""

    def __init__(self, path: str | Path, labels: str = "soft"):
        if labels not in ("soft", "hard"):
            raise ValueError(f"labels must be 'soft' or 'hard', got {labels!r}")
        self.path = path if is_url(path) else Path(path)
        self.meta = read_meta(path)
        self.labels = "hard" if self.meta["codec"] == "hard" else labels  # nothing else is stored
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

    @property
    def stored_epochs(self) -> int:
        """Epochs with their own views and labels; training epoch e replays e % stored_epochs."""
        return self.meta["stored_epochs"]

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
    summary for training without the plan; the plan's per-view labels are what post-evaluation uses.
    Each stored view counts once, however many training epochs replay it."""
    if ds.meta["codec"] == "hard":
        raise ArtifactError(f"{ds.path}: stores hard labels only (codec hard); there are no soft labels to average")
    k = ds.meta["num_classes"]
    total = torch.zeros(ds.meta["num_images"], k, dtype=torch.float64)
    count = torch.zeros(ds.meta["num_images"], dtype=torch.float64)
    for e in range(ds.stored_epochs):
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
