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


# Keys that moved to their component's section (issue #29): an old config gets the new name.
MOVED_KEYS = {
    "train.cache_features": "features.cache", "train.feature_dtype": "features.dtype",
    "train.feature_cache_dir": "features.cache_dir", "train.probe_l2_grid": "probe.l2_grid",
    "train.ema_epochs": "ema.epochs", "train.mixup_alpha": "mix.mixup_alpha", "train.cutmix_alpha": "mix.cutmix_alpha",
    "train.mix_prob": "mix.prob", "train.mix_off_epoch": "mix.off_epoch", "train.test_tta": "tta.test",
    "train.keep_checkpoints": "checkpoint.keep", "train.checkpoint_every_minutes": "checkpoint.every_minutes",
    "train.setup_timeout_minutes": "timeouts.setup_minutes", "train.step_timeout_minutes": "timeouts.step_minutes",
    "train.sync_batchnorm": "ddp.sync_batchnorm",
}
# Keys no run ever changed, now constants where they act (STYLE.md: a key only with a run that changes it).
REMOVED_KEYS = {
    "model.head_activation": "the head's activation is ReLU (job/model.py HEAD_ACTIVATION)",
    "train.probe_tol": "the probe's tolerance is job/linear_probe.py PROBE_TOL = 1e-6",
    "train.probe_max_iter": "the probe's iterations are job/linear_probe.py PROBE_MAX_ITER = 1000",
    "train.ddp_gradient_as_bucket_view": "DDP keeps its defaults until a cluster measures otherwise",
    "train.ddp_broadcast_buffers": "DDP keeps its defaults until a cluster measures otherwise",
    "train.ddp_comm_hook": "DDP keeps its defaults until a cluster measures otherwise",
}


class BadInput(Exception):
    """Input the run cannot use (a config, a checkpoint, a diverging recipe): the message says what
    happened and the way out; job/train.py turns every kind into exit 2."""


class ConfigError(BadInput, ValueError):
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
    # Pixels per side of the training images; None = the model's pretrained input size (299). A list
    # is progressive resizing (job/resize.py): epoch i (0-based) trains at entry i, later epochs at the
    # last; low resolution early, full late (fast.ai's DAWNBench, EfficientNetV2). Not with cached features.
    image_size: int | list[int] | None = None
    # FixRes (Touvron et al. 2019): validation, test, best/model.json and every tool that serves the
    # model evaluate at this size; None = the last training size. Training is unchanged by it.
    test_image_size: int | None = None
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

    def problems(self) -> list[tuple[bool, str]]:
        return [
            *self._size_problems(),
            (self.batch_size >= 1, "data.batch_size must be >= 1"),
            (self.global_batch_size is None or self.global_batch_size >= 1,
             "data.global_batch_size must be >= 1, or null to use data.batch_size per process"),
            (0.0 < self.val_fraction < 1.0, "data.val_fraction must be in (0, 1): training needs a validation "
                                            "split (a folder source's val/ folder, when present, replaces it)"),
            (self.split_seed >= 0, "data.split_seed must be >= 0"),
            (self.num_threads >= 1, "data.num_threads must be >= 1"),
            (self.rand_augment_n >= 1, "data.rand_augment_n must be >= 1 (operations per image)"),
            (0 <= self.rand_augment_m <= 30, "data.rand_augment_m must be in [0, 30] (DALI's magnitude bins)"),
            (self.source != "folder" or self.root, "data.root is required for data.source=folder"),
            (not self.download or self.source == "cifar10", "data.download only applies to data.source=cifar10"),
        ]

    def _size_problems(self) -> list[tuple[bool, str]]:
        """data.image_size (an int, or each entry of a list, named by its index) and data.test_image_size
        in [16, MAX_IMAGE_SIZE]; whether the architecture takes them is job/model.py's check."""
        def ok(size: int | None) -> bool:
            return size is None or 16 <= size <= MAX_IMAGE_SIZE

        test = (ok(self.test_image_size), f"data.test_image_size={self.test_image_size} must be in [16, "
                                          f"{MAX_IMAGE_SIZE}] (MAX_IMAGE_SIZE), or null to evaluate at the last "
                                          "training size")
        if not isinstance(self.image_size, list):
            return [(ok(self.image_size), f"data.image_size must be in [16, {MAX_IMAGE_SIZE}] (MAX_IMAGE_SIZE), "
                                          "or null for the model's size"), test]
        bad = [(i, size) for i, size in enumerate(self.image_size) if not ok(size)]
        entry = f"data.image_size[{bad[0][0]}]={bad[0][1]}" if bad else ""
        return [(len(self.image_size) >= 1, "data.image_size=[] lists no size: give one per epoch (e.g. [96, 128, "
                                            "160]), a single size, or null for the model's size"),
                (not bad, f"{entry} must be in [16, {MAX_IMAGE_SIZE}] (MAX_IMAGE_SIZE): every entry of "
                          "data.image_size is one epoch's training size; fix that entry"), test]


@dataclass
class ModelConfig:
    name: str = "inception_resnet_v2"  # any timm model name
    pretrained: bool = True  # ImageNet weights: from `weights` if set, else the Hugging Face Hub
    weights: str | None = None  # local .safetensors or PyTorch state dict, for offline clusters
    # dense->BN->act->dropout blocks; [] = a linear head (measured best on short runs, see
    # docs/BENCHMARKS.md); the presets use the recipe's deeper heads
    head_hidden: list[int] = field(default_factory=list)
    head_dropout: float = 0.0  # after pooling and after each hidden block

    def problems(self) -> list[tuple[bool, str]]:
        return [(all(h >= 1 for h in self.head_hidden), "model.head_hidden sizes must be >= 1"),
                (0.0 <= self.head_dropout < 1.0, "model.head_dropout must be in [0, 1)")]


@dataclass
class TrainConfig:
    # linear_probe: frozen backbone, cached features, a linear head solved by L-BFGS over an L2 grid
    strategy: Literal["feature_extraction", "finetune", "two_stage", "linear_probe"] = "finetune"
    head_epochs: int = 1  # two_stage: epochs with the backbone frozen before everything trains
    epochs: int = 10
    device: Literal["auto", "cuda", "cpu"] = "auto"  # auto: CUDA if it works; error if GPUs exist but it does not
    mixed_precision: Literal["auto", "bf16", "fp16", "no"] = "auto"  # auto: bf16 on a GPU that has it natively
    seed: int = 0  # model init, dropout, shuffling and augmentation
    output_dir: str = "runs/default"
    resume: str = "auto"  # auto (latest checkpoint in output_dir, if any) | never | a checkpoint dir
    grad_accum_steps: int = 1  # micro-batches per optimizer step
    grad_clip: float = 0.0  # max global gradient L2 norm; 0 disables clipping (timm's default)
    compile: bool = False  # torch.compile the model (GPU runs; minutes of warm-up)
    channels_last: bool = False  # NHWC memory format end to end (faster convolutions on GPUs)
    log_every: int = 20  # optimizer steps between step-level logs (each costs one host sync)
    signal_check_every: int = 10  # steps between cross-rank checks for SIGTERM (one sync each)

    def problems(self) -> list[tuple[bool, str]]:
        return [
            (self.epochs >= 1, "train.epochs must be >= 1"),
            (self.strategy != "two_stage" or 1 <= self.head_epochs < self.epochs,
             "train.head_epochs must be in [1, train.epochs) for train.strategy=two_stage"),
            (self.seed >= 0, "train.seed must be >= 0"),
            (self.grad_accum_steps >= 1, "train.grad_accum_steps must be >= 1"),
            (self.grad_clip >= 0, "train.grad_clip must be >= 0 (0 disables clipping)"),
            (self.log_every >= 1 and self.signal_check_every >= 1,
             "train.log_every and train.signal_check_every must be >= 1"),
        ]


@dataclass
class FeaturesConfig:
    # The frozen backbone's features computed once (no augmentation), the head trained on them
    # (job/features.py): auto = on for feature_extraction and linear_probe, false = images every epoch.
    cache: Literal["auto", "true", "false"] = "auto"
    dtype: Literal["float16", "float32"] = "float16"  # of the cached features
    cache_dir: str | None = None  # None = {data.prepared_dir}/features

    def problems(self) -> list[tuple[bool, str]]:
        return []


@dataclass
class TrunkConfig:
    # Partial fine-tuning over a cached trunk (job/trunk.py): the backbone's modules before this one are
    # frozen and their output maps of every image computed once, cached like features (features.dtype,
    # features.cache_dir); the modules from it on train with the head over the cache every epoch. A name
    # from `python -m job.trunk MODEL` (e.g. blocks.4 of an EfficientNet); null = off.
    train_from: str | None = None
    views: int = 2  # cached views of each training image: 1 = the image, 2 = and its mirror image (a flip)
    # The image loaders' random shift (up to 4 of 32 px) applied to the cached training maps, rounded to
    # whole map cells, zero-filled: a translation-equivariant trunk's maps of the shifted image, but at the borders
    shift: bool = False

    def problems(self) -> list[tuple[bool, str]]:
        return [(self.views in (1, 2), f"trunk.views={self.views}: 1 (the image) or 2 (and its mirror image)")]


@dataclass
class ProbeConfig:
    # linear_probe (job/linear_probe.py): the L2 strengths tried, in this order (each solve warm-starts
    # from the previous), on loss = mean cross-entropy + l2/2 ||W||^2 over standardized features
    # (bias unpenalised); the best on validation is kept. Default: 1 and 3 per decade, 1e1 to 1e-6
    l2_grid: list[float] = field(default_factory=lambda: [1e1, 3e0, 1e0, 3e-1, 1e-1, 3e-2, 1e-2, 3e-3, 1e-3,
                                                          3e-4, 1e-4, 3e-5, 1e-5, 3e-6, 1e-6])

    def problems(self) -> list[tuple[bool, str]]:
        return [(len(self.l2_grid) >= 1 and all(v > 0 for v in self.l2_grid),
                 "probe.l2_grid must be a non-empty list of L2 strengths > 0, e.g. [1.0, 0.1, 0.01]")]


@dataclass
class EmaConfig:
    # Weight EMA (job/ema.py): the averaging horizon in epochs (decay per update = 1 - 1/(epochs x
    # updates per epoch), with timm's warm-up); each epoch validates the raw and the averaged weights
    # and best/ keeps whichever validation picks. 0 = off
    epochs: float = 0.0

    def problems(self) -> list[tuple[bool, str]]:
        return [(self.epochs >= 0, "ema.epochs must be >= 0 (0 turns the weight EMA off)")]


@dataclass
class MixConfig:
    # Mixup / CutMix (timm's Mixup, per batch; job/mixing.py): the Beta(alpha, alpha) of each; with
    # both on, each mixed batch picks one at even odds. 0 = off. Mixup works on cached features too
    # (measured no gain on the demo's: docs/TRAINING.md)
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0  # CutMix's alpha, 0 = off; needs images (not with cached features)
    prob: float = 1.0  # probability that a batch is mixed
    off_epoch: int = 0  # from this 0-based epoch on, no mixing (timm's mixup_off_epoch); 0 = never

    def problems(self) -> list[tuple[bool, str]]:
        return [
            (self.mixup_alpha >= 0 and self.cutmix_alpha >= 0,
             "mix.mixup_alpha and mix.cutmix_alpha must be >= 0 (0 turns each off)"),
            (0.0 <= self.prob <= 1.0, "mix.prob must be in [0, 1]"),
            (self.off_epoch >= 0, "mix.off_epoch must be >= 0 (0 = mix every epoch)"),
        ]


@dataclass
class TtaConfig:
    # flip: the test is also run averaging each image's and its mirror's softmax, reported beside
    # the plain accuracy (test_accuracy_tta), never instead of it (job/tta.py)
    test: Literal["none", "flip"] = "none"

    def problems(self) -> list[tuple[bool, str]]:
        return []


@dataclass
class CheckpointConfig:
    keep: int = 2  # most recent checkpoints kept in output_dir/checkpoints
    # A mid-epoch checkpoint (the SIGTERM one, resumable) at least this often, besides those at
    # epoch ends and on SIGTERM: bounds the work lost with a node that vanishes without SIGTERM,
    # or whose grace period is too short for a save (spot on GKE: 15 s). 0 = off.
    every_minutes: float = 30.0

    def problems(self) -> list[tuple[bool, str]]:
        return [(self.keep >= 1, "checkpoint.keep must be >= 1"),
                (self.every_minutes >= 0, "checkpoint.every_minutes must be >= 0 (0 = off)")]


@dataclass
class TimeoutsConfig:
    # Collective timeouts (minutes): generous while ranks wait for data preparation, Hub
    # downloads and compilation; short once training runs, so ranks whose peer vanished stop
    # (and the job restarts from its checkpoint) instead of hanging.
    setup_minutes: float = 60.0
    step_minutes: float = 5.0

    def problems(self) -> list[tuple[bool, str]]:
        return [(self.setup_minutes > 0 and self.step_minutes > 0,
                 "timeouts.setup_minutes and timeouts.step_minutes must be > 0")]


@dataclass
class DdpConfig:
    # Batch-norm statistics over every process's images (SyncBatchNorm) instead of each process's
    # own: auto = on with more than one GPU process and a per-process batch below 32, where a BN
    # batch of 16 on 16 GPUs would otherwise see 1/16 of the 256 images one GPU sees.
    sync_batchnorm: Literal["auto", "true", "false"] = "auto"

    def problems(self) -> list[tuple[bool, str]]:
        return []


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

    def problems(self) -> list[tuple[bool, str]]:
        return [
            (self.lr > 0, "optim.lr must be > 0"),
            (self.backbone_lr_scale >= 0, "optim.backbone_lr_scale must be >= 0"),
            (self.weight_decay >= 0, "optim.weight_decay must be >= 0"),
            (self.layer_decay is None or 0 < self.layer_decay <= 1, "optim.layer_decay must be in (0, 1], "
                                                                    "or null for no layer-wise LR decay"),
            (self.layer_decay is None or self.backbone_lr_scale == 1.0,
             "optim.layer_decay and optim.backbone_lr_scale both scale the backbone's LR: set one (backbone_lr_scale "
             "back to 1.0, or layer_decay to null)"),
            (0.0 <= self.momentum < 1.0, "optim.momentum must be in [0, 1)"),
        ]


@dataclass
class LossConfig:
    label_smoothing: float = 0.0  # cross-entropy target smoothing; 0 = plain cross-entropy

    def problems(self) -> list[tuple[bool, str]]:
        return [(0.0 <= self.label_smoothing < 1.0, "loss.label_smoothing must be in [0, 1)")]


@dataclass
class ScheduleConfig:
    name: Literal["cosine", "step", "plateau"] = "cosine"
    warmup_epochs: float = 1.0  # linear warm-up from warmup_lr, stepped per optimizer update
    warmup_lr: float = 1e-5
    min_lr: float = 1e-6  # cosine floor; plateau never decays below it
    decay_epochs: float = 3.0  # step: decay every this many epochs
    decay_rate: float = 0.1  # step and plateau: LR multiplier at each decay
    plateau_patience: int = 2  # plateau: epochs without val improvement before a decay

    def problems(self) -> list[tuple[bool, str]]:
        return [
            (self.warmup_epochs >= 0, "schedule.warmup_epochs must be >= 0"),
            (self.min_lr >= 0 and self.warmup_lr >= 0, "schedule.min_lr and warmup_lr must be >= 0"),
            (self.decay_epochs > 0, "schedule.decay_epochs must be > 0"),
            (0 < self.decay_rate < 1, "schedule.decay_rate must be in (0, 1)"),
        ]


@dataclass
class EarlyStoppingConfig:
    metric: Literal["val_accuracy", "val_loss"] = "val_accuracy"
    patience: int = 5  # epochs without improvement before stopping; 0 disables early stopping
    min_delta: float = 0.0  # smallest change that counts as an improvement

    def problems(self) -> list[tuple[bool, str]]:
        return [(self.patience >= 0, "early_stopping.patience must be >= 0 (0 disables it)"),
                (self.min_delta >= 0, "early_stopping.min_delta must be >= 0")]


@dataclass
class TrackingConfig:
    wandb: Literal["auto", "online", "offline", "disabled"] = "auto"
    project: str = "cifar-transfer"
    entity: str | None = None
    run_name: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)

    def problems(self) -> list[tuple[bool, str]]:
        return []


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    trunk: TrunkConfig = field(default_factory=TrunkConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    mix: MixConfig = field(default_factory=MixConfig)
    tta: TtaConfig = field(default_factory=TtaConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    timeouts: TimeoutsConfig = field(default_factory=TimeoutsConfig)
    ddp: DdpConfig = field(default_factory=DdpConfig)
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
    for old in (prefix + u for u in unknown):
        if old in MOVED_KEYS:
            raise ConfigError(f"{old} is now {MOVED_KEYS[old]}: rename it in the config file or override")
        if old in REMOVED_KEYS:
            raise ConfigError(f"{old} is no longer a key ({REMOVED_KEYS[old]}); remove it")
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
        inner = [a for a in args if a is not type(None)]
        if len(inner) > 1:  # int | list[int]: the list form for a list, the other for anything else
            inner = [a for a in inner if (typing.get_origin(a) is list) == isinstance(value, list)] or inner
        return _coerce(value, inner[0], key)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, e.g. {key}=[512,256]; got {shown(value)}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    return _coerce_scalar(value, hint, key)


def _coerce_scalar(value: Any, hint: Any, key: str) -> Any:
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


def training_sizes(image_size: int | list[int] | None, pretrained: int) -> list[int]:
    """``data.image_size`` as training sizes, one per epoch from the first (the last repeats for the
    epochs after it): the list itself, one size, or the model's ``pretrained`` size for null."""
    if image_size is None:
        return [pretrained]
    return list(image_size) if isinstance(image_size, list) else [image_size]


def serving_size(image_size: int | list[int] | None, test_image_size: int | None, pretrained: int) -> int:
    """The one size validation, test, ``best/model.json`` and every tool that serves the model use:
    ``data.test_image_size`` (FixRes), else the last training size."""
    if test_image_size is not None:
        return test_image_size
    return training_sizes(image_size, pretrained)[-1]


def validate(cfg: Config) -> None:
    """Each section's own range checks (its ``problems()``, beside its fields), then the rules
    that span sections, then the paths."""
    checks = [check for section in dataclasses.fields(cfg) for check in getattr(cfg, section.name).problems()]
    for ok, message in checks + cross_section_problems(cfg):
        if not ok:
            raise ConfigError(message)
    _check_paths(cfg)


def cross_section_problems(cfg: Config) -> list[tuple[bool, str]]:
    """The rules between sections: what the strategy allows of the feature cache, the head, mixing and
    the image sizes."""
    strategy, cache = cfg.train.strategy, cfg.features.cache
    return [
        (cache != "true" or strategy in ("feature_extraction", "linear_probe"),
         "features.cache=true needs train.strategy=feature_extraction or linear_probe: features can be cached "
         "only while the backbone is frozen for the whole run"),
        (strategy != "linear_probe" or cache != "false",
         "features.cache=false with train.strategy=linear_probe: the probe is solved on the cached features "
         "of every image (no augmentation); set features.cache=auto, or use train.strategy=feature_extraction "
         "to train a head on images every epoch"),
        (strategy != "linear_probe" or not cfg.model.head_hidden,
         f"model.head_hidden={cfg.model.head_hidden} with train.strategy=linear_probe: the probe is one linear layer; "
         "set model.head_hidden=[] (or use train.strategy=feature_extraction for a deeper head)"),
        (cfg.mix.cutmix_alpha == 0 or strategy != "feature_extraction" or cache == "false",
         cutmix_on_features_message(cfg.mix.cutmix_alpha)),
        *_image_size_rules(cfg),
        *_trunk_rules(cfg),
    ]


def _trunk_rules(cfg: Config) -> list[tuple[bool, str]]:
    """A cached trunk (job/trunk.py) trains part of the backbone, from cached maps of unaugmented images."""
    if cfg.trunk.train_from is None:
        return []
    on = f"trunk.train_from={cfg.trunk.train_from}"
    return [
        (cfg.train.strategy == "finetune",
         f"{on} with train.strategy={cfg.train.strategy}: a cached trunk trains the backbone from that module on; "
         "set train.strategy=finetune, or trunk.train_from=null"),
        (cfg.features.cache != "false",
         f"{on} with features.cache=false: the trunk's maps are always cached; set features.cache=auto, or "
         "trunk.train_from=null to train every layer on images"),
        (cfg.data.auto_augment == "none",
         f"{on} with data.auto_augment={cfg.data.auto_augment}: the trunk's maps are computed once, from "
         "unaugmented images (trunk.views=2 adds each mirror image); set data.auto_augment=none"),
        (cfg.mix.cutmix_alpha == 0,
         f"{on} with mix.cutmix_alpha={cfg.mix.cutmix_alpha:g}: CutMix pastes image boxes, not cached maps; set "
         "mix.cutmix_alpha=0 (mix.mixup_alpha works on cached maps)"),
    ]


def _image_size_rules(cfg: Config) -> list[tuple[bool, str]]:
    """Progressive resizing and FixRes (job/resize.py) need images every epoch (cached features are
    computed once, at one size, for every split), and a list of sizes no longer than the run."""
    data, strategy, epochs = cfg.data, cfg.train.strategy, cfg.train.epochs
    sizes = data.image_size if isinstance(data.image_size, list) else [data.image_size]
    cached = strategy == "linear_probe" or (strategy == "feature_extraction" and cfg.features.cache != "false")
    why = (f"with cached features (train.strategy={strategy}): the frozen backbone's features of every split are "
           "computed once, at one size")
    if cfg.trunk.train_from is not None:
        cached, why = True, (f"with a cached trunk (trunk.train_from={cfg.trunk.train_from}): its maps are computed "
                             "once, at one size")
    other = (", or features.cache=false (images through the frozen backbone every epoch)"
             if strategy == "feature_extraction" else "")
    return [
        (not cached or len(set(sizes)) <= 1,
         f"data.image_size={data.image_size} {why}; set data.image_size to one size (e.g. {sizes[-1] if sizes else 0})"
         f"{other}"),
        (not cached or data.test_image_size is None or set(sizes) == {data.test_image_size},
         f"data.test_image_size={data.test_image_size} {why}; set data.image_size={data.test_image_size} instead "
         f"(and data.test_image_size=null){other}"),
        (not isinstance(data.image_size, list) or len(data.image_size) <= epochs,
         f"data.image_size lists {len(sizes)} sizes, one per epoch, but train.epochs={epochs}: the entries past the "
         f"last epoch would never train. Shorten the list to {epochs} entries (data.test_image_size sets the "
         "evaluation size)"),
    ]


def _check_paths(cfg: Config) -> None:
    """What the run writes stays out of the dataset, and a named checkpoint to resume is one of ours."""
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
                           ("features.cache_dir", cfg.features.cache_dir)):
            written = _resolved(value, key) if value else None
            if written is not None and (written.is_relative_to(root) or root.is_relative_to(written)):
                raise ConfigError(f"{key}={value} overlaps data.root={cfg.data.root} (one is inside the other): the "
                                  f"run would write into the dataset. Put {key} outside data.root")
    if cfg.train.resume not in ("auto", "never") and not (Path(cfg.train.resume) / CHECKPOINT_MARKER).is_file():
        raise ConfigError(f"train.resume={cfg.train.resume!r}: not a checkpoint written by this job (no "
                          f"{CHECKPOINT_MARKER}); use auto, never, or an OUTPUT_DIR/checkpoints/epoch*-step* directory")


def cutmix_on_features_message(cutmix_alpha: float) -> str:
    return (f"mix.cutmix_alpha={cutmix_alpha:g} with cached features (train.strategy=feature_extraction and "
            "features.cache auto or true): CutMix pastes image boxes and is undefined on feature vectors. Set "
            "features.cache=false (images through the frozen backbone every epoch), or mix.cutmix_alpha=0 "
            "(mix.mixup_alpha works on cached features)")


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
