"""Fine-tune an ImageNet-pretrained timm backbone (Inception-ResNet-V2 by default) on CIFAR-10 or
your own image folders, fed by DALI, distributed by Accelerate.

    # one process (CPU or one GPU)
    python job/train.py --config job/configs/demo.yaml
    # one node, 8 GPUs
    accelerate launch --multi_gpu --num_processes 8 job/train.py --config job/configs/finetune.yaml
    # N nodes x 8 GPUs: run on every node with its --machine_rank (docker/launch.sh builds this)
    accelerate launch --multi_gpu --num_machines N --num_processes $((8*N)) --machine_rank R \
        --main_process_ip HOST --main_process_port 29500 job/train.py --config job/configs/finetune.yaml
    # overrides: section.key=value after the options
    python job/train.py --config job/configs/demo.yaml train.epochs=3 optim.lr=0.05

This file is the only one that knows the order of things: config -> data -> model -> optimizer ->
resume -> epochs of (train, validate, checkpoint, maybe stop) -> test with the best weights.
Exit codes: 0 done, 2 bad config or data, 143 preempted (checkpoint saved; run again to resume).
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python job/train.py` / `accelerate launch job/train.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, TorchDynamoPlugin, set_seed

from dali_pipelines.loader import LoaderSpec, dali_device_id, make_loader
from job.checkpoint import Checkpointer, load_best_weights, save_best
from job.config import Config, ConfigError, parse_args
from job.data import DataError, prepare_from_config
from job.early_stopping import EarlyStopping
from job.loop import StepLog, TrainState, evaluate, sample_predictions, train_one_epoch
from job.model import WeightsError, create_model
from job.preemption import EXIT_BAD_INPUT, EXIT_PREEMPTED, PreemptionSignal, record_exit_code
from job.optim import build_optimizer, build_scheduler, current_lr
from job.tracking import Tracker, TrackingError, sweep_output_dir


def build_accelerator(cfg: Config) -> Accelerator:
    precision = cfg.train.mixed_precision
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    return Accelerator(
        cpu=not torch.cuda.is_available(),  # without it, N CPU processes would each run alone
        mixed_precision=precision,
        # two_stage unfreezes the backbone after DDP has wrapped the model: DDP must register
        # every parameter up front and tolerate the frozen ones getting no gradient meanwhile.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=cfg.train.strategy == "two_stage")],
        dynamo_plugin=TorchDynamoPlugin(backend="inductor") if cfg.train.compile else None,
    )


def backbone_frozen(cfg: Config, epoch: int) -> bool:
    strategy = cfg.train.strategy
    return strategy == "feature_extraction" or (strategy == "two_stage" and epoch < cfg.train.head_epochs)


def fit(cfg: Config) -> int:
    accelerator = build_accelerator(cfg)
    out = Path(sweep_output_dir(cfg.train.output_dir))
    set_seed(cfg.train.seed)

    # ---- data: the main process prepares the store once, the others reuse it
    with accelerator.main_process_first():
        store = prepare_from_config(cfg.data)
    num_classes = len(store.classes)

    # ---- model
    model, prep = create_model(cfg.model, num_classes)
    if not cfg.model.pretrained:
        accelerator.print(f"model.pretrained=false: the {cfg.model.name} backbone starts from random weights")
    image_size = cfg.data.image_size or prep.image_size
    spec = LoaderSpec(image_size=image_size, mean=prep.mean, std=prep.std, channels_last=cfg.train.channels_last,
                      num_threads=cfg.data.num_threads,
                      device_id=dali_device_id(accelerator.device))
    loader = lambda split, train: make_loader(  # noqa: E731
        store, split, spec, train=train, batch_size=cfg.data.batch_size, rank=accelerator.process_index,
        world_size=accelerator.num_processes, seed=cfg.train.seed)
    train_loader, val_loader = loader("train", True), loader("val", False)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)

    # ---- optimization
    optimizer = build_optimizer(model, cfg.optim, train_backbone=cfg.train.strategy != "feature_extraction")
    model.freeze_backbone(backbone_frozen(cfg, 0))
    updates_per_epoch = math.ceil(len(train_loader) / cfg.train.grad_accum_steps)
    stopper = EarlyStopping(cfg.early_stopping.metric, cfg.early_stopping.patience, cfg.early_stopping.min_delta)
    scheduler = build_scheduler(optimizer, cfg.schedule, epochs=cfg.train.epochs, updates_per_epoch=updates_per_epoch,
                                plateau_mode=stopper.mode)
    # The scheduler is not prepared: Accelerate's wrapper would step it once per process per
    # update. We step it ourselves with the optimizer-update count (tests/test_optim.py).
    model, optimizer = accelerator.prepare(model, optimizer)
    state = TrainState()
    for obj in (scheduler, stopper, state):
        accelerator.register_for_checkpointing(obj)

    # ---- resume
    checkpointer = Checkpointer(accelerator, out, cfg.train.keep_checkpoints, config=cfg)
    resume_from = checkpointer.resolve(cfg.train.resume)
    if resume_from is not None:
        checkpointer.load(resume_from)
        accelerator.print(f"resumed from {resume_from} (epoch {state.epoch}, batch {state.step_in_epoch})")
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        cfg.train.output_dir = str(out)
        cfg.save(out / "config.yaml")
    tracker = Tracker(accelerator, cfg, out, start_epoch=state.epoch, run_id=state.run_id)
    state.run_id = tracker.run_id  # saved with the checkpoints: a resumed job continues the same W&B run
    preemption = PreemptionSignal(accelerator)
    best_meta = {"model": cfg.model.name, "num_classes": num_classes, "classes": store.classes,
                 "head_hidden": cfg.model.head_hidden, "head_dropout": cfg.model.head_dropout,
                 "head_activation": cfg.model.head_activation, "image_size": image_size,
                 "mean": prep.mean, "std": prep.std, "store": str(store.path.resolve())}
    accelerator.print(f"training {cfg.model.name} ({cfg.train.strategy}) on {cfg.data.source}: "
                      f"{store.counts} images, {num_classes} classes, {image_size}px, "
                      f"{accelerator.num_processes} process(es), {len(train_loader)} batches/epoch")

    # ---- epochs
    stopped_early = False
    for epoch in range(state.epoch, cfg.train.epochs):
        accelerator.unwrap_model(model).freeze_backbone(backbone_frozen(cfg, epoch))
        train_loader.set_epoch(epoch, start_step=state.step_in_epoch)
        progress = _progress(accelerator, len(train_loader), state.step_in_epoch, epoch, cfg.train.epochs)
        train_metrics = train_one_epoch(
            model, train_loader, optimizer, scheduler, accelerator, state,
            label_smoothing=cfg.optim.label_smoothing, grad_clip=cfg.train.grad_clip,
            grad_accum_steps=cfg.train.grad_accum_steps, log_every=cfg.train.log_every,
            signal_check_every=cfg.train.signal_check_every, preempt_requested=preemption.requested,
            on_log=lambda log: _on_step(accelerator, tracker, progress, log), progress=progress)
        if progress is not None:
            progress.close()
        if train_metrics is None:  # preempted: save where we are and let the orchestrator restart us
            path = checkpointer.save(epoch, state.global_step)
            accelerator.print(f"SIGTERM: saved {path}; exiting with {EXIT_PREEMPTED} to be restarted")
            accelerator.end_training()
            return EXIT_PREEMPTED
        val = evaluate(_eval_model(accelerator, model), val_loader, accelerator, num_classes)
        metric = val["accuracy"] if cfg.early_stopping.metric == "val_accuracy" else val["loss"]
        scheduler.step(epoch + 1, metric)
        if stopper.update(metric, epoch):
            save_best(accelerator, model, out, {**best_meta, "epoch": epoch, "val_accuracy": val["accuracy"]})
        record = {"epoch": epoch, "step": state.global_step, "lr": current_lr(optimizer), **train_metrics,
                  "val_loss": val["loss"], "val_accuracy": val["accuracy"], "val_samples": val["samples"]}
        tracker.log_epoch(record)
        accelerator.print(_epoch_line(record))
        state.epoch, state.step_in_epoch = epoch + 1, 0
        checkpointer.save(epoch + 1, state.global_step)
        if stopper.should_stop:
            accelerator.set_trigger()  # one decision, made by every rank through the same all-reduce
        if accelerator.check_trigger():
            stopped_early = True
            accelerator.print(f"early stopping: no {cfg.early_stopping.metric} improvement for "
                              f"{stopper.patience} epochs (best {stopper.best:.4f} at epoch {stopper.best_epoch})")
            break

    # ---- test, once, with the best weights
    accelerator.wait_for_everyone()
    load_best_weights(accelerator.unwrap_model(model), out)
    test = evaluate(accelerator.unwrap_model(model), loader("test", False), accelerator, num_classes)
    history = tracker.history()
    train_seconds = sum(h["epoch_seconds"] for h in history)
    train_images = sum(h["train_samples"] for h in history)
    metrics = {"test_accuracy": test["accuracy"], "test_loss": test["loss"], "test_samples": test["samples"],
               "test_per_class_accuracy": dict(zip(store.classes, test["per_class_accuracy"])),
               "best_val_accuracy": max(h["val_accuracy"] for h in history) if history else None,
               "best_epoch": stopper.best_epoch, "epochs_completed": state.epoch, "stopped_early": stopped_early,
               "world_size": accelerator.num_processes, "global_steps": state.global_step,
               "train_images_per_second": train_images / max(train_seconds, 1e-9),
               "train_images_per_second_per_device": train_images / max(train_seconds, 1e-9) / accelerator.num_processes,
               "data_wait_fraction": (sum(h["data_wait_fraction"] * h["epoch_seconds"] for h in history)
                                      / max(train_seconds, 1e-9)),
               "confusion_matrix": test["confusion"], "classes": store.classes}
    if accelerator.is_main_process:
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    samples = (sample_predictions(accelerator.unwrap_model(model), store, spec, accelerator.device)
               if accelerator.is_main_process else None)
    tracker.finish(metrics, samples)
    accelerator.print(f"test accuracy {metrics['test_accuracy']:.4f} on {metrics['test_samples']} images "
                      f"(best epoch {stopper.best_epoch}); outputs in {out.resolve()}")
    accelerator.end_training()
    return 0


def _eval_model(accelerator: Accelerator, model):
    """The bare model, with rank 0's batch-norm statistics on every rank.

    Evaluating through the DDP wrapper would broadcast buffers at every forward: a collective
    that ranks with different numbers of evaluation batches could not match. Each rank's
    running statistics drift apart after the last broadcast; copying rank 0's makes validation
    use exactly the weights that ``best/`` saves.
    """
    bare = accelerator.unwrap_model(model)
    if accelerator.num_processes > 1:
        from timm.utils import distribute_bn

        distribute_bn(bare, accelerator.num_processes, reduce=False)
    return bare


def _progress(accelerator: Accelerator, total: int, start: int, epoch: int, epochs: int):
    """A live bar on an interactive terminal; in pod logs (no TTY) the step lines say the same."""
    if not accelerator.is_main_process or not sys.stderr.isatty():
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc=f"epoch {epoch + 1}/{epochs}", unit="batch",
                dynamic_ncols=True, leave=False, file=sys.stderr)


def _on_step(accelerator: Accelerator, tracker: Tracker, progress, log: StepLog) -> None:
    tracker.log_step({"train/loss": log.loss, "train/lr": log.lr, "train/images_per_second": log.images_per_second,
                      "train/data_wait_fraction": log.data_wait_fraction}, step=log.step)
    if progress is not None:
        progress.set_postfix(loss=f"{log.loss:.3f}", img_s=f"{log.images_per_second:.0f}",
                             wait=f"{log.data_wait_fraction:.0%}", refresh=False)
    else:
        accelerator.print(f"step {log.step}: loss {log.loss:.4f} lr {log.lr:.2e} "
                          f"{log.images_per_second:.0f} img/s data wait {log.data_wait_fraction:.0%}")


def _epoch_line(r: dict) -> str:
    return (f"epoch {r['epoch'] + 1}: train_loss {r['train_loss']:.4f} acc {r['train_accuracy']:.4f} | "
            f"val_loss {r['val_loss']:.4f} acc {r['val_accuracy']:.4f} | lr {r['lr']:.2e} | "
            f"{r['images_per_second']:.0f} img/s, data wait {r['data_wait_fraction']:.0%}, {r['epoch_seconds']:.1f}s")


def main(argv: list[str] | None = None) -> int:
    code = 1  # a crash, unless fit() returns or the input is refused
    try:
        cfg = parse_args(argv, description=__doc__.split("\n")[0])
        code = fit(cfg)
    except (ConfigError, DataError, WeightsError, TrackingError) as e:
        print(f"error: {e}", file=sys.stderr)
        code = EXIT_BAD_INPUT
    finally:
        record_exit_code(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
