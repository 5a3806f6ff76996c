"""The training modes in-process on tiny data (seconds, no launch): what each one trains, what it
evaluates, what it saves, and the one preemption path. End-to-end launches stay in
tests/test_train_e2e.py for what only a real process shows."""
from __future__ import annotations

import pytest
import torch

from helpers.runs import REPO
from job.config import load_config
from job.modes import FeatureMode, ImageMode, build_mode
from job.preemption import EXIT_PREEMPTED, Preempted
from job.run_dir import RunDir
from job.train import Trainer


def tiny(tmp_path, *overrides):
    return load_config(REPO / "tests" / "configs" / "small.yaml",
                       [f"train.output_dir={tmp_path / 'run'}", f"data.prepared_dir={tmp_path / 'prep'}",
                        "data.synthetic_train=200", "data.synthetic_test=50", "train.log_every=1000", *overrides])


def snapshot(module: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items() if v.is_floating_point()}


def changed(before: dict, module: torch.nn.Module) -> bool:
    return any(not torch.equal(before[k], v) for k, v in module.state_dict().items() if k in before)


def test_the_config_chooses_the_mode_in_one_place(tmp_path):
    assert isinstance(build_mode(tiny(tmp_path, "train.strategy=feature_extraction")), FeatureMode)
    assert isinstance(build_mode(tiny(tmp_path, "train.strategy=feature_extraction", "features.cache=false")),
                      ImageMode)
    assert isinstance(build_mode(tiny(tmp_path, "train.strategy=two_stage")), ImageMode)
    assert isinstance(build_mode(tiny(tmp_path)), ImageMode)


def test_cached_features_train_and_evaluate_the_head_alone_and_save_the_whole_model(tmp_path):
    trainer = Trainer(tiny(tmp_path, "train.strategy=feature_extraction", "train.epochs=1", "tta.test=flip"))
    trainer.setup()
    assert trainer.mode.trainable(trainer.bare) is trainer.bare.head is trainer.mode.evaluated(trainer.bare)
    backbone, head = snapshot(trainer.bare.backbone), snapshot(trainer.bare.head)
    trainer.train_and_validate_epoch(0)
    assert not changed(backbone, trainer.bare.backbone) and changed(head, trainer.bare.head)
    test = trainer.test_with_best()
    assert test["samples"] == 50 and "accuracy_cached" in test
    trainer.summarise_run(test)
    summary = RunDir(trainer.out).summary()
    assert summary.features_cached and summary.feature_extraction_seconds > 0
    assert summary.test_accuracy_tta is not None  # tta.test=flip: beside test_accuracy
    saved = RunDir(trainer.out).card()
    assert saved.model == "test_resnet"


def test_two_stage_trains_the_head_first_then_everything(tmp_path):
    trainer = Trainer(tiny(tmp_path, "train.strategy=two_stage", "train.head_epochs=1", "train.epochs=2"))
    trainer.setup()
    assert trainer.mode.evaluated(trainer.bare) is trainer.bare
    backbone, head = snapshot(trainer.bare.backbone), snapshot(trainer.bare.head)
    trainer.train_and_validate_epoch(0)
    assert trainer.bare.backbone_frozen and not changed(backbone, trainer.bare.backbone)
    assert changed(head, trainer.bare.head)
    trainer.train_and_validate_epoch(1)
    assert not trainer.bare.backbone_frozen and changed(backbone, trainer.bare.backbone)
    assert [r.epoch for r in RunDir(trainer.out).epochs()] == [0, 1]


def test_preemption_is_one_exception_caught_where_the_checkpoint_is_saved(tmp_path):
    trainer = Trainer(tiny(tmp_path, "train.epochs=2", "data.batch_size=16"))
    trainer.setup()
    trainer.preemption.received = True  # as the SIGTERM handler does
    with pytest.raises(Preempted):
        trainer.train_and_validate_epoch(0)
    assert trainer.state.epoch == 0 and trainer.state.samples_in_epoch == 16  # after the first update
    assert trainer.exit_preempted(Preempted("SIGTERM")) == EXIT_PREEMPTED
    (checkpoint,) = trainer.checkpointer.all()
    assert checkpoint.name == "epoch0000-step0000001"
    resumed = Trainer(tiny(tmp_path, "train.epochs=2", "data.batch_size=16"))
    resumed.setup()
    assert (resumed.state.epoch, resumed.state.samples_in_epoch, resumed.state.global_step) == (0, 16, 1)
    assert resumed.state.partial.samples == 16  # the interrupted epoch's sums came back too


def test_weight_ema_updates_once_per_optimizer_update_and_resumes_exactly(tmp_path):
    """ema.epochs: timm's ModelEmaV3 of what trains, one update per optimizer update
    (accumulation 2: half the micro-batches), validated beside the raw weights, saved with the
    checkpoint: a run preempted mid-epoch and resumed ends with the EMA of an uninterrupted one."""
    def build(out):
        return Trainer(tiny(tmp_path / out, "ema.epochs=0.5", "train.grad_accum_steps=2", "train.epochs=2",
                            "data.batch_size=16", "early_stopping.metric=val_loss"))

    whole = build("whole")
    whole.setup()
    updates = []
    (ema,) = [c for c in whole.components if c.name == "ema"]  # registered once, by its section
    ema.ema.update = (lambda real: lambda module, step: (updates.append(step), real(module, step)))(ema.ema.update)
    for epoch in range(2):
        whole.train_and_validate_epoch(epoch)
    assert updates == list(range(1, whole.state.global_step + 1))  # once per update, numbered like them
    assert whole.state.global_step == 2 * 6  # 180 training images / 16 = 12 micro-batches -> 6 updates
    history = RunDir(whole.out).epochs()
    assert all(h.val_accuracy_ema is not None for h in history)
    card = RunDir(whole.out).card()
    assert card.weights in ("raw", "ema")

    interrupted = build("interrupted")
    interrupted.setup()
    interrupted.train_and_validate_epoch(0)
    interrupted.preemption.received = True
    with pytest.raises(Preempted):
        interrupted.train_and_validate_epoch(1)
    interrupted.exit_preempted(Preempted("SIGTERM"))
    resumed = build("interrupted")
    resumed.setup()
    assert resumed.state.epoch == 1 and resumed.state.samples_in_epoch > 0
    resumed.train_and_validate_epoch(1)
    (resumed_ema,) = [c for c in resumed.components if c.name == "ema"]
    for (name, a), b in zip(ema.state_dict().items(), resumed_ema.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), name
