"""Head, freeze rules, and where pretrained weights come from (timm's real loading path)."""
from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn

from job.config import load_config
from job.model import Strategy, WeightsError, build_head, create_model

SMALL = ["model.name=test_resnet", "model.pretrained=false"]


def test_head_follows_the_recipe():
    head = build_head(1536, 10, [1024, 512, 256], dropout=0.3)
    kinds = [type(m).__name__ for m in head]
    assert kinds == ["GlobalAvgPool", "Dropout", "Flatten",
                     "Linear", "BatchNorm1d", "ReLU", "Dropout", "Linear", "BatchNorm1d", "ReLU", "Dropout",
                     "Linear", "BatchNorm1d", "ReLU", "Dropout", "Linear"]
    assert [m.out_features for m in head if isinstance(m, nn.Linear)] == [1024, 512, 256, 10]
    out = head.eval()(torch.randn(4, 1536, 8, 8))
    assert out.shape == (4, 10)
    x = torch.randn(2, 1536, 5, 5)
    assert torch.allclose(head[0](x), x.mean(dim=(2, 3)))  # global average pooling


def test_inception_resnet_v2_shapes_and_preprocessing():
    model, prep = create_model(load_config(None, ["model.pretrained=false", "model.head_hidden=[64]"]).model, 10)
    assert (prep.image_size, prep.mean, prep.std) == (299, (0.5,) * 3, (0.5,) * 3)
    assert model.backbone.num_features == 1536
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 75, 75)).shape == (1, 10)  # smallest size IRv2 accepts


def test_feature_extraction_trains_only_the_head_and_freezes_bn_statistics():
    model, _ = create_model(load_config(None, SMALL).model, 10)
    model.freeze_backbone(True)
    model.train()
    bn_before = {k: v.clone() for k, v in model.backbone.state_dict().items() if "running" in k}
    weights_before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loss = nn.functional.cross_entropy(model(torch.randn(8, 3, 32, 32) * 3 + 1), torch.arange(8))
    loss.backward()
    opt.step()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert all(p.grad is not None for p in model.head.parameters())
    assert not model.backbone.training and model.head.training
    after = model.backbone.state_dict()
    assert bn_before and all(torch.equal(v, after[k]) for k, v in bn_before.items())
    assert all(torch.equal(v, after[k]) for k, v in weights_before.items())
    model.freeze_backbone(False)
    model.train()
    assert model.backbone.training and all(p.requires_grad for p in model.backbone.parameters())


def test_two_stage_switches_at_head_epochs():
    def strategy(*overrides):
        return Strategy.from_config(load_config(None, list(overrides)).train)

    two_stage = strategy("train.strategy=two_stage", "train.head_epochs=2", "train.epochs=5")
    assert [two_stage.frozen_at(e) for e in range(5)] == [True, True, False, False, False]
    assert two_stage.trains_backbone and two_stage.head_only_stage
    finetune, frozen = strategy("train.strategy=finetune"), strategy("train.strategy=feature_extraction")
    assert not any(finetune.frozen_at(e) for e in range(3)) and finetune.trains_backbone
    assert all(frozen.frozen_at(e) for e in range(3)) and not frozen.trains_backbone
    assert not finetune.head_only_stage and not frozen.head_only_stage


@pytest.mark.parametrize("fmt", ["safetensors", "pth", "pth_wrapped"])
def test_pretrained_weights_from_a_local_file_go_through_timm(tmp_path, fmt):
    reference = timm.create_model("test_resnet", pretrained=False, num_classes=1000)
    state = reference.state_dict()  # a full ImageNet-style checkpoint, classifier included
    path = tmp_path / f"weights.{'safetensors' if fmt == 'safetensors' else 'pth'}"
    if fmt == "safetensors":
        save_file(state, str(path))
    else:
        torch.save({"state_dict": state} if fmt == "pth_wrapped" else state, path)
    cfg = load_config(None, ["model.name=test_resnet", "model.pretrained=true", f"model.weights={path}"])
    model, _ = create_model(cfg.model, 10)
    loaded = model.backbone.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items() if k in loaded)
    assert not any(k.startswith("fc.") for k in loaded)  # ImageNet classifier dropped
    assert len([k for k in state if k in loaded]) == len(loaded)


def test_weights_file_errors(tmp_path):
    with pytest.raises(WeightsError, match="x.pth does not exist"):
        create_model(load_config(None, ["model.name=test_resnet", f"model.weights={tmp_path / 'x.pth'}"]).model, 10)
    other = timm.create_model("test_efficientnet", pretrained=False).state_dict()
    save_file(other, str(tmp_path / "other.safetensors"))
    with pytest.raises(WeightsError, match="other.safetensors.*test_resnet"):
        create_model(load_config(None, ["model.name=test_resnet",
                                        f"model.weights={tmp_path / 'other.safetensors'}"]).model, 10)


def test_unreachable_hub_is_a_clear_error_not_random_weights(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-cache"))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    with pytest.raises(WeightsError) as err:
        create_model(load_config(None, ["model.name=test_resnet", "model.pretrained=true"]).model, 10)
    message = str(err.value)
    assert "Hugging Face Hub" in message and "timm/test_resnet" in message
    assert "model.weights=" in message and "model.pretrained=false" in message


def test_unknown_model_name():
    with pytest.raises(WeightsError, match="not a timm model"):
        create_model(load_config(None, ["model.name=resnet_does_not_exist"]).model, 10)
