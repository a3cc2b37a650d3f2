"""The catalogue of bad inputs: each ends in a one-line error that names its cause (exit status 2,
no traceback), and every output written before is left exactly as it was.

Each case copies a finished tiny workspace, breaks one thing, runs one stage the way DVC runs it
(``stage_main``), and compares the md5 of every file in the workspace before and after.
"""

from __future__ import annotations

import pickle
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from edc.io import read_json, write_json
from edc.params import set_dotted
from edc.stage import stage_main
from tests.helpers import ARGS, PIPELINE, make_cifar10, make_imagefolder, md5_tree, run_stages, tiny_params, write_yaml
from tests.helpers import stage as stage_script


@pytest.fixture(scope="module")
def finished(tiny_workspace) -> Path:
    return tiny_workspace


def edit_params(work: Path, change: Callable[[dict], None]) -> None:
    p = tiny_params()
    change(p)
    write_yaml(work / "params.yaml", p)


def set_key(dotted: str, value) -> Callable[[Path], None]:
    def apply(work: Path) -> None:
        edit_params(work, lambda p: set_dotted(p, dotted, value))
    return apply


def raw_params(text_edit: Callable[[str], str]) -> Callable[[Path], None]:
    def apply(work: Path) -> None:
        f = work / "params.yaml"
        f.write_text(text_edit(f.read_text()))
    return apply


def dataset(name: str, make: Callable[[Path], Path] | None) -> Callable[[Path], None]:
    def apply(work: Path) -> None:
        root = work / "source"
        if make is not None:
            make(root)
        edit_params(work, lambda p: p["dataset"].update(name=name, root=str(root)))
    return apply


def imagefolder_with(damage: Callable[[Path], None]) -> Callable[[Path], None]:
    def make(root: Path) -> Path:
        make_imagefolder(root)
        damage(root)
        return root
    return dataset("imagefolder", make)


def npz(**arrays) -> Callable[[Path], None]:
    def apply(work: Path) -> None:
        f = work / "source.npz"
        np.savez(f, **arrays)
        edit_params(work, lambda p: p["dataset"].update(name="npz", root=str(f)))
    return apply


def cifar_wrong_shape(root: Path) -> Path:
    make_cifar10(root)
    f = root / "cifar-10-batches-py/data_batch_1"
    d = pickle.loads(f.read_bytes())
    d[b"data"] = d[b"data"][:, :2048]  # two channels' worth of pixels per row
    f.write_bytes(pickle.dumps(d))
    return root


def truncate(rel: str, keep: float = 0.5) -> Callable[[Path], None]:
    def apply(work: Path) -> None:
        f = work / rel
        data = f.read_bytes()
        f.write_bytes(data[: int(len(data) * keep)])
    return apply


def shard_from_another_set(work: Path) -> None:
    other = work / "other"
    p = tiny_params()
    p["seed"] = 7  # another split, other images: another condensed set
    run_stages(other, write_yaml(work / "other-params.yaml", p), PIPELINE[:-1])  # up to its label shards
    shutil.copy(other / "condensed/shards/labels-000000.tar", work / "condensed/shards/labels-000000.tar")
    shutil.rmtree(other)
    (work / "other-params.yaml").unlink()


def stats_of_another_checkpoint(work: Path) -> None:
    from safetensors.torch import load_file

    from edc.io import read_safetensors_metadata, save_safetensors

    f = work / "models/observers/tiny.safetensors"
    state = {k: (v + 0.01 if v.is_floating_point() else v) for k, v in load_file(str(f)).items()}
    save_safetensors(f, state, read_safetensors_metadata(f))


def observer_of_another_arch(work: Path) -> None:
    spec = read_json(work / "models/observers/tiny.json")
    spec["kwargs"]["width"] = 16
    write_json(work / "models/observers/tiny.json", spec)


def shards_of_another_dataset(work: Path) -> None:
    meta = read_json(work / "condensed/shards/meta.json")
    meta["dataset"]["name"] = "cifar10"
    write_json(work / "condensed/shards/meta.json", meta)


def junk_in_tar(rel: str) -> Callable[[Path], None]:
    def apply(work: Path) -> None:
        f = work / rel
        with tarfile.open(f, "w") as tf:
            tf.add(work / "params.yaml", arcname="e000000.ids.npy")
    return apply


# (id, stage, how to break the workspace, what the one line must say)
CASES = [
    # params
    ("unknown-key", "init", set_key("synth.iteration", 5), "params.yaml: synth.iteration: unknown key"),
    ("wrong-type", "train_observers", set_key("observers.epochs", "five"),
     "params.yaml: observers.epochs: must be an integer (got 'five')"),
    ("quoted-number", "synthesize", raw_params(lambda t: t.replace("lr: 0.05", "lr: '0.05'", 1)),
     "observers.lr: must be a number (got '0.05')"),
    ("out-of-range", "synthesize", set_key("alpha", 1.5), "params.yaml: alpha: must be <= 1.0 (got 1.5)"),
    ("yaml-syntax", "init", raw_params(lambda t: t + "\nsynth: [unclosed\n"), "params.yaml: YAML syntax error at line"),
    ("teacher-not-an-observer", "relabel", set_key("relabel.teachers", ["ghost"]),
     "relabel.teachers[0]: 'ghost' is not among observers.models (tiny)"),
    ("topk-too-large", "relabel", set_key("relabel.topk", 10), "relabel.topk: must be < the 10 classes"),
    ("mse-needs-all-logits", "post_evaluate",
     lambda w: edit_params(w, lambda p: (p["evaluate"].update(loss="mse_ce"), p["relabel"].update(topk=3))),
     "evaluate.loss: mse_ce regresses all logits; it needs relabel.topk: 0"),
    ("eval-batch-not-in-plan", "post_evaluate", set_key("relabel.batch_size", 5),
     "condensed/shards: its stored plan has batch_size 8, but params.yaml asks for relabel.batch_size: 5"),
    ("stats-of-other-crops", "synthesize", set_key("synth.aug.scale_min", 0.3),
     "targets collected under synth.aug {flip: False, scale_min: 0.5}, but synth.aug is "
     "{flip: False, scale_min: 0.3}; rerun collect_stats"),
    ("stats-of-crops-for-a-jitter", "synthesize", set_key("synth.aug.kind", "jitter"),
     "targets collected under synth.aug {flip: False, scale_min: 0.5}, but synth.aug is "
     "{flip: False, jitter: 4, kind: jitter, scale_min: 0.5}; rerun collect_stats"),
    ("rded-too-few-candidates", "init", set_key("init.candidates", 3),
     "init.candidates: must be >= ipc * init.factor^2"),
    # data
    ("missing-root", "prepare", dataset("cifar10", None), "dataset.root: "),
    ("empty-class", "prepare", imagefolder_with(lambda r: [p.unlink() for p in (r / "train/dog").iterdir()]),
     "imagefolder: class(es) 'dog' absent from the train split"),
    ("corrupt-image", "prepare", imagefolder_with(lambda r: (r / "train/cat/1.png").write_bytes(b"not a png")),
     "train/cat/1.png: corrupt or unreadable image"),
    ("wrong-channel-count", "prepare",
     npz(x_train=np.zeros((20, 8, 8, 2), np.uint8), y_train=np.arange(20) % 2, class_names=np.array(["a", "b"])),
     "x_train must be (N, H, W) or (N, H, W, C) with C in (1, 3)"),
    ("cifar-rows-of-two-channels", "prepare", dataset("cifar10", cifar_wrong_shape),
     "data_batch_1: expected uint8 data of shape (N, 3072)"),
    ("label-out-of-range", "prepare",
     npz(x_train=np.zeros((20, 8, 8), np.uint8), y_train=np.arange(20) % 3, class_names=np.array(["a", "b"])),
     "y_train has labels outside [0, 2)"),
    ("prepared-file-missing", "init", lambda w: (w / "data/prepared/train_labels.npy").unlink(),
     "train_labels.npy: missing from the prepared dataset"),
    # artifacts
    ("truncated-label-shard", "post_evaluate", truncate("condensed/shards/labels-000000.tar", 0.1),
     "labels-000000.tar: "),
    ("missing-label-shard", "post_evaluate", lambda w: (w / "condensed/shards/labels-000000.tar").unlink(),
     "labels-000000.tar: missing (one of the 1 label shards meta.json lists)"),
    ("shard-of-another-set", "post_evaluate", shard_from_another_set,
     "labels-000000.tar: belongs to another condensed set"),
    ("junk-in-a-shard", "post_evaluate", junk_in_tar("condensed/shards/labels-000000.tar"), "labels-000000.tar: "),
    ("shards-of-another-dataset", "post_evaluate", shards_of_another_dataset,
     "condensed/shards/meta.json: made from cifar10 (10 classes), but the test split is mnist5k"),
    ("stats-of-another-checkpoint", "synthesize", stats_of_another_checkpoint,
     "stats/tiny.safetensors: statistics were collected from another checkpoint"),
    ("observer-of-another-arch", "relabel", observer_of_another_arch,
     "models/observers/tiny.safetensors: does not match architecture convnet"),
    ("truncated-stats", "synthesize", truncate("stats/tiny.safetensors"), "stats/tiny.safetensors: unreadable"),
    ("truncated-image-set", "relabel", truncate("condensed/images/images.npy"), "condensed/images"),
    ("nan-in-synthesis", "synthesize", set_key("synth.r_bn", 1e308), "synthesize: loss became inf at batch 0"),
]


def test_the_catalogue_has_at_least_twenty_cases():
    assert len(CASES) >= 20 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("stage,breakage,message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_gives_one_clear_line_and_keeps_earlier_outputs(finished, tmp_path, monkeypatch, capsys, stage,
                                                                   breakage, message):
    work = tmp_path / "w"
    shutil.copytree(finished, work)
    monkeypatch.chdir(work)
    breakage(work)
    before = md5_tree(work)
    main = stage_script(stage)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        stage_main(main, ["--params", "params.yaml", *ARGS[stage]])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2
    assert message in err, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert md5_tree(work) == before  # nothing written before was touched, nothing half-written was left
