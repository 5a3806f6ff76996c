"""The network: a timm backbone without its classifier, the user's head on top, freeze rules,
and where the pretrained weights come from (Hugging Face Hub or a local file, never silently random).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from job.config import ModelConfig

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}


class WeightsError(RuntimeError):
    """Pretrained weights could not be had; the message says how to provide them."""


class GlobalAvgPool(nn.Module):
    """Average over space (NCHW feature maps) or tokens (NLC sequences, e.g. ViTs)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3)) if x.ndim == 4 else x.mean(dim=1)


def build_head(in_features: int, num_classes: int, hidden: list[int], dropout: float,
               activation: str = "relu") -> nn.Sequential:
    """pool -> dropout -> flatten -> [dense -> batch norm -> activation -> dropout] x N -> dense.

    Emits logits: the softmax lives in the loss (cross-entropy) and in predictions.
    """
    layers: list[nn.Module] = [GlobalAvgPool(), nn.Dropout(dropout), nn.Flatten()]
    width = in_features
    for size in hidden:
        # No bias before batch norm: BN's shift makes it redundant.
        layers += [nn.Linear(width, size, bias=False), nn.BatchNorm1d(size),
                   _ACTIVATIONS[activation](), nn.Dropout(dropout)]
        width = size
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


class TransferModel(nn.Module):
    """``head(backbone.forward_features(x))`` with a switch that freezes the backbone.

    A frozen backbone gets no gradients and stays in eval mode even under ``model.train()``,
    so its batch-norm running statistics keep their pretrained values.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone, self.head = backbone, head
        self.backbone_frozen = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone.forward_features(x))

    def freeze_backbone(self, frozen: bool) -> None:
        self.backbone_frozen = frozen
        self.backbone.requires_grad_(not frozen)
        self.train(self.training)

    def train(self, mode: bool = True) -> "TransferModel":
        super().train(mode)
        if self.backbone_frozen:
            self.backbone.eval()
        return self


@dataclass(frozen=True)
class Preprocessing:
    """What the backbone expects, from timm's pretrained config (IRv2: 299, mean = std = 0.5)."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def create_model(cfg: ModelConfig, num_classes: int) -> tuple[TransferModel, Preprocessing]:
    backbone = create_backbone(cfg)
    head = build_head(backbone.num_features, num_classes, cfg.head_hidden, cfg.head_dropout,
                      cfg.head_activation)
    return TransferModel(backbone, head), preprocessing(backbone)


def load_trained(run_dir: str | Path) -> tuple[TransferModel, dict]:
    """The best model of a finished run (``run_dir/best``) and its ``model.json`` metadata."""
    import json

    import timm
    from safetensors.torch import load_file

    best = Path(run_dir) / "best"
    if not (best / "model.safetensors").is_file():
        raise WeightsError(f"{best}/model.safetensors not found: is {run_dir} the output_dir of a run "
                           "that finished at least one epoch?")
    meta = json.loads((best / "model.json").read_text())
    backbone = timm.create_model(meta["model"], pretrained=False, num_classes=0, global_pool="")
    head = build_head(backbone.num_features, meta["num_classes"], meta["head_hidden"], meta["head_dropout"],
                      meta["head_activation"])
    model = TransferModel(backbone, head)
    model.load_state_dict(load_file(str(best / "model.safetensors")))
    return model.eval(), meta


def preprocessing(backbone: nn.Module) -> Preprocessing:
    import timm.data

    data_cfg = timm.data.resolve_model_data_config(backbone)
    return Preprocessing(image_size=int(data_cfg["input_size"][-1]),
                         mean=tuple(float(m) for m in data_cfg["mean"]),
                         std=tuple(float(s) for s in data_cfg["std"]))


def create_backbone(cfg: ModelConfig) -> nn.Module:
    """timm model without classifier or pooling; pretrained weights through timm's own loader."""
    import timm

    if not timm.is_model(cfg.name):
        raise WeightsError(f"model.name={cfg.name!r} is not a timm model; see timm.list_models()")
    kwargs = dict(num_classes=0, global_pool="")
    if not cfg.pretrained:
        return timm.create_model(cfg.name, pretrained=False, **kwargs)
    if cfg.weights:
        path = Path(cfg.weights)
        if not path.is_file():
            raise WeightsError(f"model.weights={cfg.weights}: no such file; give a .safetensors file or a "
                               "PyTorch state dict of the ImageNet model")
        try:
            # Same loader as the Hub path: timm drops the ImageNet classifier and checks every key.
            return timm.create_model(cfg.name, pretrained=True, pretrained_cfg_overlay={"file": str(path)},
                                     **kwargs)
        except (RuntimeError, KeyError, ValueError, OSError) as e:
            raise WeightsError(f"model.weights={cfg.weights} does not fit model {cfg.name!r}: {e}") from None
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


def _hub_id(name: str) -> str:
    import timm

    cfg = timm.models.get_pretrained_cfg(name)
    return getattr(cfg, "hf_hub_id", None) or name if cfg is not None else name
