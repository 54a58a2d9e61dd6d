"""The Trainer's hook protocol and the run record, on a toy model (no detector, no data files)."""

import pytest
import torch
from torch import nn

from cachedet.core.errors import CachedetError
from cachedet.engine.distributed import DistInfo
from cachedet.engine.step import train_step
from cachedet.engine.trainer import Hook, LoopConfig, Trainer, TrainState
from cachedet.runs.checkpoint import CHECKPOINT_FORMAT
from cachedet.runs.record import RunRecord, load_run_checkpoint


class Toy(nn.Module):
    """A 'detector' with one weight: losses are (w * x - 1)^2 and |w|."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(2.0))

    def forward(self, inputs, targets, image_sizes=None):
        return {"loss_a": ((self.w * inputs["x"]).mean() - 1) ** 2, "loss_b": self.w.abs()}


class Source:
    def __init__(self, values):
        self.values = values

    def batches(self, epoch):
        for v in self.values:
            yield {"inputs": {"x": torch.full((2, 1), float(v))}, "targets": [{}, {}]}


class Recorder(Hook):
    def __init__(self):
        self.events = []

    def before_train(self, trainer):
        self.events.append("before")

    def after_step(self, trainer, record):
        self.events.append(("step", record["epoch"], record["step"], round(record["loss"], 6)))

    def after_epoch(self, trainer):
        self.events.append(("epoch", trainer.state.epoch))

    def after_train(self, trainer):
        self.events.append("after")

    def close(self):
        self.events.append("close")


def make_trainer(values, hooks, epochs=2, steps=10, state=None):
    model = Toy()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    loop = LoopConfig(epochs=epochs, steps_per_epoch=steps, seed=0)
    return Trainer(
        model,
        opt,
        sched,
        Source(values),
        loop,
        torch.device("cpu"),
        DistInfo(0, 1, 0),
        hooks,
        state=state,
    )


def test_hooks_run_in_order_and_see_every_step():
    rec = Recorder()
    state = make_trainer([1.0, 0.5, 2.0], [rec], epochs=2, steps=2).run()
    kinds = [e if isinstance(e, str) else e[:3] for e in rec.events]
    assert kinds == [  # metrics lines count epochs from 1; trainer.state.epoch is the loop's index
        "before",
        ("step", 1, 1),
        ("step", 1, 2),
        ("epoch", 0),
        ("step", 2, 3),
        ("step", 2, 4),
        ("epoch", 1),
        "after",
        "close",
    ]
    assert state.step == 4 and state.views == 8
    assert state.first_loss == pytest.approx(1.0 + 2.0)  # (2 * 1 - 1)^2 + |2|


def test_resumed_state_starts_at_its_epoch_and_step():
    rec = Recorder()
    make_trainer([1.0], [rec], epochs=3, state=TrainState(epoch=2, step=7)).run()
    assert [e for e in rec.events if isinstance(e, tuple)] == [
        ("step", 3, 8, rec.events[1][3]),
        ("epoch", 2),
    ]


def test_a_non_finite_loss_names_its_step_and_still_closes_hooks():
    rec = Recorder()
    with pytest.raises(CachedetError, match=r"the loss became (nan|inf) at step 1 \(epoch 1\)"):
        make_trainer([1.0, float("inf")], [rec]).run()
    assert rec.events[-1] == "close" and "after" not in rec.events


def test_train_step_matches_a_hand_written_step():
    a, b = Toy(), Toy()
    opt_a = torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9)
    x = {"x": torch.full((2, 1), 0.7)}
    out = train_step(a, x, [{}, {}], optimizer=opt_a, params=list(a.parameters()), clip_grad=0.5)
    losses = b(x, [{}, {}])
    loss = sum(losses.values())
    opt_b.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(list(b.parameters()), 0.5)
    opt_b.step()
    assert float(out.loss) == pytest.approx(float(loss.detach())) and set(out.losses) == {
        "loss_a",
        "loss_b",
    }
    assert float(a.w.detach()) == pytest.approx(float(b.w.detach()))


FP = {
    "feature_specs": [{"name": "c3", "channels": 8, "stride": 8}],
    "canvas": 64,
    "backbone": {
        "name": "test_resnet",
        "out_indices": None,
        "weights_sha256": "0" * 64,
        "mean": [0.5] * 3,
        "std": [0.5] * 3,
    },
    "categories": [{"id": 1, "name": "a"}],
}


def test_a_checkpoint_of_the_flat_layout_loads_as_a_run_record(tmp_path):
    old = {
        "format": CHECKPOINT_FORMAT,
        "cachedet_version": "0.1.0",
        "epoch": 3,
        "step": 12,
        "config": {"out": "r", "epochs": 4},
        "detector_config": {"head": "faster-rcnn"},
        "fingerprint": FP,
        "backbone_identity": {"name": "test_resnet"},
        "categories": [{"id": 1}],
        "augment": {"size": 64},
        "detector": {"w": torch.ones(1)},
        "backbone": None,
        "adapters": None,
        "optimizer": {"state": {}},
        "scheduler": {"last_epoch": 12},
    }
    torch.save(old, tmp_path / "last.pt")
    ckpt = load_run_checkpoint(str(tmp_path / "last.pt"))
    record = RunRecord.from_dict(ckpt["run"])
    assert record.train == {"out": "r", "epochs": 4} and record.backbone == {"name": "test_resnet"}
    assert (
        record.detector == {"head": "faster-rcnn"} and ckpt["epoch"] == 4 and ckpt["step"] == 12
    )  # 0.1 counted epochs from 0
    assert (
        torch.equal(ckpt["state"]["detector"]["w"], torch.ones(1))
        and ckpt["state"]["scheduler"]["last_epoch"] == 12
    )
    with pytest.raises(CachedetError, match="does not fit this run: .*canvas"):
        record.check_fits({**FP, "canvas": 128}, "--cache S", found_label="store")
    record.check_fits(dict(FP), "--cache S", found_label="store")  # the same features fit


def window_lines(values, log_every, epochs=2):
    rec = []

    class Lines(Hook):
        def after_step(self, trainer, record):
            rec.append(record)

    trainer = make_trainer(values, [Lines()], epochs=epochs, steps=10)
    trainer.loop.log_every = log_every
    return trainer.run(), rec


def test_logging_every_n_steps_gives_the_window_means_of_per_step_logging():
    values = [1.0, 0.5, 2.0, 0.3, 1.5]
    state_1, per_step = window_lines(values, 1)
    state_3, windows = window_lines(values, 3)
    # windows close every 3 steps and at each epoch's end: steps 3, 5 | 8, 10
    assert [r["step"] for r in windows] == [3, 5, 8, 10] and [r["epoch"] for r in windows] == [
        1,
        1,
        2,
        2,
    ]
    bounds = [(0, 3), (3, 5), (5, 8), (8, 10)]
    for line, (a, b) in zip(windows, bounds):
        for key in ("loss", "loss_a", "loss_b"):
            mean = sum(r[key] for r in per_step[a:b]) / (b - a)
            assert line[key] == pytest.approx(mean, rel=1e-6)
        assert (
            line["lr"] == per_step[b - 1]["lr"] and line["views_per_s"] > 0 and line["step_s"] > 0
        )
    assert (state_3.first_loss, state_3.last_loss, state_3.step, state_3.views) == pytest.approx(
        (state_1.first_loss, state_1.last_loss, state_1.step, state_1.views)
    )


def test_a_non_finite_loss_inside_a_window_names_the_window_steps():
    rec = Recorder()
    trainer = make_trainer([1.0, 1.0, 1.0, 1.0, float("nan"), 1.0], [rec])
    trainer.loop.log_every = 3
    with pytest.raises(
        CachedetError, match=r"the loss became nan at a step in 3\.\.5 \(epoch 1\);"
    ):
        trainer.run()
    assert [e[2] for e in rec.events if isinstance(e, tuple)] == [3] and rec.events[-1] == "close"
