"""LR schedules against their formulas (1 and 2 processes), parameter groups, weight decay rules."""
from __future__ import annotations

import json
import math

import pytest
import torch

from helpers.runs import PYTHON, accelerate_launch, run
from job.config import load_config
from job.model import create_model
from job.optim import build_optimizer

LR, WARM_LR, MIN_LR = 0.1, 0.001, 0.0001


def cosine(t: int, total: int, warmup: int) -> float:
    """Linear warm-up over `warmup` updates, then cosine from LR to MIN_LR at `total`."""
    if t < warmup:
        return WARM_LR + t * (LR - WARM_LR) / warmup
    return MIN_LR + 0.5 * (LR - MIN_LR) * (1 + math.cos(math.pi * (t - warmup) / (total - warmup)))


def step_decay(t: int, updates_per_epoch: int, warmup: int) -> float:
    if t < warmup:
        return WARM_LR + t * (LR - WARM_LR) / warmup
    return LR * 0.5 ** ((t - warmup) // updates_per_epoch)  # after warm-up: decay_epochs=1, decay_rate=0.5


@pytest.fixture(scope="module", params=[1, 2], ids=["1-process", "2-processes"])
def curves(request, tmp_path_factory):
    """LR after every update of the real loop: cosine (4 epochs x 6 batches, accumulation 2),
    step (3 x 4), plateau (6 x 2); one launch per process count."""
    out = tmp_path_factory.mktemp("lr") / "curve.json"
    args = [str(out), "cosine:4:6:2", "step:3:4:1", "plateau:6:2:1"]
    if request.param == 1:
        run([PYTHON, "tests/helpers/lr_curve.py", *args])
    else:
        run(accelerate_launch(request.param, "tests/helpers/lr_curve.py", *args))
    return [json.loads(out.with_name(out.name + f".rank{r}").read_text()) for r in range(request.param)]


@pytest.mark.slow
def test_cosine_with_warmup_follows_its_formula_per_update(curves):
    updates, total = 3, 12  # 6 batches with accumulation 2: 3 updates per epoch
    for rank in curves:
        rank = rank["cosine"]
        assert rank["steps"] == total, "one scheduler step per optimizer update, on every rank"
        assert [s for s, _, _ in rank["lrs"]] == list(range(1, total + 1))
        for step, lr, backbone_lr in rank["lrs"]:
            assert lr == pytest.approx(cosine(step, total, warmup=updates), rel=1e-9)
            assert backbone_lr == pytest.approx(0.1 * lr, rel=1e-9)  # lr_scale honoured
    assert curves[0]["cosine"]["lrs"] == curves[-1]["cosine"]["lrs"]


@pytest.mark.slow
def test_step_schedule_follows_its_formula(curves):
    for rank in curves:
        assert len(rank["step"]["lrs"]) == 12
        for step, lr, _ in rank["step"]["lrs"]:
            assert lr == pytest.approx(step_decay(step, 4, warmup=4), rel=1e-9)


@pytest.mark.slow
def test_plateau_decays_after_patience(curves):
    for rank in curves:
        # Stepped per epoch: warm-up over epoch 0, then LR; the metric never improves after epoch 1,
        # so after `plateau_patience` (2) bad epochs the LR halves.
        per_epoch = [lr for step, lr, _ in rank["plateau"]["lrs"] if step % 2 == 0]
        assert per_epoch[0] == pytest.approx(WARM_LR)
        assert per_epoch[1] == pytest.approx(LR)
        assert per_epoch[-1] == pytest.approx(LR * 0.5) and len(set(per_epoch[1:])) == 2


def test_no_weight_decay_on_biases_and_norms_and_backbone_scale():
    cfg = load_config(None, ["model.name=test_resnet", "model.pretrained=false", "optim.weight_decay=0.05",
                             "optim.backbone_lr_scale=0.2"])
    model, _ = create_model(cfg.model, 10)
    optimizer = build_optimizer(model, cfg.optim, train_backbone=True)
    names = {id(p): n for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            no_decay = p.ndim <= 1  # biases and norm weights
            assert group["weight_decay"] == (0.0 if no_decay else 0.05), names[id(p)]
            assert group.get("lr_scale", 1.0) == (0.2 if names[id(p)].startswith("backbone.") else 1.0)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.defaults["nesterov"]
    frozen = build_optimizer(model, cfg.optim, train_backbone=False)
    assert {names[id(p)].split(".")[0] for g in frozen.param_groups for p in g["params"]} == {"head"}


def test_a_resumed_plateau_schedule_continues_where_it_stopped():
    """Saved and restored mid-run (through JSON, as trainer_state.json holds it), the plateau
    schedule keeps its best metric and bad-epoch count: the LR drops at the same epoch as in an
    uninterrupted run. Without the wrapped ReduceLROnPlateau's state it would drop later."""
    import json as json_module

    from job.optim import build_scheduler, load_scheduler_state, scheduler_state

    cfg = load_config(None, ["schedule.name=plateau", "schedule.plateau_patience=2", "schedule.warmup_epochs=0",
                             "optim.lr=0.1"])
    metrics = [0.5, 0.6, 0.55, 0.55, 0.55, 0.55, 0.55]  # best at epoch 1, then no improvement

    def fresh():
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        return optimizer, build_scheduler(optimizer, cfg.schedule, epochs=7, updates_per_epoch=1, plateau_mode="max")

    optimizer, scheduler = fresh()
    straight = []
    for epoch, metric in enumerate(metrics):
        scheduler.step(epoch + 1, metric)
        straight.append(optimizer.param_groups[0]["lr"])
    optimizer, scheduler = fresh()
    resumed = []
    for epoch, metric in enumerate(metrics):
        if epoch == 3:  # preempted after 3 epochs: a new process restores the saved state
            saved = json_module.loads(json_module.dumps(scheduler_state(scheduler)))
            lr = optimizer.param_groups[0]["lr"]
            optimizer, scheduler = fresh()
            optimizer.param_groups[0]["lr"] = lr  # the optimizer's own state (Accelerate restores it)
            load_scheduler_state(scheduler, saved)
        scheduler.step(epoch + 1, metric)
        resumed.append(optimizer.param_groups[0]["lr"])
    assert resumed == straight
    assert straight[0] == 0.1 and straight[-1] < 0.1  # it did decay within the run


def test_layer_decay_gives_each_depth_the_head_lr_times_decay_to_its_depth_at_every_step():
    """optim.layer_decay: the head at full LR (depth 0), the backbone's groups (timm's
    group_matcher) at lr x decay^depth, as the schedule moves; lr_scale reaches the optimizer
    through timm's scheduler."""
    from timm.models import group_parameters

    from job.optim import build_scheduler

    cfg = load_config(None, ["model.name=resnet10t", "model.pretrained=false", "optim.layer_decay=0.5",
                             "optim.lr=0.1", "schedule.warmup_epochs=1"])
    model, _ = create_model(cfg.model, 10)
    optimizer = build_optimizer(model, cfg.optim, train_backbone=True)
    scheduler = build_scheduler(optimizer, cfg.schedule, epochs=3, updates_per_epoch=4, plateau_mode="max")
    depth_of = group_parameters(model.backbone, model.backbone.group_matcher(coarse=False), reverse=True)
    deepest = max(depth_of.values())
    names = {id(p): n for n, p in model.backbone.named_parameters()}
    head = {id(p) for p in model.head.parameters()}
    seen_depths = set()
    for update in (0, 2, 5, 11):
        scheduler.step_update(num_updates=update)
        head_lr = optimizer.param_groups[0]["lr"]
        for group in optimizer.param_groups:
            for p in group["params"]:
                if id(p) in head:
                    assert group["lr"] == pytest.approx(head_lr)
                    continue
                depth = deepest - depth_of[names[id(p)]] + 1  # the backbone's last group is depth 1
                seen_depths.add(depth)
                assert group["lr"] == pytest.approx(head_lr * 0.5 ** depth, rel=1e-9), (names[id(p)], update)
    assert seen_depths == set(range(1, deepest + 2)) and deepest >= 3
    with pytest.raises(Exception, match="optim.layer_decay and optim.backbone_lr_scale"):
        load_config(None, ["optim.layer_decay=0.7", "optim.backbone_lr_scale=0.1"])
