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
``Trainer`` holds the parts they share. Exit codes (job/preemption.py): 0 done, 2 bad config or
data, 143 preempted (checkpoint saved; run again to resume).
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path

from job.preemption import exit_on_sigterm_during_setup

# First, before the heavy imports: as a job, a SIGTERM from here until training starts exits 143
# (nothing to save yet), not 1, a crash. Imported (tests, tools), it leaves the handlers alone.
if __name__ == "__main__":
    exit_on_sigterm_during_setup()

import torch  # noqa: E402 - after the SIGTERM handler, on purpose
from accelerate.utils import set_seed  # noqa: E402

from dali_pipelines.loader import make_loader
from dali_pipelines.spec import LoaderSpec
from job.checkpoint import Checkpointer, check_output_dir, load_best_weights, save_best
from job.config import Config, ConfigError, parse_args, per_process_batch
from job.data import DataError, prepare_from_config
from job.distributed import (all_ranks_or_none, build_accelerator, collective_timeout, once_per_node_first,
                             head_only_step, replicas_identical, setup_timeouts, training_timeouts,
                             wrap_for_training)
from job.early_stopping import EarlyStopping
from job.features import FeatureLoader, Preempted, cached_features, feature_key
from job.loop import StepHooks, StepLog, TrainParts, TrainState, evaluate, train_one_epoch
from job.model import ModelCard, Strategy, WeightsError, create_model
from job.optim import build_optimizer, build_scheduler, current_lr, load_scheduler_state, scheduler_state
from job.preemption import EXIT_BAD_INPUT, EXIT_PREEMPTED, PreemptionSignal, record_exit_code
from job.records import EpochRecord, RunSummary, shown_epoch
from job.reporting import sample_predictions
from job.storage import check_writable, feature_cache_root
from job.tracking import Trackers, TrackingError, redact



def fit(cfg: Config) -> int:
    trainer = Trainer(cfg)
    for epoch in range(trainer.state.epoch, cfg.train.epochs):
        if trainer.stopper.should_stop:  # resumed after the epoch that stopped it: straight to the test
            break
        if not trainer.train_and_validate_epoch(epoch):
            return trainer.exit_preempted(epoch)
        if trainer.stopper.should_stop:
            trainer.announce_early_stop()
            break
    test = trainer.test_with_best()
    trainer.summarise_run(test)
    return 0


def use_feature_cache(cfg: Config) -> bool:
    """``auto`` caches whenever the backbone is frozen for the whole run."""
    return cfg.train.strategy == "feature_extraction" and cfg.train.cache_features != "false"


class Trainer:
    """The parts of one run, built in ``__init__`` (setup) in the order they depend on each other."""

    def __init__(self, cfg: Config):
        self.cfg, tc = cfg, cfg.train
        self.out = Path(tc.output_dir)
        check_output_dir(self.out)
        self.strategy = Strategy.from_config(tc)
        self.cached = use_feature_cache(cfg)
        check_writable(cfg, cached=self.cached)  # before anything expensive: exit 2 naming the path
        acc = self.accelerator = build_accelerator(tc)
        self.preemption = PreemptionSignal(acc)
        cfg.data.batch_size = per_process_batch(cfg.data, acc.num_processes, tc.grad_accum_steps)
        set_seed(tc.seed)  # the same initial weights on every rank

        # ---- data and model: built once per node first (shared or node-local caches), then everywhere
        self.store = once_per_node_first(acc, lambda: prepare_from_config(cfg.data))
        self.num_classes = len(self.store.classes)
        self.bare, self.prep = once_per_node_first(
            acc, lambda: create_model(cfg.model, self.num_classes, cfg.data.image_size))
        if not cfg.model.pretrained:
            acc.print(f"model.pretrained=false: the {cfg.model.name} backbone starts from random weights")
        if self.strategy.trains_backbone:
            acc.print(f"backbone LR = {cfg.optim.backbone_lr_scale:g} x head LR (optim.backbone_lr_scale)")
        set_seed(tc.seed, device_specific=True)  # per-rank dropout; the weights above are already equal
        self.spec = LoaderSpec.for_run(self.prep, num_threads=cfg.data.num_threads, device=acc.device,
                                       precision=acc.mixed_precision, channels_last=tc.channels_last,
                                       augment=cfg.data.augment and not self.cached, loader=cfg.data.loader,
                                       say=acc.print)
        self.bare.to(acc.device)
        if tc.channels_last:
            self.bare.to(memory_format=torch.channels_last)
        self.card = ModelCard.for_run(cfg.model, self.prep, self.store.classes)

        # ---- loaders: images through DALI, or the frozen backbone's features computed once
        shard = dict(batch_size=cfg.data.batch_size, rank=acc.process_index, world_size=acc.num_processes,
                     seed=tc.seed)
        if self.cached:
            self.bare.freeze_backbone(True)
            self.features = self._cached_features()
            self.loaders = {split: FeatureLoader(self.features.features[split], self.features.labels[split],
                                                 train=split == "train", device=acc.device, **shard)
                            for split in ("train", "val", "test")}
            trained = self.bare.head
        else:
            self.features = None
            self.loaders = {split: make_loader(self.store, split, self.spec, train=split == "train", **shard)
                            for split in ("train", "val")}
            trained = self.bare

        # ---- optimization. DDP is built while every parameter that will ever train requires a
        # gradient: it registers only those, so a backbone frozen now and unfrozen later (two_stage)
        # would otherwise never be synchronised across ranks.
        optimizer = build_optimizer(self.bare, cfg.optim, train_backbone=self.strategy.trains_backbone)
        self.bare.freeze_backbone(not self.strategy.trains_backbone or self.cached)
        call, ddp, optimizer = wrap_for_training(acc, trained, optimizer, compile=tc.compile)
        self.stopper = EarlyStopping(cfg.early_stopping.metric, cfg.early_stopping.patience,
                                     cfg.early_stopping.min_delta)
        updates_per_epoch = math.ceil(len(self.loaders["train"]) / tc.grad_accum_steps)
        # Not prepared: Accelerate's wrapper would step it once per process per update; we step it
        # with the optimizer-update count (tests/test_optim.py).
        scheduler = build_scheduler(optimizer, cfg.schedule, epochs=tc.epochs, updates_per_epoch=updates_per_epoch,
                                    plateau_mode=self.stopper.mode)
        loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=cfg.loss.label_smoothing)
        self.parts = TrainParts(model=call, optimizer=optimizer, scheduler=scheduler, accelerator=acc,
                                loss_fn=loss_fn, ddp=ddp)
        # two_stage on several processes: the frozen stage synchronises the head alone
        self.stages = {False: (call, ddp)}
        if ddp is not None and not self.cached and self.strategy.needs_unused_parameter_check:
            self.stages[True] = head_only_step(acc, self.bare, tc)

        # ---- resume, outputs, tracking
        self.state = TrainState()
        self.checkpointer = Checkpointer(acc, self.out, tc.keep_checkpoints, config=cfg)
        resume_from = self.checkpointer.resolve(tc.resume)
        if resume_from is not None:
            self._load_trainer_state(self.checkpointer.load(resume_from), resume_from)
            acc.print(f"resumed from {resume_from} (epoch {shown_epoch(self.state.epoch)}, "
                      f"sample {self.state.samples_in_epoch})")
        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            cfg.save(self.out / "config.yaml")
        self.trackers = all_ranks_or_none(acc, lambda: Trackers(acc, cfg, self.out, start_epoch=self.state.epoch,
                                                                 run_id=self.state.run_id))
        self.state.run_id = self.trackers.run_id  # saved with the checkpoints: a resumed job continues the W&B run
        if self.features is not None:
            self.trackers.log_summary({"feature_extraction_seconds": self.features.extraction_seconds})
        self.short_timeouts = False  # set after the first update: see _after_first_update
        self.pause: str | None = None  # why the last epoch paused: "preempted" or "checkpoint"
        self.last_checkpoint = time.monotonic()  # train.checkpoint_every_minutes counts from here
        acc.print(f"training {cfg.model.name} ({tc.strategy}{', cached features' if self.cached else ''}) on "
                  f"{cfg.data.source}: {self.store.counts} images, {self.num_classes} classes, "
                  f"{self.prep.image_size}px, {acc.num_processes} process(es), "
                  f"{len(self.loaders['train'])} batches/epoch")

    # ------------------------------------------------------------------------------ the verbs
    def train_and_validate_epoch(self, epoch: int) -> bool:
        """One epoch, its validation, the best model and a checkpoint. False when preempted."""
        acc, tc, state = self.accelerator, self.cfg.train, self.state
        if not self.cached and self.bare.backbone_frozen != self.strategy.frozen_at(epoch):
            self.bare.freeze_backbone(self.strategy.frozen_at(epoch))
            self.parts.model, self.parts.ddp = self.stages.get(self.bare.backbone_frozen, self.stages[False])
            if tc.compile and self.short_timeouts:  # the next step recompiles: the setup timeout again
                setup_timeouts(acc, tc)
                self.short_timeouts = False
        loader = self.loaders["train"]
        first_step = state.global_step
        while True:  # a timed checkpoint pauses the epoch: saved, it goes on from the same sample
            loader.set_epoch(epoch, start_sample=state.samples_in_epoch)
            progress = _progress(acc, len(loader), len(loader) - len(loader.plan.batches), epoch, tc.epochs)

            def on_batch() -> None:
                if progress is not None:
                    progress.update()
                if not self.short_timeouts and state.global_step > first_step:
                    self._after_first_update()

            hooks = StepHooks(stop_requested=self._pause_requested,
                              on_log=lambda log: self._on_step(log, progress), on_batch=on_batch)
            train = train_one_epoch(tc, self.parts, loader, state, hooks)
            if progress is not None:
                progress.close()
            if train is not None or self.pause == "preempted":
                break
            self.save_on_time(epoch)
        if train is None:
            return False
        val = evaluate(self._eval_model(), self.loaders["val"], acc, self.num_classes)
        metric = val["accuracy"] if self.cfg.early_stopping.metric == "val_accuracy" else val["loss"]
        self.parts.scheduler.step(epoch + 1, metric)
        if self.stopper.update(metric, epoch):
            self.card.epoch, self.card.val_accuracy = epoch, val["accuracy"]
            save_best(acc, self.bare, self.out, self.card)
        record = EpochRecord(epoch=epoch, step=state.global_step, lr=current_lr(self.parts.optimizer), **train,
                             val_loss=val["loss"], val_accuracy=val["accuracy"], val_samples=val["samples"])
        self.trackers.log_epoch(record)
        acc.print(_epoch_line(record))
        state.epoch, state.samples_in_epoch = epoch + 1, 0
        self.checkpointer.save(state.epoch, state.global_step, self._trainer_state())
        self.last_checkpoint = time.monotonic()
        return True

    def announce_early_stop(self) -> None:
        # No collective needed: the metric is all-reduced, so every rank's stopper saw the same
        # values and decided the same. (Preemption, which one rank may see alone, uses
        # Accelerate's trigger; the two never share it.)
        s = self.stopper
        self.accelerator.print(f"early stopping: no {s.metric} improvement for {s.patience} epochs "
                               f"(best {s.best:.4f} at epoch {shown_epoch(s.best_epoch)})")

    def save_on_time(self, epoch: int) -> None:
        """``train.checkpoint_every_minutes``: the SIGTERM checkpoint (mid-epoch, resumable), and
        training goes on. Bounds the work a node lost without warning costs, and what a spot
        grace period too short for a full save (GKE: 15 s) costs."""
        path = self.checkpointer.save(epoch, self.state.global_step, self._trainer_state())
        self.last_checkpoint = time.monotonic()
        every = self.cfg.train.checkpoint_every_minutes
        self.accelerator.print(f"saved {path} (train.checkpoint_every_minutes={every:g})")

    def exit_preempted(self, epoch: int) -> int:
        """Save where we are and let the orchestrator restart us."""
        path = self.checkpointer.save(epoch, self.state.global_step, self._trainer_state())
        self.accelerator.print(f"SIGTERM: saved {path}; exiting with {EXIT_PREEMPTED} to be restarted")
        self.accelerator.end_training()
        return EXIT_PREEMPTED

    def test_with_best(self) -> dict:
        """The test split, touched once, with the best weights (end to end through the backbone)."""
        acc = self.accelerator
        acc.wait_for_everyone()
        self.replicas_identical = replicas_identical(acc, self.bare) if acc.num_processes > 1 else None
        if (self.out / "best" / "model.safetensors").is_file():
            load_best_weights(self.bare, self.out)
        else:
            acc.print(f"warning: no epoch improved {self.cfg.early_stopping.metric} (a NaN loss?): testing the last "
                      "weights; best/ was not written")
        test_loader = make_loader(self.store, "test", self.spec, train=False, batch_size=self.cfg.data.batch_size,
                                  rank=acc.process_index, world_size=acc.num_processes)
        test = evaluate(self.bare, test_loader, acc, self.num_classes)
        if self.cached:
            cached = evaluate(self.bare.head, self.loaders["test"], acc, self.num_classes)
            test["accuracy_cached"] = cached["accuracy"]
            acc.print(f"test accuracy {test['accuracy']:.4f} end to end, {cached['accuracy']:.4f} on cached "
                      f"features ({self.cfg.train.feature_dtype})")
            # Rounding the features may flip a prediction that sits on a decision boundary, not more.
            allowed = max(2, 0.005 * test["samples"]) / max(test["samples"], 1)
            if abs(test["accuracy"] - cached["accuracy"]) > allowed:
                acc.print(f"warning: the cached features disagree with the images by more than {allowed:.4f} "
                          f"accuracy (rounding to {self.cfg.train.feature_dtype} explains less): was the cache "
                          f"edited, or does the backbone differ from the one that wrote it? Delete "
                          f"{self.features.path} to rebuild it")
        return test

    def summarise_run(self, test: dict) -> None:
        acc, history = self.accelerator, self.trackers.history.records() if self.accelerator.is_main_process else []
        seconds = sum(h.epoch_seconds for h in history)
        images = sum(h.train_samples for h in history)
        summary = RunSummary(
            test_accuracy=test["accuracy"], test_loss=test["loss"], test_samples=test["samples"],
            test_per_class_accuracy=dict(zip(self.store.classes, test["per_class_accuracy"])),
            best_val_accuracy=max((h.val_accuracy for h in history), default=None),
            best_epoch=self.stopper.best_epoch, epochs_completed=self.state.epoch,
            stopped_early=self.stopper.should_stop, world_size=acc.num_processes,
            global_steps=self.state.global_step, train_images_per_second=images / max(seconds, 1e-9),
            train_images_per_second_per_device=images / max(seconds, 1e-9) / acc.num_processes,
            data_wait_fraction=sum(h.data_wait_fraction * h.epoch_seconds for h in history) / max(seconds, 1e-9),
            confusion_matrix=test["confusion"], classes=self.store.classes,
            replicas_identical=self.replicas_identical, features_cached=self.cached,
            feature_extraction_seconds=self.features.extraction_seconds if self.features else None,
            test_accuracy_cached=test.get("accuracy_cached"),
            train_images_per_second_steady=_mean([h.steady_images_per_second for h in history
                                                  if h.steady_images_per_second > 0]))
        samples = (sample_predictions(self.bare, self.store, self.spec, acc.device)
                   if acc.is_main_process else [])
        self.trackers.finish(summary, samples)
        acc.print(f"test accuracy {summary.test_accuracy:.4f} on {summary.test_samples} images "
                  f"(best epoch {shown_epoch(summary.best_epoch)}); outputs in {self.out.resolve()}")
        acc.end_training()

    # ------------------------------------------------------------------------------ helpers
    def _cached_features(self):
        cfg, acc = self.cfg, self.accelerator
        key = feature_key(cfg, self.prep, self.store, precision=acc.mixed_precision)  # autocast applies on CPU too
        root = feature_cache_root(cfg)
        acc.print("train.cache_features: the frozen backbone's features are computed once, so training-time "
                  "augmentation is off (the fixed-feature protocol)")
        try:
            features = cached_features(acc, self.bare, self.store, self.spec, key, root,
                                       self.cfg.data.batch_size, self.preemption.requested)
        except Preempted as e:
            acc.print(f"{e}: nothing kept; exiting with {EXIT_PREEMPTED}, the next run extracts again")
            acc.end_training()
            raise SystemExit(EXIT_PREEMPTED) from None
        verb = "reusing cached features" if features.reused else \
            f"extracted features in {features.extraction_seconds:.1f}s"
        acc.print(f"{verb} ({features.path})")
        return features

    def _eval_model(self) -> torch.nn.Module:
        """The bare module (ranks may run different numbers of evaluation batches, which the DDP
        wrapper's per-forward buffer broadcast could not match), with rank 0's batch-norm
        statistics on every rank: validation then uses exactly the weights ``best/`` saves."""
        bare = self.bare.head if self.cached else self.bare
        if self.accelerator.num_processes > 1:
            from timm.utils import distribute_bn

            distribute_bn(bare, self.accelerator.num_processes, reduce=False)
        return bare

    def _trainer_state(self) -> dict:
        return {"state": self.state.state_dict(), "early_stopping": self.stopper.state_dict(),
                **scheduler_state(self.parts.scheduler)}

    def _load_trainer_state(self, saved: dict, path: Path) -> None:
        try:
            self.state.load_state_dict(saved["state"])
            self.stopper.load_state_dict(saved["early_stopping"])
            load_scheduler_state(self.parts.scheduler, saved)
        except (KeyError, TypeError, ValueError, AttributeError) as e:  # an edited or foreign trainer_state.json
            raise ConfigError(f"{path}/trainer_state.json: not the trainer state this job writes ({type(e).__name__}: "
                              f"{str(e)[:200]}); resume from another checkpoint, or start over with "
                              "train.resume=never") from None

    def _pause_requested(self) -> bool:
        """Collective, every train.signal_check_every updates: SIGTERM on any rank stops the
        run; else the main process's clock may call for a timed checkpoint."""
        every = self.cfg.train.checkpoint_every_minutes
        due = every > 0 and time.monotonic() - self.last_checkpoint >= every * 60
        self.pause = self.preemption.poll(due)
        return self.pause is not None

    def _after_first_update(self) -> None:
        """Compilation and autotuning happen in the first step, under the generous setup timeout;
        from now on a collective that waits longer than the step timeout means a lost peer."""
        training_timeouts(self.accelerator, self.cfg.train)
        self.short_timeouts = True
        if self.accelerator.num_processes > 1:
            self.accelerator.print(f"collective timeout now {collective_timeout()} (train.step_timeout_minutes)")

    def _on_step(self, log: StepLog, progress) -> None:
        self.trackers.log_step({"train/loss": log.loss, "train/lr": log.lr,
                                "train/images_per_second": log.images_per_second,
                                "train/data_wait_fraction": log.data_wait_fraction}, step=log.step)
        if progress is not None:
            progress.set_postfix(loss=f"{log.loss:.3f}", img_s=f"{log.images_per_second:.0f}",
                                 wait=f"{log.data_wait_fraction:.0%}", refresh=False)
        else:
            self.accelerator.print(f"step {log.step}: loss {log.loss:.4f} lr {log.lr:.2e} "
                                   f"{log.images_per_second:.0f} img/s data wait {log.data_wait_fraction:.0%}")


def _progress(accelerator, total: int, start: int, epoch: int, epochs: int):
    """A live bar on an interactive terminal; in pod logs (no TTY) the step lines say the same."""
    if not accelerator.is_main_process or not sys.stderr.isatty():
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc=f"epoch {shown_epoch(epoch)}/{epochs}", unit="batch",
                dynamic_ncols=True, leave=False, file=sys.stderr)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _epoch_line(r: EpochRecord) -> str:
    return (f"epoch {shown_epoch(r.epoch)}: train_loss {r.train_loss:.4f} acc {r.train_accuracy:.4f} | "
            f"val_loss {r.val_loss:.4f} acc {r.val_accuracy:.4f} | lr {r.lr:.2e} | "
            f"{r.images_per_second:.0f} img/s, data wait {r.data_wait_fraction:.0%}, {r.epoch_seconds:.1f}s")


def main(argv: list[str] | None = None) -> int:
    code = 1  # a crash, unless fit() returns or the input is refused
    try:
        cfg = parse_args(argv, description=__doc__.split("\n\n")[0])
        code = fit(cfg)
    except (ConfigError, DataError, WeightsError, TrackingError) as e:
        print(f"error: {redact(str(e))}", file=sys.stderr)
        code = EXIT_BAD_INPUT
    except SystemExit as e:  # preempted during feature extraction
        code = e.code if isinstance(e.code, int) else 1
    finally:
        record_exit_code(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
