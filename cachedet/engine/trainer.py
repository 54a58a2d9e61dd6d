"""The training loop and its hooks (detectron2's ``HookBase`` pattern, reduced to what cachedet needs).

``Trainer.run`` owns only the loop: epochs, batches, ``train_step``, the learning-rate scheduler and
the per-epoch seed that makes a resumed run replay RoI sampling exactly. Everything else (metric
lines, the progress bar, checkpoints, validation) is a ``Hook`` that the caller passes in:

    before_train(trainer)          once, before the first step
    after_step(trainer, record)    after every step; ``record`` is that step's metrics line
    after_epoch(trainer)           after every epoch, on every rank, before the barrier
    after_eval(trainer, line)      after each validation (``cachedet.engine.validation``), its metrics line
    after_train(trainer)           once, after the last epoch (not after an exception)
    close()                        always, last (release files, stop bars)

Hooks run in the order given. ``trainer.state`` holds epoch, step and the last loss.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from cachedet.engine.distributed import DistInfo, barrier
from cachedet.engine.step import NonFiniteLoss, train_step
from cachedet.errors import CachedetError


class Hook:
    """Base class: every method does nothing; override the ones you need."""

    def before_train(self, trainer: "Trainer") -> None:
        pass

    def after_step(self, trainer: "Trainer", record: dict) -> None:
        pass

    def after_epoch(self, trainer: "Trainer") -> None:
        pass

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
    extra: dict = field(default_factory=dict)  # what hooks want to share (e.g. the best metric)


@dataclass
class LoopConfig:
    epochs: int
    steps_per_epoch: int
    seed: int
    clip_grad: float | None = None
    amp: bool = False  # bfloat16 autocast (CUDA only)


class Trainer:
    """Runs ``loop.epochs`` epochs of at most ``loop.steps_per_epoch`` batches from ``source``.

    source: has ``batches(epoch)`` yielding dict(inputs, targets[, image_sizes]) (see
    ``cachedet.engine.sources``). model: a ``TrainModel`` (possibly DDP-wrapped as ``forward_model``).
    Raises CachedetError when the loss becomes NaN or infinite, naming step and epoch.
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
            self.model.train()
            for i, batch in enumerate(self.source.batches(epoch)):
                if i >= self.loop.steps_per_epoch:
                    break
                record = self.run_step(batch)
                for hook in self.hooks:
                    hook.after_step(self, record)
            for hook in self.hooks:
                hook.after_epoch(self)
            barrier(self.info)
        for hook in self.hooks:
            hook.after_train(self)
        return self.state

    def run_step(self, batch: dict) -> dict:
        """One optimiser step on ``batch``; returns its metrics line (floats)."""
        t0 = time.perf_counter()
        inputs, targets, image_sizes = self._to_device(batch)
        try:
            out = train_step(
                self.forward_model,
                inputs,
                targets,
                image_sizes,
                optimizer=self.optimizer,
                params=self.params,
                clip_grad=self.loop.clip_grad,
                autocast=self.device if self.use_amp else None,
            )
        except NonFiniteLoss as e:
            raise CachedetError(
                f"{e} at step {self.state.step} (epoch {self.state.epoch}); "
                "lower optim.lr or raise optim.warmup_steps"
            ) from None
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        self.state.step += 1
        n = len(targets) * self.info.world
        dt = time.perf_counter() - t0
        self.state.views += n
        loss = float(out.loss)
        self.state.last_loss = loss
        if self.state.first_loss is None:
            self.state.first_loss = loss
        logged = getattr(
            getattr(self.model, "detector", None), "last_logged", {}
        )  # e.g. cascade stage losses
        return {
            "epoch": self.state.epoch,
            "step": self.state.step,
            "lr": lr,
            "loss": loss,
            **{k: float(v) for k, v in out.losses.items()},
            **{k: float(v) for k, v in logged.items()},
            "views_per_s": n / dt,
            "step_s": dt,
        }

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
