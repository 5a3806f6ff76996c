"""The weight EMA's update (job/ema.py): timm ModelEmaV3's numbers at a handful of aten ops."""
from __future__ import annotations

import timm
import torch
from helpers.aten_ops import AtenOps
from timm.utils import ModelEmaV3

from job.ema import WeightEma


def _train_a_little(model: torch.nn.Module, opt: torch.optim.Optimizer, gen: torch.Generator) -> None:
    model.train()
    x = torch.randn(4, 3, 32, 32, generator=gen)
    loss = model(x).square().mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


def test_ema_update_matches_timm_model_ema_v3_bit_for_bit_in_two_aten_ops():
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", pretrained=False, num_classes=10)
    ours = WeightEma(model, horizon_epochs=0.5, updates_per_epoch=8)  # decay 0.75 after the warm-up
    timms = ModelEmaV3(model, decay=ours.decay, use_warmup=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(1)
    entries = len(model.state_dict())
    for step in range(1, 7):
        _train_a_little(model, opt, gen)
        with AtenOps() as ops:
            ours.update(model, step=step)
        timms.update(model, step=step)
        # one foreach lerp (floats) + one foreach copy (num_batches_tracked); timm: one detach per entry
        assert ops.counts == {"_foreach_lerp_": 1, "_foreach_copy_": 1}, ops.counts
        assert ops.total <= 20
        for (name, a), b in zip(ours.state_dict().items(), timms.module.state_dict().values()):
            assert torch.equal(a, b), (step, name)
    with AtenOps() as ops:
        timms.update(model, step=7)
    assert ops.total > 2 * entries  # what the issue measured: the state_dict rebuild, every update
    assert any(not torch.equal(a, b) for a, b in zip(ours.state_dict().values(), model.state_dict().values()))


def test_ema_update_after_load_state_dict_reads_the_loaded_values():
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", pretrained=False, num_classes=10)
    ema = WeightEma(model, horizon_epochs=1.0, updates_per_epoch=4)
    ema.update(model, step=3)
    saved = {k: v.clone() for k, v in ema.state_dict().items()}
    twin = WeightEma(model, horizon_epochs=1.0, updates_per_epoch=4)
    twin.update(model, step=2)  # its lists are taken; loading must not leave them stale
    twin.load_state_dict(saved)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    _train_a_little(model, opt, torch.Generator().manual_seed(2))
    ema.update(model, step=4)
    twin.update(model, step=4)
    for (name, a), b in zip(ema.state_dict().items(), twin.state_dict().values()):
        assert torch.equal(a, b), name
