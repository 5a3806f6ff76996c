"""Fine-tune an ImageNet-pretrained timm backbone (Inception-ResNet-V2 by default) on CIFAR-10 or
your own image folders, fed by DALI, distributed by Accelerate.

    # one process (CPU or one GPU)
    python job/train.py --config job/configs/demo.yaml
    # one node, 8 GPUs
    accelerate launch --multi_gpu --num_processes 8 job/train.py --config job/configs/finetune.yaml
    # N nodes x 8 GPUs: run on every node with its --machine_rank (docker/launch.sh builds this)
    accelerate launch --multi_gpu --num_machines N --num_processes $((8*N)) --machine_rank R \\
        --main_process_ip HOST --main_process_port 29500 job/train.py --config job/configs/finetune.yaml
    # overrides: section.key=value after the options
    python job/train.py --config job/configs/demo.yaml train.epochs=3 optim.lr=0.05

This file is the only one that knows the order of things: ``fit`` reads as the list of steps,
``Trainer`` holds the parts they share; how the run trains (images, or cached features) is its
``mode`` (job/modes.py), which the trainer asks and never branches on. Exit codes
(job/preemption.py): 0 done, 2 bad config or data, 143 preempted (checkpoint saved; run again
to resume).
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path

from job.preemption import exit_on_sigterm_during_setup

# First, before the heavy imports: as a job, a SIGTERM from here until training starts exits 143
# (nothing to save yet), not 1, a crash. Imported (tests, tools), it leaves the handlers alone.
if __name__ == "__main__":
    exit_on_sigterm_during_setup()

import torch  # noqa: E402 - after the SIGTERM handler, on purpose
from accelerate.utils import set_seed  # noqa: E402

from dali_pipelines.loader import make_loader  # noqa: E402
from dali_pipelines.spec import AutoAugment, LoaderSpec  # noqa: E402
from job.checkpoint import (Checkpointer, TimedCheckpoint, check_resume, finished_message,  # noqa: E402
                            load_best_weights, save_best)
from job.components import Component, pick_best  # noqa: E402
from job.config import BadInput, Config, parse_args, per_process_batch  # noqa: E402
from job.data import DataError, prepare_from_config  # noqa: E402
from job.distributed import (CollectiveTimeouts, all_ranks_or_none, build_accelerator,  # noqa: E402
                             once_per_node_first, replicas_identical, sync_batchnorm)
from job.early_stopping import EarlyStopping, metric_value  # noqa: E402
from job.ema import EmaComponent  # noqa: E402
from job.loop import Pause, StepHooks, StepLog, TrainParts, TrainState, evaluate, train_one_epoch  # noqa: E402
from job.mixing import BatchMixer  # noqa: E402
from job.card import ModelCard  # noqa: E402
from job.model import WeightsError, create_model  # noqa: E402
from dali_pipelines.sampling import Shard  # noqa: E402
from job.modes import RunInputs, build_mode  # noqa: E402
from job.optim import ScheduleState, build_optimizer, build_scheduler, current_lr  # noqa: E402
from job.progress import Progress  # noqa: E402
from job.preemption import (EXIT_BAD_INPUT, EXIT_PREEMPTED, Preempted, PreemptionSignal, exit_line,  # noqa: E402
                            is_first_process, record_exit_code)
from job.records import EpochRecord, RunSummary, shown_epoch  # noqa: E402
from job.reporting import sample_predictions  # noqa: E402
from job.resize import ProgressiveResize  # noqa: E402
from job.run_dir import RunDir  # noqa: E402
from job.storage import check_output_dir, check_writable  # noqa: E402
from job.tracking import Trackers, redact  # noqa: E402
from job.tta import TtaComponent  # noqa: E402



def fit(cfg: Config) -> int:
    finished = check_resume(cfg)  # a changed config is refused here, before anything is built or written
    if finished is not None:
        if is_first_process():
            print(finished_message(cfg, finished))
        return 0
    trainer = Trainer(cfg)
    try:
        trainer.setup()
        if trainer.mode.solves:  # linear_probe: the head solved over an L2 grid, no epochs (job/linear_probe.py)
            trainer.solve_probe()
        else:
            train_epochs(trainer)
        test = trainer.test_with_best()
        trainer.summarise_run(test)
        return 0
    except Preempted as stop:  # SIGTERM on some rank, noticed by every rank at the same step
        return trainer.exit_preempted(stop)


def train_epochs(trainer: "Trainer") -> None:
    """The epochs, until train.epochs or early stopping."""
    for epoch in range(trainer.state.epoch, trainer.cfg.train.epochs):
        if trainer.stopper.should_stop:  # resumed after the epoch that stopped it: straight to the test
            break
        trainer.train_and_validate_epoch(epoch)
        if trainer.stopper.should_stop:
            trainer.announce_early_stop()
            break


def build_components(cfg: Config, acc, parts: TrainParts, trainable: tuple, updates_per_epoch: int) -> list:
    """The run's optional features, each built from its own section (None = off), one line each.
    A new feature is a file with a Component and one line here (docs/ARCHITECTURE.md)."""
    model, module = trainable
    components = [
        Progress(acc, cfg.train.epochs),
        CollectiveTimeouts(acc, cfg.timeouts, compiled=cfg.train.compile),
        parts.mix,  # mix: (job/mixing.py), acting inside the step through TrainParts
        EmaComponent.build(cfg.ema, model, module, updates_per_epoch),
        TimedCheckpoint.build(cfg.checkpoint, acc.print),
        TtaComponent.build(cfg.tta, acc.print),
        ProgressiveResize.build(cfg.data, model, acc, cfg.timeouts if cfg.train.compile else None),
    ]
    return [c for c in components if c is not None]


@dataclass
class RunData:
    """What the run reads: the prepared store, how it is fed, and the model card that goes with it."""

    store: object  # job.data.Store
    prep: object  # dali_pipelines.spec.Preprocessing
    spec: LoaderSpec
    shard: Shard
    loaders: dict
    card: ModelCard


class Trainer:
    """The parts every run has, built in ``__init__`` (what a preemption needs) and ``setup`` (the
    rest), in the order they depend on each other; the optional features are ``components``."""

    def __init__(self, cfg: Config):
        self.cfg, tc = cfg, cfg.train
        check_output_dir(self.out)
        self.mode = build_mode(cfg)
        check_writable(cfg, cached=self.mode.cached)  # before anything expensive: exit 2 naming the path
        self.accelerator = build_accelerator(tc, cfg.timeouts)
        self.preemption = PreemptionSignal(self.accelerator)
        self.checkpointer: Checkpointer | None = None  # set once there is something to save
        self.components: list[Component] = []

    @property
    def out(self) -> Path:
        return Path(self.cfg.train.output_dir)

    @property
    def run(self) -> RunDir:
        return RunDir(self.out)

    @property
    def num_classes(self) -> int:
        return len(self.data.store.classes)

    def setup(self) -> None:
        cfg, tc, acc = self.cfg, self.cfg.train, self.accelerator
        cfg.data.batch_size = per_process_batch(cfg.data, acc.num_processes, tc.grad_accum_steps)
        set_seed(tc.seed)  # the same initial weights on every rank

        # ---- data and model: built once per node first (shared or node-local caches), then everywhere
        store = once_per_node_first(acc, lambda: prepare_from_config(cfg.data))
        self.bare, prep = once_per_node_first(
            acc, lambda: create_model(cfg.model, len(store.classes), cfg.data.image_size, cfg.data.test_image_size))
        if not cfg.model.pretrained:
            acc.print(f"model.pretrained=false: the {cfg.model.name} backbone starts from random weights")
        if self.mode.strategy.trains_backbone:
            acc.print(f"backbone LR = {cfg.optim.backbone_lr_scale:g} x head LR (optim.backbone_lr_scale)")
        set_seed(tc.seed, device_specific=True)  # per-rank dropout; the weights above are already equal
        spec = LoaderSpec.for_run(prep, num_threads=cfg.data.num_threads, device=acc.device,
                                  precision=acc.mixed_precision, channels_last=tc.channels_last,
                                  augment=cfg.data.augment and self.mode.augments, loader=cfg.data.loader,
                                  auto_augment=AutoAugment.of(cfg.data.auto_augment if self.mode.augments
                                                              else "none", cfg.data.rand_augment_n,
                                                              cfg.data.rand_augment_m),
                                  say=acc.print)
        self.bare.to(acc.device)
        if tc.channels_last:
            self.bare.to(memory_format=torch.channels_last)
        sync_batchnorm(acc, self.bare, cfg.ddp.sync_batchnorm, cfg.data.batch_size)  # before any DDP wrapper
        shard = Shard(batch_size=cfg.data.batch_size, rank=acc.process_index, world_size=acc.num_processes,
                      seed=tc.seed)
        loaders = self.mode.loaders(RunInputs(acc, cfg, store, spec, self.bare, shard, self.preemption.requested))
        self.data = RunData(store, prep, spec, shard, loaders, ModelCard.for_run(cfg.model, prep, store.classes))

        # ---- optimization. DDP is built while every parameter that will ever train requires a
        # gradient: it registers only those, so a backbone frozen now and unfrozen later (two_stage)
        # would otherwise never be synchronised across ranks.
        optimizer = build_optimizer(self.bare, cfg.optim, train_backbone=self.mode.strategy.trains_backbone)
        self.bare.freeze_backbone(self.mode.frozen_while_wrapping())
        stages, optimizer = self.mode.wrap(acc, self.bare, optimizer, tc)
        self.stopper = EarlyStopping(cfg.early_stopping.metric, cfg.early_stopping.patience,
                                     cfg.early_stopping.min_delta)
        updates_per_epoch = math.ceil(len(loaders["train"]) / tc.grad_accum_steps)
        # Not prepared: Accelerate's wrapper would step it once per process per update; we step it
        # with the optimizer-update count (tests/test_optim.py).
        scheduler = build_scheduler(optimizer, cfg.schedule, epochs=tc.epochs, updates_per_epoch=updates_per_epoch,
                                    plateau_mode=self.stopper.mode)
        loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=cfg.loss.label_smoothing)
        call, ddp = stages[self.bare.backbone_frozen]
        self.parts = TrainParts(model=call, optimizer=optimizer, scheduler=scheduler, accelerator=acc,
                                loss_fn=loss_fn, ddp=ddp, stages=stages, mix=BatchMixer.from_config(
                                    cfg, self.num_classes, rank=acc.process_index, cached_features=self.mode.cached))
        self.components = build_components(cfg, acc, self.parts, (self.bare, self.mode.trainable(self.bare)),
                                           updates_per_epoch)

        # ---- resume, outputs, tracking. What a checkpoint holds beyond Accelerate's prepared
        # objects: each part with state_dict/load_state_dict, saved as JSON, and each component's.
        self.state = TrainState()
        self.checkpointer = Checkpointer(acc, self.out, cfg.checkpoint.keep, config=cfg, states={
            "state": self.state, "early_stopping": self.stopper, "schedule": ScheduleState(scheduler)},
            tensor_states={c.name: c for c in self.components if c.tensor_state})
        resume_from = self.checkpointer.resolve(tc.resume)
        if resume_from is not None:
            self.checkpointer.load(resume_from)
            acc.print(f"resumed from {resume_from} (epoch {shown_epoch(self.state.epoch)}, "
                      f"sample {self.state.samples_in_epoch})")
        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            if resume_from is None:  # from scratch: an earlier run's outputs here would describe other weights
                removed = self.run.clear_previous_run(self.checkpointer.all())
                if removed:
                    acc.print(f"starting over in {self.out}: removed the earlier run's {', '.join(removed)}")
            # Resumed, the config differs from the checkpoint's only in RESUME_MAY_CHANGE keys
            # (Checkpointer.load refused anything else): config.yaml still describes these weights.
            cfg.save(self.run.config_file)
            if resume_from is not None:
                self.run.record_resume(resume_from, acc.num_processes, self.checkpointer.changed_on_resume)
        self.trackers = all_ranks_or_none(acc, lambda: Trackers(acc, cfg, self.out, start_epoch=self.state.epoch,
                                                                 run_id=self.state.run_id))
        self.state.run_id = self.trackers.run_id  # saved with the checkpoints: a resumed job continues the W&B run
        if self.mode.extraction_seconds is not None:
            self.trackers.log_summary({"feature_extraction_seconds": self.mode.extraction_seconds})
        acc.print(f"training {cfg.model.name} ({self.mode.describe()}) on {cfg.data.source}: {store.counts} "
                  f"images, {self.num_classes} classes, {prep.image_size}px, {acc.num_processes} process(es), "
                  f"{len(loaders['train'])} batches/epoch")

    # ------------------------------------------------------------------------------ the verbs
    def train_and_validate_epoch(self, epoch: int) -> None:
        """One epoch, its validation, the best model and a checkpoint."""
        acc, tc, state = self.accelerator, self.cfg.train, self.state
        self._apply_freeze_schedule(epoch)
        loader = self._train_loader(epoch)
        loader.set_epoch(epoch, start_sample=state.samples_in_epoch)
        self._each("on_epoch_start", epoch, len(loader), len(loader) - len(loader.plan.batches))
        hooks = StepHooks(poll=self._poll, pause=self._pause, on_log=self._on_step,
                          on_batch=lambda: self._each("on_batch"), on_update=lambda step: self._each("on_update", step))
        try:
            train = train_one_epoch(tc, self.parts, loader, state, hooks)
        finally:
            self._each("on_epoch_end")
        candidates = self._validate()
        chosen = pick_best(candidates, self.cfg.early_stopping.metric)
        val, picked = candidates["raw"], candidates[chosen]
        metric = metric_value(self.cfg.early_stopping.metric, picked["accuracy"], picked["loss"])
        self.parts.scheduler.step(epoch + 1, metric)
        if self.stopper.update(metric, epoch):
            card = self.data.card
            card.epoch, card.val_accuracy, card.weights = epoch, picked["accuracy"], chosen
            save_best(acc, self._best_weights(chosen), self.out, card)
        record = EpochRecord(epoch=epoch, step=state.global_step, lr=current_lr(self.parts.optimizer), **train,
                             val_loss=val["loss"], val_accuracy=val["accuracy"], val_samples=val["samples"],
                             val_accuracy_ema=candidates["ema"]["accuracy"] if "ema" in candidates else None)
        self.trackers.log_epoch(record)
        acc.print(_epoch_line(record, dominant=self.parts.mix is not None and self.parts.mix.active(epoch)))
        state.epoch, state.samples_in_epoch = epoch + 1, 0
        path = self.checkpointer.save(state.epoch, state.global_step)
        self._each("on_checkpoint", path)

    def solve_probe(self) -> None:
        """linear_probe: the mode solves the head's layer on the cached features; recorded here as
        the best model, the grid values as the run's epochs."""
        result = self.mode.solve(self.accelerator, self.cfg, self.num_classes,
                                 lambda: self.preemption.poll(False) == "preempted", self.trackers)
        layer = self.mode.trainable(self.bare)[-1]
        with torch.no_grad():
            layer.weight.copy_(result.W.to(layer.weight.dtype))
            layer.bias.copy_(result.b.to(layer.bias.dtype))
        for i, p in enumerate(result.points):  # what the summary reads (best epoch, stopped_early)
            self.stopper.update(metric_value(self.stopper.metric, p.val_accuracy, p.val_loss), i)
        card = self.data.card
        card.epoch, card.val_accuracy, card.weights = result.best, result.chosen.val_accuracy, "raw"
        save_best(self.accelerator, self.bare.state_dict(), self.out, card)
        self.state.epoch, self.state.global_step = len(result.points), result.steps
        self.trackers.log_summary(result.summary())

    def announce_early_stop(self) -> None:
        # No collective needed: the metric is all-reduced, so every rank's stopper saw the same
        # values and decided the same. (Preemption, which one rank may see alone, is decided
        # collectively in PreemptionSignal; the two never share it.)
        s = self.stopper
        self.accelerator.print(f"early stopping: no {s.metric} improvement for {s.patience} epochs "
                               f"(best {s.best:.4f} at epoch {shown_epoch(s.best_epoch)})")

    def exit_preempted(self, stop: Preempted) -> int:
        """The one place a preemption ends: save where training is (nothing before it started: a
        preempted feature extraction starts over) and let the orchestrator restart us."""
        acc = self.accelerator
        if self.checkpointer is None:
            acc.print(f"{stop}: nothing kept; exiting with {EXIT_PREEMPTED}, the next run starts it over")
        else:
            path = self.checkpointer.save(self.state.epoch, self.state.global_step)
            acc.print(f"SIGTERM: saved {path}; exiting with {EXIT_PREEMPTED} to be restarted")
        acc.end_training()
        return EXIT_PREEMPTED

    def test_with_best(self) -> dict:
        """The test split, touched once, with the best weights."""
        acc = self.accelerator
        acc.wait_for_everyone()
        identical = replicas_identical(acc, self.bare) if acc.num_processes > 1 else None
        if self.run.weights_file.is_file():
            load_best_weights(self.bare, self.out)
        else:
            acc.print(f"warning: no epoch improved {self.cfg.early_stopping.metric} (a NaN loss?): testing the last "
                      "weights; best/ was not written")
        test_loader = make_loader(self.data.store, "test", self.data.spec, train=False, shard=self.data.shard)
        test = self.mode.test(acc, self.bare, test_loader, self.num_classes)
        test["replicas_identical"] = identical
        self._each("after_test", test, lambda model, **kw: evaluate(model, test_loader, acc, self.num_classes, **kw),
                   self.bare)
        return test

    def summarise_run(self, test: dict) -> None:
        acc, classes = self.accelerator, self.data.store.classes
        history = self.trackers.history.records() if acc.is_main_process else []
        seconds = max(sum(h.epoch_seconds for h in history), 1e-9)
        images = sum(h.train_samples for h in history)
        summary = RunSummary(
            test_accuracy=test["accuracy"], test_loss=test["loss"], test_samples=test["samples"],
            test_per_class_accuracy=dict(zip(classes, test["per_class_accuracy"])),
            best_val_accuracy=max((h.val_accuracy for h in history), default=None),
            best_epoch=self.stopper.best_epoch, epochs_completed=self.state.epoch,
            stopped_early=self.stopper.should_stop, world_size=acc.num_processes,
            global_steps=self.state.global_step, train_images_per_second=images / seconds,
            train_images_per_second_per_device=images / seconds / acc.num_processes,
            data_wait_fraction=sum(h.data_wait_fraction * h.epoch_seconds for h in history) / seconds,
            confusion_matrix=test["confusion"], classes=classes,
            replicas_identical=test.get("replicas_identical"), features_cached=self.mode.cached,
            feature_extraction_seconds=self.mode.extraction_seconds,
            test_accuracy_cached=test.get("accuracy_cached"), test_accuracy_tta=test.get("accuracy_tta"),
            train_images_per_second_steady=_mean([h.steady_images_per_second for h in history
                                                  if h.steady_images_per_second > 0]),
            **self.mode.summary_fields())
        samples = []
        if acc.is_main_process:
            samples = sample_predictions(self.bare, self.data.store, self.data.spec, acc.device)
        self.trackers.finish(summary, samples)
        acc.print(f"test accuracy {summary.test_accuracy:.4f} on {summary.test_samples} images "
                  f"(best epoch {shown_epoch(summary.best_epoch)}); outputs in {self.out.resolve()}")
        acc.end_training()

    # ------------------------------------------------------------------------------ helpers
    def _each(self, hook: str, *args) -> None:
        """Call ``hook`` on every component, in the order they were registered."""
        for component in self.components:
            getattr(component, hook)(*args)

    def _apply_freeze_schedule(self, epoch: int) -> None:
        """The strategy's freeze rule for ``epoch``, and the training wrapper that goes with it."""
        frozen = self.mode.strategy.frozen_at(epoch)
        if self.bare.backbone_frozen == frozen:
            return
        self.bare.freeze_backbone(frozen)
        self.parts.use_stage(frozen)
        self._each("on_freeze_change", frozen)

    def _train_loader(self, epoch: int):
        """The run's training loader for ``epoch``, as the components make it (at the epoch's image
        size: job/resize.py); kept as the run's."""
        for component in self.components:
            self.data.loaders["train"] = component.train_loader(epoch, self.data.loaders["train"])
        return self.data.loaders["train"]

    def _validate(self) -> dict[str, dict]:
        """The raw weights' validation, and each component's candidate (the weight EMA's): what
        best/ may keep, and the card says which."""
        def run(module: torch.nn.Module) -> dict:
            return evaluate(self._eval_model(module), self.data.loaders["val"], self.accelerator, self.num_classes)

        candidates = {"raw": run(self.mode.evaluated(self.bare))}
        for component in self.components:
            extra = component.validate(run)
            if extra is not None:
                candidates[component.name] = extra
        return candidates

    def _best_weights(self, chosen: str) -> dict[str, torch.Tensor]:
        """The whole model's weights for best/: the raw ones, or a component's (the weight EMA's)."""
        weights = self.bare.state_dict()
        for component in self.components:
            if component.name == chosen:
                weights = component.best_weights(weights)
        return weights

    def _eval_model(self, module: torch.nn.Module) -> torch.nn.Module:
        """``module`` bare (ranks may run different numbers of evaluation batches, which the DDP
        wrapper's per-forward buffer broadcast could not match), with rank 0's batch-norm
        statistics on every rank: validation then uses exactly the weights ``best/`` saves."""
        if self.accelerator.num_processes > 1:
            from timm.utils import distribute_bn

            distribute_bn(module, self.accelerator.num_processes, reduce=False)
        return module

    def _poll(self) -> Pause | None:
        """Collective, every train.signal_check_every updates: PREEMPTED when SIGTERM reached any
        rank; else CHECKPOINT when the main process's clock says a timed checkpoint is due."""
        due = any(c.checkpoint_due() for c in self.components)
        event = self.preemption.poll(due)
        return Pause(event) if event is not None else None

    def _pause(self, event: Pause) -> None:
        """At a step boundary, with the epoch's sums in ``state``: preemption ends the run (saved by
        exit_preempted); a timed checkpoint is the same mid-epoch checkpoint, and training goes on."""
        if event is Pause.PREEMPTED:
            raise Preempted("SIGTERM")
        path = self.checkpointer.save(self.state.epoch, self.state.global_step)
        self._each("on_checkpoint", path, True)

    def _on_step(self, log: StepLog) -> None:
        self.trackers.log_step({"train/loss": log.loss, "train/lr": log.lr,
                                "train/images_per_second": log.images_per_second,
                                "train/data_wait_fraction": log.data_wait_fraction}, step=log.step)
        self._each("on_log", log)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _epoch_line(r: EpochRecord, dominant: bool = False) -> str:
    ema = f" (EMA {r.val_accuracy_ema:.4f})" if r.val_accuracy_ema is not None else ""
    acc = "acc (dominant label)" if dominant else "acc"  # mixed batches: train accuracy (dominant label)
    return (f"epoch {shown_epoch(r.epoch)}: train_loss {r.train_loss:.4f} {acc} {r.train_accuracy:.4f} | "
            f"val_loss {r.val_loss:.4f} acc {r.val_accuracy:.4f}{ema} | lr {r.lr:.2e} | "
            f"{r.images_per_second:.0f} img/s, data wait {r.data_wait_fraction:.0%}, {r.epoch_seconds:.1f}s")


def main(argv: list[str] | None = None) -> int:
    code = 1  # a crash, unless fit() returns or the input is refused
    try:
        cfg = parse_args(argv, description=__doc__.split("\n\n")[0])
        code = fit(cfg)
    except (BadInput, DataError, WeightsError) as e:  # ConfigError, CheckpointError, NonFiniteLossError, ...
        print(f"error: {redact(str(e))}", file=sys.stderr)
        code = EXIT_BAD_INPUT
    except SystemExit as e:  # argparse: --help (0) or a bad option (2)
        code = e.code if isinstance(e.code, int) else EXIT_BAD_INPUT
        raise
    finally:
        record_exit_code(code)
        if code not in (0, 1):  # a crash says so after its traceback (below)
            print(exit_line(code), file=sys.stderr)
    return code


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception:  # a crash: the traceback, then what it means (accelerate launch says only 1)
        import traceback

        traceback.print_exc()
        print(exit_line(1), file=sys.stderr)
        sys.exit(1)
