"""The training loop and its hooks (detectron2's ``HookBase`` pattern, reduced to what cachedet needs).

``Trainer.run`` owns only the loop: epochs, batches, ``train_step``, the learning-rate scheduler and
the per-epoch seed that makes a resumed run replay RoI sampling exactly. Everything else (metric
lines, the progress bar, checkpoints, validation) is a ``Hook`` that the caller passes in:

    before_train(trainer)          once, before the first step
    after_step(trainer, record)    after every ``loop.log_every`` steps (and at the end of each epoch);
                                   ``record`` is the metrics line of those steps (means of the losses)
    after_epoch(trainer)           after every epoch, on every rank, before the barrier
    at_checkpoint_step(trainer)    every ``loop.checkpoint_every`` steps inside an epoch
    after_eval(trainer, line)      after each validation (``cachedet.engine.validation``), its metrics line
    after_train(trainer)           once, after the last epoch (not after an exception)
    close()                        always, last (release files, stop bars)

Hooks run in the order given. ``trainer.state`` holds epoch, step and the last loss.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from cachedet.core.errors import CachedetError
from cachedet.engine.distributed import DistInfo, barrier
from cachedet.engine.step import StepOutput, train_step


class Hook:
    """Base class: every method does nothing; override the ones you need."""

    def before_train(self, trainer: "Trainer") -> None:
        pass

    def after_step(self, trainer: "Trainer", record: dict) -> None:
        pass

    def after_epoch(self, trainer: "Trainer") -> None:
        pass

    def at_checkpoint_step(self, trainer: "Trainer") -> None:
        """Every ``loop.checkpoint_every`` steps inside an epoch (not at its end: ``after_epoch``)."""

    def after_eval(self, trainer: "Trainer", line: dict) -> None:
        pass

    def after_train(self, trainer: "Trainer") -> None:
        pass

    def close(self) -> None:
        """Release files and bars; called after the run whether it ended or failed."""


@dataclass
class TrainState:
    epoch: int = 0
    step: int = 0  # optimiser steps taken so far (a resumed run starts at its checkpoint's)
    first_loss: float | None = (
        None  # of this process's first step (after a resume: the first resumed step)
    )
    last_loss: float | None = None
    views: int = 0  # views trained on by this invocation, all ranks
    epoch_step: int = (
        0  # steps taken in the current epoch (a mid-epoch checkpoint resumes after them)
    )
    rng: object = None  # torch's CPU generator state at a mid-epoch checkpoint, restored on resume
    extra: dict = field(default_factory=dict)  # what hooks want to share (e.g. the best metric)


@dataclass
class LoopConfig:
    epochs: int
    steps_per_epoch: int
    seed: int
    clip_grad: float | None = None
    amp: bool = False  # bfloat16 autocast (CUDA only)
    log_every: int = 1  # steps per metrics line; the device is read (synchronised) only then
    checkpoint_every: int | None = None  # steps between mid-epoch checkpoints (None: per epoch)


class LossWindow:
    """Losses of the steps since the last metrics line, summed on their device (no host sync)."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.steps = self.views = 0
        self.lr = 0.0
        self.t0 = 0.0
        self.first = self.last = None  # the window's first and last summed loss (device scalars)

    def add(self, out: StepOutput, logged: dict, views: int, lr: float, t0: float) -> None:
        if not self.steps:
            self.t0, self.first = t0, out.loss
        terms = {"loss": out.loss, **out.losses, **logged}
        for name, value in terms.items():
            value = value.detach().float()
            self.sums[name] = self.sums[name] + value if name in self.sums else value
        self.steps, self.views, self.lr, self.last = (
            self.steps + 1,
            self.views + views,
            lr,
            out.loss,
        )

    def read(self) -> tuple[dict[str, float], float, float]:
        """({term: mean over the window}, last step's loss, first step's loss): one device read."""
        names = list(self.sums)
        values = torch.stack(
            [self.sums[k] for k in names] + [self.last.float(), self.first.float()]
        )
        values = values.tolist()
        return {k: v / self.steps for k, v in zip(names, values)}, values[-2], values[-1]


class Trainer:
    """Runs ``loop.epochs`` epochs of at most ``loop.steps_per_epoch`` batches from ``source``.

    source: has ``batches(epoch)`` yielding dict(inputs, targets[, image_sizes]) (see
    ``cachedet.engine.sources``). model: a ``TrainModel`` (possibly DDP-wrapped as ``forward_model``).
    Nothing is read back from the device between metrics lines (``loop.log_every`` steps): losses
    are summed there, and the sum is checked when the line is written. Raises CachedetError when
    the loss becomes NaN or infinite, naming the step (or the window's step range) and epoch; the
    steps of that window have then already updated the weights (checkpoints come after epochs).
    """

    def __init__(
        self,
        model,
        optimizer,
        scheduler,
        source,
        loop: LoopConfig,
        device: torch.device,
        info: DistInfo,
        hooks: list[Hook] = (),
        forward_model=None,
        state: TrainState | None = None,
    ):
        self.model, self.optimizer, self.scheduler, self.source = (
            model,
            optimizer,
            scheduler,
            source,
        )
        self.loop, self.device, self.info, self.hooks = loop, device, info, list(hooks)
        self.forward_model = forward_model or model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.state = state or TrainState()
        self.use_amp = loop.amp and device.type == "cuda"
        self.window = LossWindow()

    def run(self) -> TrainState:
        try:
            return self._run()
        finally:
            for hook in self.hooks:
                hook.close()

    def _run(self) -> TrainState:
        for hook in self.hooks:
            hook.before_train(self)
        for epoch in range(self.state.epoch, self.loop.epochs):
            self.state.epoch = epoch
            torch.manual_seed(
                self.loop.seed * 100_003 + epoch
            )  # RoI sampling etc.: resume replays it exactly
            skip, self.state.epoch_step = self.state.epoch_step, 0  # a mid-epoch checkpoint's
            self.model.train()
            for i, batch in enumerate(self.source.batches(epoch)):
                if i >= self.loop.steps_per_epoch:
                    break
                if i < skip:  # taken before the checkpoint: the same batches, not trained again
                    continue
                if i == skip and self.state.rng is not None:
                    torch.set_rng_state(self.state.rng)
                    self.state.rng = None
                self.state.epoch_step = i + 1
                self._after_step(self.run_step(batch))
                every = self.loop.checkpoint_every
                if every and self.state.step % every == 0 and i + 1 < self.loop.steps_per_epoch:
                    self._after_step(self.close_window())  # the lines up to the checkpoint
                    for hook in self.hooks:
                        hook.at_checkpoint_step(self)
            self.state.epoch_step = 0
            self._after_step(self.close_window())  # windows never span epochs
            for hook in self.hooks:
                hook.after_epoch(self)
            barrier(self.info)
        for hook in self.hooks:
            hook.after_train(self)
        return self.state

    def run_step(self, batch: dict) -> dict | None:
        """One optimiser step on ``batch``, without reading anything back from the device.

        Returns the metrics line of the window this step closes (floats: the window's mean of each
        loss term, ``views_per_s`` and ``step_s`` over the window), or None inside a window.
        """
        t0 = time.perf_counter()
        inputs, targets, image_sizes = self._to_device(batch)
        out = train_step(
            self.forward_model,
            inputs,
            targets,
            image_sizes,
            optimizer=self.optimizer,
            params=self.params,
            clip_grad=self.loop.clip_grad,
            autocast=self.device if self.use_amp else None,
            check_finite=False,  # checked on the window's sum when it is logged: no sync here
        )
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        self.state.step += 1
        n = len(targets) * self.info.world
        self.state.views += n
        logged = getattr(
            getattr(self.model, "detector", None), "last_logged", {}
        )  # e.g. cascade stage losses
        self.window.add(out, logged, n, lr, t0)
        if self.window.steps >= self.loop.log_every:
            return self.close_window()
        return None

    def close_window(self) -> dict | None:
        """The metrics line of the open window (one host sync), or None when it is empty.

        Raises CachedetError when a loss in it was NaN or infinite, naming the step (or step range)
        and the epoch."""
        window, self.window = self.window, LossWindow()
        if not window.steps:
            return None
        # steps counted from 0 in errors (as before windows), from 1 in metrics lines
        first, last = self.state.step - window.steps, self.state.step - 1
        means, last_loss, first_loss = window.read()
        if not math.isfinite(means["loss"]):
            where = f"step {last}" if first == last else f"a step in {first}..{last}"
            raise CachedetError(
                f"the loss became {means['loss']} at {where} (epoch {self.state.epoch + 1}); "
                "lower optim.lr or raise optim.warmup_steps"
            )
        self.state.last_loss = last_loss
        if self.state.first_loss is None:
            self.state.first_loss = first_loss
        dt = time.perf_counter() - window.t0
        return {
            "epoch": self.state.epoch + 1,  # counted from 1 everywhere (console, checkpoints)
            "step": self.state.step,
            "lr": window.lr,
            **means,
            "views_per_s": window.views / dt,
            "step_s": dt / window.steps,
        }

    def _after_step(self, record: dict | None) -> None:
        if record is not None:
            for hook in self.hooks:
                hook.after_step(self, record)

    def _to_device(self, batch: dict):
        inputs, device = batch["inputs"], self.device
        if isinstance(inputs, dict):
            inputs = {k: v.to(device, non_blocking=True) for k, v in inputs.items()}
            if not self.use_amp:
                inputs = {k: v.float() for k, v in inputs.items()}
        else:
            inputs = inputs.to(device, non_blocking=True)
        targets = [{k: v.to(device) for k, v in t.items()} for t in batch["targets"]]
        return inputs, targets, batch.get("image_sizes")
