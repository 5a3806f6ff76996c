"""The network: a timm backbone without its classifier, the user's head on top, and the strategy that
says when the backbone is frozen (the model card that lets a finished run be rebuilt: job/card.py).
Pretrained weights come from the Hugging Face Hub or a local file (job/weights.py), never
silently random.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import timm
import timm.data
import torch
from torch import nn

from dali_pipelines.spec import Preprocessing
from job.config import ConfigError, ModelConfig, TrainConfig, serving_size
from job.weights import WeightsError, ensure_packaged, load_backbone_weights

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}
# The activation of the head's hidden blocks (model.head_activation until no run changed it). A
# card records it, and a card naming another is refused (job/card.py), not loaded into a ReLU head.
HEAD_ACTIVATION = "relu"


class GlobalAvgPool(nn.Module):
    """Average over space (NCHW feature maps) or tokens (NLC sequences, e.g. ViTs); already
    pooled (N, C) features (the feature cache's) pass through."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 2:
            return x
        return x.mean(dim=(2, 3)) if x.ndim == 4 else x.mean(dim=1)


def build_head(in_features: int, num_classes: int, hidden: list[int], dropout: float,
               activation: str = "relu") -> nn.Sequential:
    """pool -> dropout -> flatten -> [dense -> batch norm -> activation -> dropout] x N -> dense.

    ``hidden=[]`` with ``dropout=0`` is a linear probe. Emits logits: the softmax lives in the
    loss (cross-entropy) and in predictions.
    """
    layers: list[nn.Module] = [GlobalAvgPool(), nn.Dropout(dropout), nn.Flatten()]
    width = in_features
    for size in hidden:
        # No bias before batch norm: BN's shift makes it redundant.
        layers += [nn.Linear(width, size, bias=False), nn.BatchNorm1d(size),
                   ACTIVATIONS[activation](), nn.Dropout(dropout)]
        width = size
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


class TransferModel(nn.Module):
    """``head(backbone.forward_features(x))`` with a switch that freezes the backbone.

    A frozen backbone gets no gradients and stays in eval mode even under ``model.train()``,
    so its batch-norm running statistics keep their pretrained values.
    """

    def __init__(self, backbone: nn.Module, head: nn.Sequential):
        super().__init__()
        self.backbone, self.head = backbone, head
        self.backbone_frozen = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone.forward_features(x))

    def pooled_features(self, x: torch.Tensor) -> torch.Tensor:
        """What the head's first layer makes of the backbone's output: (N, num_features)."""
        return self.head[0](self.backbone.forward_features(x))

    def freeze_backbone(self, frozen: bool) -> None:
        self.backbone_frozen = frozen
        self.backbone.requires_grad_(not frozen)
        self.train(self.training)

    def train(self, mode: bool = True) -> "TransferModel":
        super().train(mode)
        if self.backbone_frozen:
            self.backbone.eval()
        return self


# The backbone never trains: feature_extraction (a head trained on its features) and linear_probe
# (a linear head solved on its cached features, job/linear_probe.py).
FROZEN_STRATEGIES = ("feature_extraction", "linear_probe")


@dataclass(frozen=True)
class Strategy:
    """When the backbone trains: ``feature_extraction`` and ``linear_probe`` never, ``finetune``
    always, ``two_stage`` after ``head_epochs`` epochs of the head alone."""

    name: str
    head_epochs: int = 0

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> "Strategy":
        return cls(cfg.strategy, cfg.head_epochs if cfg.strategy == "two_stage" else 0)

    def frozen_at(self, epoch: int) -> bool:
        return self.name in FROZEN_STRATEGIES or (self.name == "two_stage" and epoch < self.head_epochs)

    @property
    def trains_backbone(self) -> bool:
        """Whether the backbone trains at some epoch (then the optimizer needs its groups)."""
        return self.name not in FROZEN_STRATEGIES

    @property
    def head_only_stage(self) -> bool:
        """two_stage: DDP is built with every parameter (so that the unfrozen backbone is
        synchronised later), and the frozen stage, whose backbone gets no gradient, runs through a
        head-only wrapper (job/distributed.py: head_only_step; job/modes.py: ImageMode.wrap)."""
        return self.name == "two_stage"


def create_model(cfg: ModelConfig, num_classes: int, image_size: int | list[int] | None = None,
                 test_image_size: int | None = None) -> tuple[TransferModel, Preprocessing]:
    """The backbone (pretrained as ``cfg`` says) and a new head. ``image_size`` (data.image_size: one
    size, a size per epoch, or None for the pretrained size) and ``test_image_size`` are each checked
    against what the architecture accepts; the Preprocessing returned is the one the model is
    evaluated and served at (job/config.py: serving_size), which its card records."""
    backbone = create_backbone(cfg)
    prep = preprocessing(backbone)
    for key, size in named_sizes(image_size, test_image_size):
        check_input_size(backbone, cfg.name, size, prep.image_size, key)
    prep = dataclasses.replace(prep, image_size=serving_size(image_size, test_image_size, prep.image_size))
    head = build_head(backbone.num_features, num_classes, cfg.head_hidden, cfg.head_dropout, HEAD_ACTIVATION)
    return TransferModel(backbone, head), prep


def named_sizes(image_size: int | list[int] | None, test_image_size: int | None) -> list[tuple[str, int]]:
    """Each distinct size the config names, with the key that names it (``data.image_size[i]`` for a
    list's first entry of that size): what ``check_input_size`` checks."""
    if isinstance(image_size, list):
        named = {}
        for i, size in enumerate(image_size):
            named.setdefault(size, f"data.image_size[{i}]")
        pairs = [(key, size) for size, key in named.items()]
    else:
        pairs = [] if image_size is None else [("data.image_size", image_size)]
    if test_image_size is not None and test_image_size not in {size for _, size in pairs}:
        pairs.append(("data.test_image_size", test_image_size))
    return pairs


def preprocessing(backbone: nn.Module) -> Preprocessing:
    data_cfg = timm.data.resolve_model_data_config(backbone)
    return Preprocessing(image_size=int(data_cfg["input_size"][-1]),
                         mean=tuple(float(m) for m in data_cfg["mean"]),
                         std=tuple(float(s) for s in data_cfg["std"]))


def check_input_size(backbone: nn.Module, name: str, size: int, pretrained_size: int,
                     key: str = "data.image_size") -> None:
    """One tiny forward pass: some architectures cannot shrink a small image far enough
    (Inception-ResNet-V2 needs at least 75 px), others take only their own size (a ViT's patch
    grid is fixed: timm asserts it). ``key`` names the size in the refusal (``data.image_size[1]``:
    an entry of a list)."""
    if size == pretrained_size:
        return
    was_training = backbone.training
    try:
        with torch.no_grad():
            backbone.eval().forward_features(torch.zeros(1, 3, size, size))
    except (RuntimeError, AssertionError, ValueError) as e:
        what = "too small" if size < pretrained_size else "not an input size"
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        fix = {"data.image_size": "null for the pretrained size",
               "data.test_image_size": "null to evaluate at the last training size"}.get(
                   key, f"the pretrained size ({pretrained_size})")
        raise ConfigError(f"{key}={size} is {what} for {name} (its pretrained size is "
                          f"{pretrained_size}): {reason}. Use another {key.split('[')[0]}, or {fix}") from None
    finally:
        backbone.train(was_training)


def create_backbone(cfg: ModelConfig) -> nn.Module:
    """timm model without classifier or pooling. Pretrained weights: ``cfg.weights`` (loaded
    strictly, every key), else the Hub through timm's own loader."""
    if not timm.is_model(cfg.name):
        raise WeightsError(f"model.name={cfg.name!r} is not a timm model; see timm.list_models()")
    kwargs = dict(num_classes=0, global_pool="")
    if not cfg.pretrained or cfg.weights:
        backbone = timm.create_model(cfg.name, pretrained=False, **kwargs)
        if cfg.pretrained:
            ensure_packaged(cfg.weights, cfg.name)  # the demo's weights file, converted on first use
            load_backbone_weights(backbone, cfg.weights, cfg.name)
        return backbone
    try:
        return timm.create_model(cfg.name, pretrained=True, **kwargs)
    except Exception as e:  # noqa: BLE001 - hub/network errors come in many types
        hub_id = _hub_id(cfg.name)
        raise WeightsError(
            f"could not get the pretrained weights of {cfg.name!r} from the Hugging Face Hub ({hub_id}): "
            f"{type(e).__name__}: {e}\nOn a machine without internet: download them elsewhere "
            f"(`hf download {hub_id} model.safetensors`) and set model.weights=/path/to/model.safetensors, "
            "or point HF_HOME at a cache that holds them. model.pretrained=false trains from random "
            "weights instead (much lower accuracy).") from None


def weights_identity(cfg: ModelConfig, seed: int) -> str:
    """What determines the backbone's weights, for cache keys: the file's hash, the Hub tag, or
    the seed of a random initialisation."""
    import hashlib

    if not cfg.pretrained:
        return f"random:{seed}"
    if cfg.weights:
        with open(cfg.weights, "rb") as f:
            return f"file:{hashlib.file_digest(f, 'sha256').hexdigest()}"
    pretrained = timm.models.get_pretrained_cfg(cfg.name)
    return f"hub:{_hub_id(cfg.name)}:{getattr(pretrained, 'tag', None) or ''}"


def _hub_id(name: str) -> str:
    cfg = timm.models.get_pretrained_cfg(name)
    return getattr(cfg, "hf_hub_id", None) or name if cfg is not None else name
