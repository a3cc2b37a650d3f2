"""`edc evaluate`: a condensed set and an image folder from elsewhere, several architectures, soft and
hard labels, the same recipe; the table and its JSON."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from edc.crosseval import class_index, cross_evaluate, folder_as_set, is_imagefolder, results_json, table
from edc.errors import EdcError
from edc.export import export_imagefolder
from edc.params import parse_params
from edc.shards import load_condensed
from tests.helpers import FACTS, teachers, tiny_params, toy_data, write_set


def prepared():
    """A prepared dataset of 12 toy images in the set's facts (4 classes, 3 x 10 x 10)."""
    split = toy_data(12, seed=3, classes=4, channels=3, size=10)
    return SimpleNamespace(facts=FACTS, has_val=False, view=lambda name: split)


def params():
    d = tiny_params()
    d["evaluate"].update(seeds=2, eval_every=100)
    d["relabel"].update(epochs=2, batch_size=4, min_steps=0)
    return parse_params(d)


def test_sets_and_folders_across_architectures_soft_and_hard(tmp_path):
    write_set(tmp_path / "set", epochs=2)
    export_imagefolder(tmp_path / "set", tmp_path / "folder")
    assert is_imagefolder(tmp_path / "folder") and not is_imagefolder(tmp_path / "set")
    lines = []
    res = cross_evaluate([str(tmp_path / "set"), str(tmp_path / "folder")], ["student", "torchvision:resnet18"],
                         ["soft", "hard"], params(), prepared(), teachers=teachers(), device=torch.device("cpu"),
                         say=lines.append)
    assert len(lines) == 2 * 2 * 2 * 2  # sets x archs x kinds x seeds
    js = results_json(res)
    for src in js:
        for arch in ("student", "torchvision:resnet18"):
            for kind in ("soft", "hard"):
                cell = js[src][arch][kind]
                assert len(cell["seeds"]) == 2 and 0 <= cell["acc_mean"] <= 1
    text = table(res, ["student", "torchvision:resnet18"], ["soft", "hard"])
    rows = [ln for ln in text.splitlines() if ln.startswith(f"| {tmp_path}")]
    assert "| set | student | torchvision:resnet18 |" in text and len(rows) == 2
    assert all(ln.count(" / ") == 2 and ln.count(" ± ") == 4 for ln in rows)


def test_a_folder_gets_the_relabel_plan_and_the_teachers_labels(tmp_path):
    write_set(tmp_path / "set", epochs=2)
    export_imagefolder(tmp_path / "set", tmp_path / "folder")
    p = params()
    out = folder_as_set(tmp_path / "folder", FACTS, p.relabel, teachers(), seed=p.seed, out=tmp_path / "as-set")
    ds = load_condensed(out)
    assert ds.epochs == 2 and ds.batch_size == 4 and len(ds.images_u8) == 10
    src = load_condensed(tmp_path / "set")
    by_class = torch.argsort(src.hard, stable=True)  # the folder lists class by class, ids in order
    assert torch.equal(ds.images_u8, src.images_u8[by_class]) and torch.equal(ds.hard, src.hard[by_class])
    from edc.relabel import teacher_logits

    for x, t, _ in ds.epoch(1):  # the stored labels are the teachers' logits on the planned views
        torch.testing.assert_close(t, teacher_logits(teachers(), x).half().float(), rtol=0, atol=0)
    hard = load_condensed(folder_as_set(tmp_path / "folder", FACTS, p.relabel, None, seed=p.seed, out=tmp_path / "h"),
                          labels="hard")
    assert sum(len(x) for x, _, _ in hard) == 20


def test_bad_input_is_named(tmp_path):
    write_set(tmp_path / "set", epochs=2)
    export_imagefolder(tmp_path / "set", tmp_path / "folder")
    with pytest.raises(EdcError, match="no stored soft labels; name --teachers"):
        cross_evaluate([str(tmp_path / "folder")], ["student"], ["soft"], params(), prepared(), teachers=None,
                       device=torch.device("cpu"))
    with pytest.raises(EdcError, match="unknown architecture 'nope'"):
        cross_evaluate([str(tmp_path / "set")], ["nope"], ["hard"], params(), prepared(), teachers=None,
                       device=torch.device("cpu"))
    (tmp_path / "folder" / "zebra").mkdir()
    with pytest.raises(EdcError, match="zebra: not a class of toy"):
        cross_evaluate([str(tmp_path / "folder")], ["student"], ["hard"], params(), prepared(), teachers=None,
                       device=torch.device("cpu"))
    assert class_index("003_x", ["a", "b", "c", "d"], 4) == 3 and class_index("b", ["a", "b"], 2) == 1
