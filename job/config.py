"""The run's configuration: typed sections with their defaults, loaded as defaults < YAML < CLI.

Command-line overrides are ``section.key=value`` words after the options, the value parsed as
YAML: ``train.epochs=3 model.head_hidden=[512,256] model.weights=null``. Unknown keys and bad
values are errors that list what is valid. Cluster facts (ranks, addresses) and secrets
(``WANDB_API_KEY``) come from the environment, never from here.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from job.bounds import shown, within_size

CHECKPOINT_MARKER = "trainer_state.json"  # in every checkpoint directory this job writes
# The first line of every config.yaml the job writes: what marks an output_dir as a run of ours.
CONFIG_HEADER = "# the resolved config of a cifar-transfer run (job/train.py)"
# Bounds on a config file: ours are a few KB with ~80 values; anchors that expand a small file
# into a huge value (a "billion laughs") are refused before anything walks it.
MAX_CONFIG_BYTES = 2**20
MAX_CONFIG_VALUES = 10_000
# Pixels per side: the largest pretrained input among timm's classifiers is ~800 (EVA-02 at
# 448, BEiT at 512, some at 800); beyond this a batch no longer fits in memory anyway.
MAX_IMAGE_SIZE = 1024


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message says what is valid."""


@dataclass
class DataConfig:
    source: Literal["cifar10", "folder", "synthetic"] = "cifar10"
    # cifar10: cifar-10-batches-py dir or cifar-10-python.tar.gz (the download dir with
    # download=true); folder: dir with train/ and test/ (optional val/); synthetic: where the
    # generated batches go (default: beside the prepared store).
    root: str | None = None
    download: bool = False  # cifar10 only: fetch and md5-verify the official tarball into root
    prepared_dir: str = "data/prepared"  # the prepared store lives in {prepared_dir}/{source}
    image_size: int | None = None  # pixels per side; None = the model's pretrained input size (299)
    batch_size: int = 64  # images per process per step; per update: x processes x train.grad_accum_steps
    val_fraction: float = 0.1  # of train, stratified; an explicit val/ folder wins
    split_seed: int = 0  # seed of the validation split (and of synthetic data)
    num_threads: int = 4  # DALI CPU worker threads per process
    follow_symlinks: bool = False  # folder: follow symlinks leading outside root (refused by default)
    augment: bool = True  # training crops (zero-padded shifts) and flips; off when features are cached
    # automatic augmentation of training images (DALI's auto_aug, after the shift; off when features
    # are cached): auto_augment = AutoAugment's CIFAR-10 policy
    auto_augment: Literal["none", "rand_augment", "trivial_augment", "auto_augment"] = "none"
    rand_augment_n: int = 2  # rand_augment: operations per image
    rand_augment_m: int = 9  # rand_augment: magnitude bin, 0 to 30
    synthetic_train: int = 5000  # images generated for source=synthetic (train + val)
    synthetic_test: int = 1000
    # Images per optimizer update over all processes; set, it replaces batch_size with
    # global_batch_size / (processes x train.grad_accum_steps), so a recipe means the same
    # optimisation on 1 or 64 GPUs (raise grad_accum_steps when a batch does not fit).
    global_batch_size: int | None = None
    # dali: the fast path (default); torch: the same batches on PyTorch alone, for machines
    # without DALI; auto: DALI where it imports, else torch, said in the log
    loader: Literal["dali", "torch", "auto"] = "dali"


@dataclass
class ModelConfig:
    name: str = "inception_resnet_v2"  # any timm model name
    pretrained: bool = True  # ImageNet weights: from `weights` if set, else the Hugging Face Hub
    weights: str | None = None  # local .safetensors or PyTorch state dict, for offline clusters
    # dense->BN->act->dropout blocks; [] = a linear head (measured best on short runs, see
    # docs/BENCHMARKS.md); the presets use the recipe's deeper heads
    head_hidden: list[int] = field(default_factory=list)
    head_dropout: float = 0.0  # after pooling and after each hidden block
    head_activation: Literal["relu", "gelu", "silu"] = "relu"


@dataclass
class TrainConfig:
    # linear_probe: frozen backbone, cached features, a linear head solved by L-BFGS over an L2 grid
    strategy: Literal["feature_extraction", "finetune", "two_stage", "linear_probe"] = "finetune"
    head_epochs: int = 1  # two_stage: epochs with the backbone frozen before everything trains
    epochs: int = 10
    # feature_extraction: compute the frozen backbone's features once (no augmentation) and
    # train the head on them; auto = on for feature_extraction, false = images every epoch.
    cache_features: Literal["auto", "true", "false"] = "auto"
    feature_dtype: Literal["float16", "float32"] = "float16"  # of the cached features
    feature_cache_dir: str | None = None  # None = {data.prepared_dir}/features
    # linear_probe (job/linear_probe.py): the L2 strengths tried, in this order (each solve warm-starts
    # from the previous), on loss = mean cross-entropy + l2/2 ||W||^2 over standardized features
    # (bias unpenalised); the best on validation is kept. Default: 1 and 3 per decade, 1e1 to 1e-6
    probe_l2_grid: list[float] = field(default_factory=lambda: [1e1, 3e0, 1e0, 3e-1, 1e-1, 3e-2, 1e-2, 3e-3, 1e-3,
                                                                3e-4, 1e-4, 3e-5, 1e-5, 3e-6, 1e-6])
    probe_tol: float = 1e-6  # linear_probe: stop when max |gradient| <= this x its value at zero weights
    probe_max_iter: int = 1000  # linear_probe: L-BFGS iterations per l2 value at most
    device: Literal["auto", "cuda", "cpu"] = "auto"  # auto: CUDA if it works; error if GPUs exist but it does not
    mixed_precision: Literal["auto", "bf16", "fp16", "no"] = "auto"  # auto: bf16 on a GPU that has it natively
    seed: int = 0  # model init, dropout, shuffling and augmentation
    output_dir: str = "runs/default"
    resume: str = "auto"  # auto (latest checkpoint in output_dir, if any) | never | a checkpoint dir
    grad_accum_steps: int = 1  # micro-batches per optimizer step
    grad_clip: float = 0.0  # max global gradient L2 norm; 0 disables clipping (timm's default)
    compile: bool = False  # torch.compile the model (GPU runs; minutes of warm-up)
    channels_last: bool = False  # NHWC memory format end to end (faster convolutions on GPUs)
    keep_checkpoints: int = 2  # most recent checkpoints kept in output_dir/checkpoints
    log_every: int = 20  # optimizer steps between step-level logs (each costs one host sync)
    signal_check_every: int = 10  # steps between cross-rank checks for SIGTERM (one sync each)
    # Collective timeouts (minutes): generous while ranks wait for data preparation, Hub
    # downloads and compilation; short once training runs, so ranks whose peer vanished stop
    # (and the job restarts from its checkpoint) instead of hanging.
    setup_timeout_minutes: float = 60.0
    step_timeout_minutes: float = 5.0
    # DDP options for multi-node runs: off until measured on a cluster (docs/BENCHMARKS.md).
    ddp_gradient_as_bucket_view: bool = False  # gradients live in the all-reduce buckets (no copy)
    # false: no buffer broadcast before each forward (batch-norm statistics drift per rank until
    # evaluation gives every rank rank 0's)
    ddp_broadcast_buffers: bool = True
    ddp_comm_hook: Literal["none", "bf16"] = "none"  # bf16: gradients all-reduced in bfloat16 (half the bytes)
    # Batch-norm statistics over every process's images (SyncBatchNorm) instead of each process's
    # own: auto = on with more than one GPU process and a per-process batch below 32, where a BN
    # batch of 16 on 16 GPUs would otherwise see 1/16 of the 256 images one GPU sees.
    sync_batchnorm: Literal["auto", "true", "false"] = "auto"
    # flip: the test is also run averaging each image's and its mirror's softmax, reported beside
    # the plain accuracy (test_accuracy_tta), never instead of it
    test_tta: Literal["none", "flip"] = "none"
    # Weight EMA: the averaging horizon in epochs (decay per update = 1 - 1/(epochs x updates per
    # epoch), with timm's warm-up); each epoch validates the raw and the averaged weights and
    # best/ keeps whichever validation picks. 0 = off
    ema_epochs: float = 0.0
    # A mid-epoch checkpoint (the SIGTERM one, resumable) at least this often, besides those at
    # epoch ends and on SIGTERM: bounds the work lost with a node that vanishes without SIGTERM,
    # or whose grace period is too short for a save (spot on GKE: 15 s). 0 = off.
    checkpoint_every_minutes: float = 30.0
    # Mixup / CutMix (timm's Mixup, per batch; job/mixing.py): the Beta(alpha, alpha) of each; with
    # both on, each mixed batch picks one at even odds. 0 = off. Mixup works on cached features too
    # (measured no gain on the demo's: docs/TRAINING.md)
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0  # CutMix's alpha, 0 = off; needs images (not with cached features)
    mix_prob: float = 1.0  # probability that a batch is mixed
    mix_off_epoch: int = 0  # from this 0-based epoch on, no mixing (timm's mixup_off_epoch); 0 = never


@dataclass
class OptimConfig:
    name: Literal["sgd", "adamw", "adam"] = "sgd"  # sgd = SGD with Nesterov momentum
    lr: float = 0.01  # peak learning rate for the head, per optimizer step (not scaled by world size)
    # backbone LR = lr x this (finetune, two_stage); 1.0 fine-tuned best in bench/defaults.py
    # (docs/BENCHMARKS.md); lower it for long, high-LR recipes that must protect pretrained features
    backbone_lr_scale: float = 1.0
    momentum: float = 0.9  # sgd only
    weight_decay: float = 1e-4  # not applied to biases and norm parameters
    # Layer-wise LR decay: the head at lr, the backbone's last block at lr x this, each block
    # below one more factor (timm's depth groups; Inception-ResNet-V2 has 46); null = off.
    # Instead of backbone_lr_scale, not with it.
    layer_decay: float | None = None


@dataclass
class LossConfig:
    label_smoothing: float = 0.0  # cross-entropy target smoothing; 0 = plain cross-entropy


@dataclass
class ScheduleConfig:
    name: Literal["cosine", "step", "plateau"] = "cosine"
    warmup_epochs: float = 1.0  # linear warm-up from warmup_lr, stepped per optimizer update
    warmup_lr: float = 1e-5
    min_lr: float = 1e-6  # cosine floor; plateau never decays below it
    decay_epochs: float = 3.0  # step: decay every this many epochs
    decay_rate: float = 0.1  # step and plateau: LR multiplier at each decay
    plateau_patience: int = 2  # plateau: epochs without val improvement before a decay


@dataclass
class EarlyStoppingConfig:
    metric: Literal["val_accuracy", "val_loss"] = "val_accuracy"
    patience: int = 5  # epochs without improvement before stopping; 0 disables early stopping
    min_delta: float = 0.0  # smallest change that counts as an improvement


@dataclass
class TrackingConfig:
    wandb: Literal["auto", "online", "offline", "disabled"] = "auto"
    project: str = "cifar-transfer"
    entity: str | None = None
    run_name: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(f"{CONFIG_HEADER}\n" + yaml.safe_dump(self.to_dict(), sort_keys=False))


# ----------------------------------------------------------------------------- loading

def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults, then the YAML file, then ``section.key=value`` overrides; validated."""
    raw: dict[str, Any] = {}
    if path is not None:
        raw = read_yaml_mapping(Path(path), "config file")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        section, name = key.split(".", 1)
        if not isinstance(raw.setdefault(section, {}), dict):
            raise ConfigError(f"section {section!r} must be a mapping")
        try:
            raw[section][name] = yaml.safe_load(value)
        except (yaml.YAMLError, RecursionError, ValueError):  # ValueError: an int of > 4300 digits
            raw[section][name] = value
        if not within_size(raw[section][name], MAX_CONFIG_VALUES):
            raise ConfigError(f"override {key} expands to more than MAX_CONFIG_VALUES={MAX_CONFIG_VALUES} values")
    cfg = _build(Config, raw, "")
    cfg.train.output_dir = sweep_output_dir(cfg.train.output_dir)
    validate(cfg)
    return cfg


def read_yaml_mapping(path: Path, what: str) -> dict[str, Any]:
    """A YAML mapping from ``path`` (a config file, a run's config.yaml), every failure a one-line
    ConfigError naming the file; bounded in bytes and in what its aliases expand to."""
    try:
        if path.exists() and not path.is_file():  # a FIFO would block, /dev/zero never end
            raise ConfigError(f"{what} {path} is not a regular file")
        with open(path, "rb") as f:
            blob = f.read(MAX_CONFIG_BYTES + 1)
        if len(blob) > MAX_CONFIG_BYTES:
            raise ConfigError(f"{what} {path} is larger than MAX_CONFIG_BYTES={MAX_CONFIG_BYTES}; not a config")
        raw = yaml.safe_load(blob.decode("utf-8"))
    except ConfigError:  # a ValueError: not to be caught as bad YAML below
        raise
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{what} {path} cannot be read ({getattr(e, 'strerror', None) or e})") from None
    except (yaml.YAMLError, ValueError) as e:  # ValueError: an int of > 4300 digits
        raise ConfigError(f"{what} {path} is not valid YAML: {shown(str(e).replace(chr(10), ' '))}") from None
    except RecursionError:
        raise ConfigError(f"{what} {path} nests values too deeply; not a config") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{what} {path} must be a mapping of sections, got {type(raw).__name__}")
    if not within_size(raw, MAX_CONFIG_VALUES):
        raise ConfigError(f"{what} {path} expands to more than MAX_CONFIG_VALUES={MAX_CONFIG_VALUES} values (YAML "
                          "aliases of aliases?); a config holds ~100")
    return raw


def sweep_output_dir(output_dir: str) -> str:
    """Inside a W&B sweep every trial gets its own directory under ``output_dir`` (resolved once,
    when the config is loaded, so every rank and every file agrees on it)."""
    run_id = os.environ.get("WANDB_RUN_ID")
    if os.environ.get("WANDB_SWEEP_ID") and run_id:
        return str(Path(output_dir) / run_id)
    return output_dir


def config_from_dict(raw: dict[str, Any]) -> Config:
    """A Config from a saved ``config.yaml`` mapping (e.g. a finished run's)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"a saved config must be a mapping of sections, got {type(raw).__name__}")
    cfg = _build(Config, raw, "")
    validate(cfg)
    return cfg


def _build(cls, raw: dict[str, Any], prefix: str):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        where = f"section {prefix.rstrip('.')!r}" if prefix else "the config"
        raise ConfigError(f"unknown key(s) {', '.join(prefix + u for u in unknown)} in {where}; "
                          f"valid keys: {', '.join(prefix + k for k in fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in raw.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ConfigError(f"{prefix}{name} must be a mapping of keys, got {shown(value)}")
            kwargs[name] = _build(hint, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, hint, prefix + name)
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        if isinstance(value, bool):  # YAML 1.1 reads true/false/yes/no/on/off as bools
            spellings = ("true", "yes", "on") if value else ("false", "no", "off")
            value = next((a for a in args if a in spellings), value)
        if value not in args:
            raise ConfigError(f"{key}={shown(value)} is not valid; choose one of {', '.join(map(str, args))}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, key)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, e.g. {key}=[512,256]; got {shown(value)}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {shown(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {shown(value)}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {shown(value)}")
        if not math.isfinite(value):  # .inf / .nan would train to the end on garbage
            raise ConfigError(f"{key}={value} is not a finite number")
        return float(value)
    if hint is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key} must be a string, got {shown(value)}")
        return str(value)
    raise TypeError(f"unsupported config type {hint} for {key}")  # a bug in this module


def per_process_batch(data: DataConfig, world_size: int, grad_accum_steps: int) -> int:
    """``data.batch_size``, or ``data.global_batch_size`` divided over the processes and the
    accumulation steps of one update (it must divide exactly: the recipe's batch is its meaning)."""
    if data.global_batch_size is None:
        return data.batch_size
    share, rest = divmod(data.global_batch_size, world_size * grad_accum_steps)
    if rest or share < 1:
        raise ConfigError(f"data.global_batch_size={data.global_batch_size} is not a multiple of {world_size} "
                          f"process(es) x train.grad_accum_steps={grad_accum_steps}; choose a multiple, or change "
                          "train.grad_accum_steps")
    return share


def validate(cfg: Config) -> None:
    """Range checks that types cannot express."""
    checks = [
        (cfg.data.image_size is None or 16 <= cfg.data.image_size <= MAX_IMAGE_SIZE,
         f"data.image_size must be in [16, {MAX_IMAGE_SIZE}] (MAX_IMAGE_SIZE), or null for the model's size"),
        (cfg.data.batch_size >= 1, "data.batch_size must be >= 1"),
        (cfg.data.global_batch_size is None or cfg.data.global_batch_size >= 1,
         "data.global_batch_size must be >= 1, or null to use data.batch_size per process"),
        (0.0 < cfg.data.val_fraction < 1.0, "data.val_fraction must be in (0, 1): training needs a validation "
                                            "split (a folder source's val/ folder, when present, replaces it)"),
        (cfg.data.split_seed >= 0 and cfg.train.seed >= 0, "data.split_seed and train.seed must be >= 0"),
        (cfg.data.num_threads >= 1, "data.num_threads must be >= 1"),
        (cfg.data.rand_augment_n >= 1, "data.rand_augment_n must be >= 1 (operations per image)"),
        (0 <= cfg.data.rand_augment_m <= 30, "data.rand_augment_m must be in [0, 30] (DALI's magnitude bins)"),
        (cfg.data.source != "folder" or cfg.data.root, "data.root is required for data.source=folder"),
        (not cfg.data.download or cfg.data.source == "cifar10", "data.download only applies to data.source=cifar10"),
        (all(h >= 1 for h in cfg.model.head_hidden), "model.head_hidden sizes must be >= 1"),
        (0.0 <= cfg.model.head_dropout < 1.0, "model.head_dropout must be in [0, 1)"),
        (cfg.train.epochs >= 1, "train.epochs must be >= 1"),
        (cfg.train.strategy != "two_stage" or 1 <= cfg.train.head_epochs < cfg.train.epochs,
         "train.head_epochs must be in [1, train.epochs) for train.strategy=two_stage"),
        (cfg.train.grad_accum_steps >= 1, "train.grad_accum_steps must be >= 1"),
        (cfg.train.ema_epochs >= 0, "train.ema_epochs must be >= 0 (0 turns the weight EMA off)"),
        (cfg.train.grad_clip >= 0, "train.grad_clip must be >= 0 (0 disables clipping)"),
        (cfg.train.keep_checkpoints >= 1, "train.keep_checkpoints must be >= 1"),
        (cfg.train.log_every >= 1 and cfg.train.signal_check_every >= 1,
         "train.log_every and train.signal_check_every must be >= 1"),
        (cfg.optim.lr > 0, "optim.lr must be > 0"),
        (cfg.optim.backbone_lr_scale >= 0, "optim.backbone_lr_scale must be >= 0"),
        (cfg.optim.weight_decay >= 0, "optim.weight_decay must be >= 0"),
        (cfg.optim.layer_decay is None or 0 < cfg.optim.layer_decay <= 1, "optim.layer_decay must be in (0, 1], "
                                                                          "or null for no layer-wise LR decay"),
        (cfg.optim.layer_decay is None or cfg.optim.backbone_lr_scale == 1.0,
         "optim.layer_decay and optim.backbone_lr_scale both scale the backbone's LR: set one (backbone_lr_scale "
         "back to 1.0, or layer_decay to null)"),
        (0.0 <= cfg.optim.momentum < 1.0, "optim.momentum must be in [0, 1)"),
        (0.0 <= cfg.loss.label_smoothing < 1.0, "loss.label_smoothing must be in [0, 1)"),
        (cfg.train.cache_features != "true" or cfg.train.strategy in ("feature_extraction", "linear_probe"),
         "train.cache_features=true needs train.strategy=feature_extraction or linear_probe: features can be cached "
         "only while the backbone is frozen for the whole run"),
        (cfg.train.strategy != "linear_probe" or cfg.train.cache_features != "false",
         "train.cache_features=false with train.strategy=linear_probe: the probe is solved on the cached features "
         "of every image (no augmentation); set train.cache_features=auto, or use train.strategy=feature_extraction "
         "to train a head on images every epoch"),
        (cfg.train.strategy != "linear_probe" or not cfg.model.head_hidden,
         f"model.head_hidden={cfg.model.head_hidden} with train.strategy=linear_probe: the probe is one linear layer; "
         "set model.head_hidden=[] (or use train.strategy=feature_extraction for a deeper head)"),
        (len(cfg.train.probe_l2_grid) >= 1 and all(v > 0 for v in cfg.train.probe_l2_grid),
         "train.probe_l2_grid must be a non-empty list of L2 strengths > 0, e.g. [1.0, 0.1, 0.01]"),
        (cfg.train.probe_tol > 0 and cfg.train.probe_max_iter >= 1,
         "train.probe_tol must be > 0 and train.probe_max_iter >= 1"),
        (cfg.train.setup_timeout_minutes > 0 and cfg.train.step_timeout_minutes > 0,
         "train.setup_timeout_minutes and train.step_timeout_minutes must be > 0"),
        (cfg.train.checkpoint_every_minutes >= 0, "train.checkpoint_every_minutes must be >= 0 (0 = off)"),
        (cfg.train.mixup_alpha >= 0 and cfg.train.cutmix_alpha >= 0,
         "train.mixup_alpha and train.cutmix_alpha must be >= 0 (0 turns each off)"),
        (0.0 <= cfg.train.mix_prob <= 1.0, "train.mix_prob must be in [0, 1]"),
        (cfg.train.mix_off_epoch >= 0, "train.mix_off_epoch must be >= 0 (0 = mix every epoch)"),
        (cfg.train.cutmix_alpha == 0 or cfg.train.strategy != "feature_extraction"
         or cfg.train.cache_features == "false", cutmix_on_features_message(cfg.train.cutmix_alpha)),
        (cfg.schedule.warmup_epochs >= 0, "schedule.warmup_epochs must be >= 0"),
        (cfg.schedule.min_lr >= 0 and cfg.schedule.warmup_lr >= 0, "schedule.min_lr and warmup_lr must be >= 0"),
        (cfg.schedule.decay_epochs > 0, "schedule.decay_epochs must be > 0"),
        (0 < cfg.schedule.decay_rate < 1, "schedule.decay_rate must be in (0, 1)"),
        (cfg.early_stopping.patience >= 0, "early_stopping.patience must be >= 0 (0 disables it)"),
        (cfg.early_stopping.min_delta >= 0, "early_stopping.min_delta must be >= 0"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    if cfg.data.root:
        root, store = _resolved(cfg.data.root, "data.root"), _resolved(Path(cfg.data.prepared_dir) / cfg.data.source,
                                                                     "data.prepared_dir")
        if root == store or store.is_relative_to(root) or root.is_relative_to(store):
            raise ConfigError(f"data.prepared_dir={cfg.data.prepared_dir} puts the store at {store}, which overlaps "
                              f"data.root={cfg.data.root} (one is inside the other): writing the store could "
                              "replace the dataset. Put data.prepared_dir outside data.root")
        # What the run writes may not land in the dataset either (the next prepare would list it as
        # images) nor around it (replacing best/ or checkpoints/ there would touch the data).
        for key, value in (("train.output_dir", cfg.train.output_dir),
                           ("train.feature_cache_dir", cfg.train.feature_cache_dir)):
            written = _resolved(value, key) if value else None
            if written is not None and (written.is_relative_to(root) or root.is_relative_to(written)):
                raise ConfigError(f"{key}={value} overlaps data.root={cfg.data.root} (one is inside the other): the "
                                  f"run would write into the dataset. Put {key} outside data.root")
    if cfg.train.resume not in ("auto", "never") and not (Path(cfg.train.resume) / CHECKPOINT_MARKER).is_file():
        raise ConfigError(f"train.resume={cfg.train.resume!r}: not a checkpoint written by this job (no "
                          f"{CHECKPOINT_MARKER}); use auto, never, or an OUTPUT_DIR/checkpoints/epoch*-step* directory")


def cutmix_on_features_message(cutmix_alpha: float) -> str:
    return (f"train.cutmix_alpha={cutmix_alpha:g} with cached features (train.strategy=feature_extraction and "
            "train.cache_features auto or true): CutMix pastes image boxes and is undefined on feature vectors. Set "
            "train.cache_features=false (images through the frozen backbone every epoch), or train.cutmix_alpha=0 "
            "(train.mixup_alpha works on cached features)")


def _resolved(path: str | Path, key: str) -> Path:
    try:
        return Path(path).resolve()
    except (OSError, RuntimeError) as e:  # RuntimeError: a symlink loop (Python 3.11)
        raise ConfigError(f"{key}={path} cannot be resolved ({e}); fix the path") from None


def positive_int(text: str) -> int:
    """argparse type of counts (``--batch-size``, ``--top``): argparse turns the error into exit 2."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{shown(text)} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def keys_help() -> str:
    """Every key with its default and the comment beside it in this file: the dataclasses are
    the one source (the README's table lists the same keys and defaults, tests/test_config.py)."""
    import inspect
    import re
    import textwrap

    out = []
    for section in dataclasses.fields(Config):
        cls = section.default_factory
        names = {f.name for f in dataclasses.fields(cls)}
        hints = typing.get_type_hints(cls)
        defaults = dataclasses.asdict(cls())
        out.append(f"{section.name}:")
        above: list[str] = []  # comment lines just above a field
        for line in inspect.getsource(cls).splitlines()[1:]:
            text = line.strip()
            match = re.match(r"(\w+): [^#]*?(?:#\s*(.*))?$", text)
            if text.startswith("#"):
                above.append(text.lstrip("# "))
            elif match and match.group(1) in names:
                name = match.group(1)
                choices = typing.get_args(hints[name]) if typing.get_origin(hints[name]) is Literal else ()
                comment = " ".join([*above, match.group(2) or ""]).strip()
                meaning = "; ".join(filter(None, [" | ".join(choices), comment]))
                shown_default = yaml.safe_dump(defaults[name], default_flow_style=True, width=math.inf)
                key = f"  {section.name}.{name}={shown_default}".replace("\n...", "").strip("\n")
                if len(key) >= 45:  # a long default (a list) gets its own line: words are never split
                    out.append(key)
                    key = ""
                out += textwrap.wrap(meaning, width=118, initial_indent=key.ljust(45), subsequent_indent=" " * 45,
                                     break_on_hyphens=False, break_long_words=False) or ([key] if key else [])
                above = []
            else:
                above = []
    return "\n".join(out)


def parse_args(argv: list[str] | None = None, description: str = "") -> Config:
    """``--config FILE.yaml`` plus ``section.key=value`` overrides -> a validated Config."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="overrides: section.key=value (YAML values), e.g. train.epochs=3 "
                                            "data.batch_size=128 model.head_hidden=[1024,512]\n\n"
                                            "keys (default, then meaning; defaults < --config < overrides):\n"
                                            + keys_help())
    parser.add_argument("--config", help="YAML file with config sections (see job/configs/)")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_args(argv)
    return load_config(args.config, args.overrides)
