"""The paper's applications: class-incremental learning and data-free slimming, on hand-made cases."""

from __future__ import annotations

import torch
from torch import nn

from edc.applications import (
    SeenClasses,
    apply_masks,
    bn_masks,
    class_groups,
    class_order,
    magnitude_masks,
    prune,
    recover,
    restrict_logits,
    seen_test,
)
from edc.shards import load_condensed
from tests.helpers import teachers, write_set


def test_class_order_is_seeded_and_groups_cover_it():
    a, b = class_order(10, 7), class_order(10, 7)
    assert a == b and sorted(a) == list(range(10)) and a != class_order(10, 8)
    assert class_groups([3, 1, 4, 0, 2], 2) == [[3, 1, 4], [0, 2]]
    assert class_groups(list(range(10)), 5) == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    assert class_groups([5, 6, 7], 3) == [[5], [6], [7]]


def test_soft_labels_restricted_to_the_seen_classes():
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0]])
    r = restrict_logits(logits, [0, 2])
    assert torch.equal(r[0, [0, 2]], torch.tensor([1.0, 3.0])) and torch.isinf(r[:, [1, 3]]).all()
    p = torch.softmax(r / 4.0, 1)  # by hand: exp(1/4) / (exp(1/4) + exp(3/4)) on class 0
    torch.testing.assert_close(p[0], torch.tensor([0.3775407, 0.0, 0.6224593, 0.0]))
    torch.testing.assert_close(p[1], torch.tensor([0.5, 0.0, 0.5, 0.0]))


def test_seen_classes_keep_only_their_views_and_labels(tmp_path):
    write_set(tmp_path / "s", epochs=2, batch_size=4, cutmix=False)  # 10 images, class = id % 4
    ds = load_condensed(tmp_path / "s")
    seen = SeenClasses(ds, [1, 3])
    full = [b for e in range(2) for b in ds.epoch(e)]
    got = [b for e in range(2) for b in seen.epoch(e)]
    want_x = torch.cat([x[torch.isin(y, torch.tensor([1, 3]))] for x, _, y in full])
    assert torch.equal(torch.cat([x for x, _, _ in got]), want_x)
    hard = torch.cat([y for _, _, y in got])
    assert set(hard.tolist()) == {1, 3} and len(hard) == 2 * 5  # ids 1, 3, 5, 7, 9 per epoch
    t = torch.cat([t for _, t, _ in got])
    assert torch.isinf(t[:, [0, 2]]).all() and torch.isfinite(t[:, [1, 3]]).all()
    x, y = seen_test((torch.zeros(8, 1), torch.arange(8) % 4), [1, 3])
    assert y.tolist() == [1, 3, 1, 3]
    # CutMix: a view whose partner is of an unseen class is dropped
    write_set(tmp_path / "c", epochs=1, batch_size=4, cutmix=True)
    dsc = load_condensed(tmp_path / "c")
    from edc.shards import read_epoch

    kept = 0
    for b in read_epoch(dsc.path, dsc.meta, 0):
        ids, partner = torch.from_numpy(b["ids"]), torch.from_numpy(b["mix"])[:, 0]
        kept += int(((ids % 4 == 1) & (ids[partner] % 4 == 1)).sum())
    assert sum(len(y) for _, _, y in SeenClasses(dsc, [1]).epoch(0)) == kept


def hand_net():
    net = nn.Sequential(nn.Conv2d(1, 4, 1, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4, 2))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([1.0, -2.0, 3.0, -4.0]).view(4, 1, 1, 1))
        net[1].weight.copy_(torch.tensor([0.5, -0.1, 2.0, 0.05]))
        net[1].bias.fill_(1.0)
        net[4].weight.copy_(torch.tensor([[0.2, -5.0, 0.3, 1.0], [6.0, 0.1, -0.4, 0.7]]))
    return net.eval()


def test_pruning_masks_on_a_hand_made_network():
    net = hand_net()
    # network slimming: the 2 smallest |gamma| of (0.5, 0.1, 2.0, 0.05) are channels 3 and 1
    m = bn_masks(net, 0.5)
    assert m["1"].tolist() == [True, False, True, False]
    pruned, masks = prune(net, "bn", 0.5)
    x = torch.randn(3, 1, 1, 1)
    h = pruned[2](pruned[1](pruned[0](x)))
    assert torch.all(h[:, [1, 3]] == 0) and torch.equal(net[1].weight, hand_net()[1].weight)  # a copy is pruned
    # magnitude: 12 weights (4 conv + 8 linear); 25% = the 3 smallest |w|: 0.1, 0.2, 0.3
    mm = magnitude_masks(net, 0.25)
    assert mm["0"].flatten().tolist() == [True, True, True, True]
    assert mm["4"].tolist() == [[False, True, False, True], [True, False, True, True]]
    p2, masks2 = prune(net, "magnitude", 0.25)
    assert (p2[4].weight == 0).sum() == 3


def test_recovery_keeps_the_pruned_weights_at_zero(tmp_path):
    write_set(tmp_path / "s", epochs=2)
    ds = load_condensed(tmp_path / "s")
    teacher = teachers()[0]
    pruned, masks = prune(teacher, "bn", 0.5)
    recover(pruned, teacher, masks, "bn", ds, epochs=2, lr=1e-2, temperature=4.0, seed=0)
    keep = masks["1"]
    assert torch.all(pruned[1].weight[~keep] == 0) and torch.all(pruned[1].bias[~keep] == 0)
    assert not torch.equal(pruned[1].weight[keep], teacher[1].weight[keep])  # the kept ones learnt
    apply_masks(pruned, masks, "bn")
