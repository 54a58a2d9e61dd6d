"""The heads benchmark compares like with like: the same parts, the same sizes, the same losses."""

import importlib.util
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[3] / "benchmarks" / "heads_vs_torchvision.py"


def load_benchmark():
    spec = importlib.util.spec_from_file_location("heads_vs_torchvision", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_our_parts_have_torchvisions_parameter_counts():
    counts = load_benchmark().same_config()
    assert set(counts) == {"neck", "rpn", "roi_heads"}
    for part, (ours, theirs) in counts.items():
        assert ours == theirs > 0, part


def test_both_sides_train_on_the_same_features_and_give_the_same_loss_terms():
    bench = load_benchmark()
    feats, targets = bench.inputs(64, 1)
    det, tv = bench.ours().train(), bench.TorchvisionHeads().train()
    ours, theirs = det(feats, targets), tv(feats, targets, 64)
    assert len(ours) == len(theirs) == 4
    assert all(torch.isfinite(v) for v in [*ours.values(), *theirs.values()])
