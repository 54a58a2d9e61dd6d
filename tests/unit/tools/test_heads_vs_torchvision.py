"""The heads benchmark compares like with like: the same parts, the same sizes, the same losses."""

import torch
from helpers import load_benchmark


def test_our_parts_have_torchvisions_parameter_counts():
    counts = load_benchmark("heads_vs_torchvision").same_config()
    assert set(counts) == {"neck", "rpn", "roi_heads"}
    for part, (ours, theirs) in counts.items():
        assert ours == theirs > 0, part


def test_both_sides_train_on_the_same_features_and_give_the_same_loss_terms():
    bench = load_benchmark("heads_vs_torchvision")
    feats, targets = bench.inputs(64, 1)
    det, tv = bench.ours().train(), bench.TorchvisionHeads().train()
    ours, theirs = det(feats, targets), tv(feats, targets, 64)
    assert len(ours) == len(theirs) == 4
    assert all(torch.isfinite(v) for v in [*ours.values(), *theirs.values()])
