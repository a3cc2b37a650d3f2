"""Observer training: seeded, saved as safetensors + JSON spec, reloaded exactly."""

from __future__ import annotations

import pytest
import torch

from edc.data import DatasetFacts
from edc.data.augment import shift_flip
from edc.errors import ArtifactError
from edc.io import md5_file, read_json
from edc.observers import load_observer, save_observer, train_observer
from edc.params import parse_params
from tests.helpers import tiny_params, toy_data

FACTS = DatasetFacts(name="toy", channels=1, height=12, width=12, num_classes=3, class_names=["a", "b", "c"],
                     mean=[0.5], std=[0.25], counts={"train": [20, 20, 20], "test": [5, 5, 5]})


def train_tiny(seed=0, epochs=8):
    raw = tiny_params()
    raw["observers"].update(epochs=epochs, batch_size=12)
    p = parse_params(raw)
    return p, train_observer(p.observers.models[0], p.observers, FACTS, toy_data(), toy_data(15, seed=9), seed)


def test_training_learns_and_is_seeded(tmp_path):
    p, a = train_tiny()
    _, b = train_tiny()
    _, c = train_tiny(seed=1)
    assert a.test_acc > 0.9, "a tiny convnet separates three blobs"
    for res, d in ((a, "a"), (b, "b"), (c, "c")):
        (tmp_path / d).mkdir()
        save_observer(tmp_path / d, "tiny", res.model, {"arch": "convnet"})
    assert md5_file(tmp_path / "a/tiny.safetensors") == md5_file(tmp_path / "b/tiny.safetensors")
    assert md5_file(tmp_path / "a/tiny.safetensors") != md5_file(tmp_path / "c/tiny.safetensors")
    assert [r["epoch"] for r in a.history] == list(range(1, 9))


def test_checkpoint_round_trip_and_spec(tmp_path):
    p, res = train_tiny()
    spec = p.observers.models[0]
    save_observer(tmp_path, spec.name, res.model, {"name": spec.name, "arch": spec.arch, "kwargs": dict(spec.kwargs),
                                                   "dataset": FACTS.to_dict(), "test_acc": res.test_acc})
    model, loaded = load_observer(tmp_path, spec.name)
    assert not model.training and loaded["test_acc"] == res.test_acc
    x, _ = toy_data(5)
    assert torch.equal(model(x), res.model.eval()(x))
    assert read_json(tmp_path / "tiny.json")["kwargs"] == {"width": 8, "depth": 2, "norm": "batch"}


def test_checkpoint_of_another_architecture_is_named(tmp_path):
    _, res = train_tiny()
    save_observer(tmp_path, "tiny", res.model, {"name": "tiny", "arch": "convnet", "kwargs": {"width": 16},
                                                "dataset": FACTS.to_dict()})
    with pytest.raises(ArtifactError, match=r"tiny.safetensors: does not match architecture convnet"):
        load_observer(tmp_path, "tiny")
    with pytest.raises(ArtifactError, match=r"other.json: missing"):
        load_observer(tmp_path, "other")


def test_shift_flip_is_a_seeded_translation():
    x = torch.zeros(64, 1, 9, 9)
    x[:, :, 4, 4] = 1.0  # one lit pixel in the centre
    g = torch.Generator().manual_seed(0)
    out = shift_flip(x, padding=2, flip=False, generator=g)
    pos = out.flatten(1).argmax(1)
    rows, cols = pos // 9, pos % 9
    assert out.sum() == 64  # a shift of at most the padding never drops the centre pixel
    assert rows.min() == 2 and rows.max() == 6 and cols.min() == 2 and cols.max() == 6
    assert torch.equal(out, shift_flip(x, 2, False, torch.Generator().manual_seed(0)))
    assert torch.equal(shift_flip(x, 0, False, g), x)
    ramp = torch.arange(9.0).expand(32, 1, 9, 9)
    flipped = shift_flip(ramp, 0, True, g)
    is_flipped = flipped[:, 0, 0, 0] == 8
    assert 0 < int(is_flipped.sum()) < 32 and torch.equal(flipped[is_flipped], ramp[is_flipped].flip(-1))
