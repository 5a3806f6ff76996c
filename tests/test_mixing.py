"""Mixup / CutMix (job/mixing.py, mix.mixup_alpha / cutmix_alpha): soft targets over the
dataset's classes, odd batches, draws from (seed, epoch, step, rank) only, the off epoch, the
dominant-label training accuracy, the refusal on cached features, and in-process Trainer runs
(one of them preempted mid-epoch and resumed)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from accelerate import Accelerator

from dali_pipelines.sampling import Shard
from helpers.runs import REPO
from job.config import ConfigError, load_config
from job.features import FeatureLoader
from job.loop import TrainParts, TrainState, train_one_epoch
from job.mixing import BatchMixer
from job.preemption import Preempted
from job.run_dir import RunDir
from job.train import Trainer


def tiny(tmp_path, *overrides):
    """tests/test_modes.py's tiny synthetic run (copied: test modules are not imported)."""
    return load_config(REPO / "tests" / "configs" / "small.yaml",
                       [f"train.output_dir={tmp_path / 'run'}", f"data.prepared_dir={tmp_path / 'prep'}",
                        "data.synthetic_train=200", "data.synthetic_test=50", "train.log_every=1000", *overrides])


def mixer(*overrides, num_classes=10, rank=0, cached=False):
    return BatchMixer.from_config(load_config(None, list(overrides)), num_classes, rank=rank, cached_features=cached)


def batch(n, seed=0, channels=3, size=8):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, channels, size, size, generator=g), torch.randint(0, 10, (n,), generator=g)


def test_mixing_is_off_unless_an_alpha_is_set():
    assert mixer() is None
    assert mixer("mix.mixup_alpha=0.2") is not None and mixer("mix.cutmix_alpha=1.0") is not None


@pytest.mark.parametrize("override,message", [
    ("mix.mixup_alpha=-0.1", "mix.mixup_alpha and mix.cutmix_alpha must be >= 0"),
    ("mix.cutmix_alpha=-1", "mix.mixup_alpha and mix.cutmix_alpha must be >= 0"),
    ("mix.prob=1.5", r"mix.prob must be in \[0, 1\]"),
    ("mix.prob=-0.1", r"mix.prob must be in \[0, 1\]"),
    ("mix.off_epoch=-1", "mix.off_epoch must be >= 0"),
])
def test_invalid_mixing_keys_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


@pytest.mark.parametrize("alphas", [["mix.mixup_alpha=0.4"], ["mix.cutmix_alpha=1.0"],
                                    ["mix.mixup_alpha=0.4", "mix.cutmix_alpha=1.0"]])
def test_targets_are_soft_over_the_datasets_classes_with_label_smoothing(alphas):
    mix = mixer(*alphas, "loss.label_smoothing=0.1")
    x, labels = batch(8)
    for step in range(10):
        _, targets = mix(x.clone(), labels, epoch=0, step=step)
        assert targets.shape == (8, 10)  # the dataset's 10 classes, not timm's default 1000
        assert torch.allclose(targets.sum(1), torch.ones(8))
        assert targets.min() >= 0.1 / 10 - 1e-6  # smoothing: every class keeps at least its share
    unmixed = mixer(*alphas, "loss.label_smoothing=0.1", "mix.prob=0")
    _, targets = unmixed(x.clone(), labels, epoch=0, step=0)
    expected = torch.full((8, 10), 0.01).scatter_(1, labels[:, None], 0.91)
    assert torch.allclose(targets, expected)


def test_mixup_mixes_the_batch_with_its_reverse():
    mix = mixer("mix.mixup_alpha=0.4")
    x, labels = batch(4)[0], torch.tensor([0, 1, 2, 3])
    mixed, targets = mix(x.clone(), labels, epoch=0, step=0)
    lam = float(targets[0, 0])
    assert 0 < lam < 1 and targets[0, 3] == pytest.approx(1 - lam)
    assert torch.allclose(mixed[0], lam * x[0] + (1 - lam) * x[-1], atol=1e-6)


@pytest.mark.parametrize("n", [1, 2, 3, 33])
@pytest.mark.parametrize("alphas", [["mix.mixup_alpha=0.4"], ["mix.mixup_alpha=0.4", "mix.cutmix_alpha=1.0"]])
def test_any_batch_size_mixes_without_crashing(n, alphas):
    mix = mixer(*alphas, "loss.label_smoothing=0.1")
    x, labels = batch(n)
    mixed, targets = mix(x.clone(), labels, epoch=0, step=n)
    assert mixed.shape == x.shape and targets.shape == (n, 10)
    assert torch.allclose(targets.sum(1), torch.ones(n))
    if n % 2:  # the odd one out stays whole, with its smoothed one-hot target
        assert torch.equal(mixed[-1], x[-1])
        assert targets[-1, labels[-1]] == pytest.approx(0.91) and targets[-1].max() == targets[-1, labels[-1]]


def test_mixup_of_feature_vectors():
    mix = mixer("mix.mixup_alpha=0.4", cached=True)
    features, labels = torch.rand(5, 16), torch.randint(0, 10, (5,))
    mixed, targets = mix(features.clone(), labels, epoch=0, step=0)
    assert mixed.shape == (5, 16) and targets.shape == (5, 10)


def test_draws_come_from_seed_epoch_step_and_rank_only_and_leave_the_global_rng_alone():
    x, labels = batch(6)

    def draw(epoch=0, step=3, rank=0, micro=1, seed=0):
        mix = mixer("mix.mixup_alpha=1.0", "mix.cutmix_alpha=1.0", f"train.seed={seed}", rank=rank)
        return mix(x.clone(), labels, epoch=epoch, step=step, micro=micro)

    a, b = draw(), draw()
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])  # same numbers -> identical tensors
    np.random.rand()  # whatever else draws from numpy in between does not matter
    c = draw()
    assert torch.equal(a[0], c[0]) and torch.equal(a[1], c[1])
    for other in (draw(step=4), draw(epoch=1), draw(rank=1), draw(seed=1), draw(micro=2)):
        assert not (torch.equal(a[0], other[0]) and torch.equal(a[1], other[1]))
    np.random.seed(123)  # the global numpy state is restored after each call
    expected = np.random.rand()
    np.random.seed(123)
    draw()
    assert np.random.rand() == expected


def test_mix_off_epoch_turns_mixing_off_from_that_epoch():
    mix = mixer("mix.mixup_alpha=0.2", "mix.off_epoch=2")
    assert mix.active(0) and mix.active(1) and not mix.active(2) and not mix.active(5)
    always = mixer("mix.mixup_alpha=0.2")
    assert always.active(0) and always.active(1000)


def test_cutmix_on_cached_features_is_refused_with_the_fix():
    for overrides in (["train.strategy=feature_extraction", "mix.cutmix_alpha=1.0"],
                      ["train.strategy=feature_extraction", "features.cache=true", "mix.cutmix_alpha=1.0"]):
        with pytest.raises(ConfigError, match=r"mix.cutmix_alpha.*cached features.*features.cache=false"):
            load_config(None, overrides)
    load_config(None, ["train.strategy=feature_extraction", "features.cache=false", "mix.cutmix_alpha=1.0"])
    load_config(None, ["train.strategy=feature_extraction", "mix.mixup_alpha=0.2"])  # mixup is allowed
    with pytest.raises(ConfigError, match="features.cache=false"):
        mixer("mix.cutmix_alpha=1.0", cached=True)


class _NoSchedule:
    def step_update(self, num_updates):
        pass


def test_training_accuracy_counts_the_dominant_label_and_the_loss_is_soft_target():
    """With the learning rate 0 the model is fixed: the epoch's accuracy must be that of its
    predictions against the argmax of each mixed batch's targets, its loss the soft-target one."""
    cfg = load_config(None, ["mix.mixup_alpha=1.0", "loss.label_smoothing=0.1"])
    torch.manual_seed(0)
    features = np.random.default_rng(0).standard_normal((45, 6)).astype(np.float32)
    labels = np.random.default_rng(1).integers(0, 10, 45)
    shard = Shard(batch_size=8, seed=0)
    loader = FeatureLoader(features, labels, train=True, shard=shard, device=torch.device("cpu"))
    model = torch.nn.Linear(6, 10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    mix = BatchMixer.from_config(cfg, 10)
    parts = TrainParts(model=model, optimizer=optimizer, scheduler=_NoSchedule(), accelerator=Accelerator(cpu=True),
                       loss_fn=torch.nn.CrossEntropyLoss(label_smoothing=0.1), mix=mix)
    loader.set_epoch(0)
    metrics = train_one_epoch(cfg.train, parts, loader, TrainState())

    loader.set_epoch(0)
    correct = dominant = loss_sum = 0.0
    with torch.no_grad():
        for step, (x, y) in enumerate(loader):
            mixed, targets = mix(x, y, epoch=0, step=step, micro=1)
            predicted = model(mixed).argmax(1)
            correct += float((predicted == targets.argmax(1)).sum())
            dominant += float((targets.argmax(1) != y).sum())
            loss_sum += float(mix.loss_fn(model(mixed), targets)) * len(y)
    assert metrics["train_samples"] == 45  # 5 batches of 8 and an odd tail of 5
    assert metrics["train_accuracy"] == pytest.approx(correct / 45)
    assert metrics["train_loss"] == pytest.approx(loss_sum / 45, rel=1e-5)
    assert dominant > 0  # with alpha 1 some mixed samples are dominated by their partner's label


def test_a_trainer_run_with_mixup_trains_and_logs_the_dominant_label(tmp_path, capsys):
    trainer = Trainer(tiny(tmp_path, "mix.mixup_alpha=0.2", "train.epochs=2", "mix.off_epoch=1",
                           "data.batch_size=14", "data.image_size=16"))
    trainer.setup()
    assert trainer.parts.mix is not None and trainer.parts.mix.num_classes == trainer.num_classes
    trainer.train_and_validate_epoch(0)
    trainer.train_and_validate_epoch(1)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch ")]
    assert "acc (dominant label)" in lines[0] and "dominant" not in lines[1]  # mix.off_epoch=1
    assert [r.epoch for r in RunDir(trainer.out).epochs()] == [0, 1]


def test_mixup_and_cutmix_resume_exactly_after_a_mid_epoch_preemption(tmp_path):
    """Mirrors tests/test_modes.py's weight-EMA resume test: a run preempted mid-epoch and resumed
    ends with the weights of an uninterrupted one, because the mixing draws depend on (seed,
    epoch, step, rank) only."""
    def build(out):
        return Trainer(tiny(tmp_path / out, "mix.mixup_alpha=0.4", "mix.cutmix_alpha=1.0", "mix.prob=0.8",
                            "train.grad_accum_steps=2", "train.epochs=2", "data.batch_size=16",
                            "early_stopping.metric=val_loss", "model.head_dropout=0", "data.image_size=16"))

    whole = build("whole")
    whole.setup()
    whole.train_and_validate_epoch(0)

    interrupted = build("interrupted")
    interrupted.setup()
    interrupted.preemption.received = True
    with pytest.raises(Preempted):
        interrupted.train_and_validate_epoch(0)
    interrupted.exit_preempted(Preempted("SIGTERM"))
    resumed = build("interrupted")
    resumed.setup()
    assert resumed.state.epoch == 0 and resumed.state.samples_in_epoch == 32  # after the first update
    np.random.seed(999)  # the global numpy state differs from the uninterrupted run's: it must not matter
    resumed.train_and_validate_epoch(0)
    for (name, a), b in zip(whole.bare.state_dict().items(), resumed.bare.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), name
    assert RunDir(whole.out).epochs()[-1].train_loss == pytest.approx(
        RunDir(resumed.out).epochs()[-1].train_loss, rel=1e-6)
