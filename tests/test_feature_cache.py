"""The feature cache: same numbers as training through the frozen backbone, a key that rebuilds
when anything that changes the features changes, atomic writes, and exact rows on N processes."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from job.config import DataConfig
from helpers.runs import PYTHON, accelerate_launch, run, small_run, train_until_sigterm
from job.data import prepare
from job.run_dir import RunDir

pytestmark = pytest.mark.slow


def _index_store(tmp_path: Path, n: int = 203) -> Path:
    """A raw store whose images encode their own index (R = i % 256, G = i // 256)."""
    from job.data import cifar10

    root = tmp_path / "src" / "cifar-10-batches-py"
    root.mkdir(parents=True)
    idx = np.arange(n * 6 // 5 + 50)  # train (5 batches) + test
    images = np.zeros((len(idx), 3, 32, 32), np.uint8)
    images[:, 0] = (idx % 256)[:, None, None]
    images[:, 1] = (idx // 256)[:, None, None]
    flat = images.reshape(len(idx), -1)
    train, test = flat[:n], flat[n:]
    for i, part in enumerate(np.array_split(np.arange(n), 5), start=1):
        cifar10.dump_batch(root / f"data_batch_{i}", {b"data": train[part], b"labels": (part % 10).tolist()})
    cifar10.dump_batch(root / "test_batch", {b"data": test, b"labels": (np.arange(len(test)) % 10).tolist()})
    store, _ = prepare(DataConfig(source="cifar10", root=str(root.parent)), tmp_path / "store")
    return store.path


def test_one_and_two_processes_write_the_same_rows_once_each(tmp_path):
    store = _index_store(tmp_path)
    runs = {}
    for world in (1, 2):
        out = tmp_path / f"w{world}.json"
        args = [str(store), str(tmp_path / f"cache{world}"), "float32", str(out)]
        # One CPU thread per process in both cases (what `accelerate launch` gives each of its
        # processes): convolution reductions may round differently with another thread count.
        run([PYTHON, "tests/helpers/extract_features.py", *args] if world == 1 else
            accelerate_launch(2, "tests/helpers/extract_features.py", *args), env={"OMP_NUM_THREADS": "1"})
        runs[world] = json.loads(out.read_text())
        assert runs[world]["world_size"] == world and not runs[world]["reused"]
    from job.data import load_store

    s = load_store(store)
    for split in ("train", "val", "test"):
        # Row i holds sample i's own index: each sample computed exactly once, in its own row.
        index = np.load(Path(runs[2]["index"]) / f"{split}_features.npy")
        images = s.split(split).images
        expected = images[:, 0, 0, 0].astype(np.float32) + 256 * images[:, 0, 0, 1].astype(np.float32)
        assert index.shape == (len(images), 2) and np.array_equal(index[:, 0], expected)
        # A real backbone: bit-identical features from 1 and 2 processes (same batches either way).
        one = np.load(Path(runs[1]["real"]) / f"{split}_features.npy")
        two = np.load(Path(runs[2]["real"]) / f"{split}_features.npy")
        assert one.dtype == np.float32 and one.shape == (len(images), 96)
        assert np.array_equal(one, two)
        assert np.array_equal(np.load(Path(runs[2]["real"]) / f"{split}_labels.npy"), s.split(split).labels)


def _train(out: Path, prepared: Path, *extra: str) -> str:
    args = small_run(out, prepared, "train.epochs=3", "train.strategy=feature_extraction", "optim.lr=0.01",
                     "train.log_every=10", *extra)
    return run([PYTHON, "job/train.py", *args]).stdout


def test_cached_and_uncached_runs_give_the_same_numbers_and_the_cache_is_reused(tmp_path):
    """Same seed, no augmentation: the head sees the same features in the same order with the same
    dropout masks; only the float16 rounding of the cache differs."""
    head = ("model.head_hidden=[16]", "model.head_dropout=0.2")
    cached_log = _train(tmp_path / "cached", tmp_path / "prep", *head)
    _train(tmp_path / "uncached", tmp_path / "prep", *head, "features.cache=false", "data.augment=false")
    assert "augmentation is off" in cached_log and "extracted features" in cached_log
    cached = RunDir(tmp_path / "cached").epochs()
    uncached = RunDir(tmp_path / "uncached").epochs()
    assert [h.epoch for h in cached] == [h.epoch for h in uncached] == [0, 1, 2]
    for a, b in zip(cached, uncached):
        for key in ("train_loss", "val_loss"):
            assert getattr(a, key) == pytest.approx(getattr(b, key), rel=3e-3), key
        # float16 features move near-tied logits: a few of 540 predictions may flip
        assert a.train_accuracy == pytest.approx(b.train_accuracy, abs=0.01)
        assert a.val_accuracy == pytest.approx(b.val_accuracy, abs=0.02)
        assert a.step == b.step and a.lr == pytest.approx(b.lr, rel=1e-9)
    m_cached = RunDir(tmp_path / "cached").summary()
    m_uncached = RunDir(tmp_path / "uncached").summary()
    assert m_cached.features_cached and not m_uncached.features_cached
    assert m_cached.test_accuracy == pytest.approx(m_uncached.test_accuracy, abs=0.02)
    # The cached run's own check: the head on cached test features vs the model on the test images.
    assert m_cached.test_accuracy_cached == pytest.approx(m_cached.test_accuracy, abs=0.02)
    assert "on cached features (float16)" in cached_log
    # A second run (a linear probe now) reuses the same features and says so.
    probe_log = _train(tmp_path / "probe", tmp_path / "prep", "model.head_hidden=[]", "model.head_dropout=0.0",
                       "train.epochs=1")
    assert "reusing cached features" in probe_log
    assert len(list((tmp_path / "prep" / "features").iterdir())) == 1


def test_cached_runs_resume_exactly_after_sigterm_on_one_and_two_processes(tmp_path):
    """The head's epochs over cached features keep the job's preemption contract: SIGTERM mid
    epoch saves a checkpoint and exits 143; the resumed run matches an uninterrupted one (1
    process), and on 2 processes it trains every sample once per epoch with replicas in sync."""
    head = ("model.head_hidden=[16]", "model.head_dropout=0.2")
    _train(tmp_path / "reference", tmp_path / "prep", *head)
    args = small_run(tmp_path / "resumed", tmp_path / "prep", "train.epochs=3", "train.strategy=feature_extraction",
                     "optim.lr=0.01", *head)
    code, log = train_until_sigterm([PYTHON, "job/train.py", *args], at_line="step 25:")  # 17 batches/epoch
    assert code == 143 and "reusing cached features" in log, log[-3000:]
    out = run([PYTHON, "job/train.py", *args]).stdout
    assert "resumed from" in out and "epoch 2, sample" in out
    for a, b in zip(RunDir(tmp_path / "reference").epochs(), RunDir(tmp_path / "resumed").epochs(), strict=True):
        for key in ("lr", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "step", "train_samples"):
            assert getattr(b, key) == pytest.approx(getattr(a, key), rel=1e-6, abs=1e-9), key
    reference = RunDir(tmp_path / "reference").summary()
    resumed = RunDir(tmp_path / "resumed").summary()
    assert resumed.test_accuracy == reference.test_accuracy

    two = small_run(tmp_path / "two", tmp_path / "prep", "train.epochs=3", "train.strategy=feature_extraction",
                    "optim.lr=0.01", *head)
    # torchrun itself exits 1 on SIGTERM (docker/launch.sh turns it into 143 in a pod); the ranks save.
    code, log = train_until_sigterm(accelerate_launch(2, "job/train.py", *two), at_line="step 12:")  # 9 per epoch
    assert code != 0 and "SIGTERM: saved" in log and not RunDir(tmp_path / "two").summary_file.exists(), log[-3000:]
    assert "resumed from" in run(accelerate_launch(2, "job/train.py", *two)).stdout
    m = RunDir(tmp_path / "two").summary()
    assert m.world_size == 2 and m.features_cached and m.replicas_identical is True
    assert m.epochs_completed == 3 and m.test_samples == 200
    assert [h.train_samples for h in RunDir(tmp_path / "two").epochs()] == [540, 540, 540]


def test_the_key_changes_with_everything_that_changes_the_features(tmp_path):
    from types import SimpleNamespace

    from job.config import load_config
    from job.features import feature_key
    from job.model import Preprocessing

    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"one")

    def digest(*overrides, size=32, fingerprint="abc", precision="no"):
        cfg = load_config(None, ["model.name=test_resnet", "model.pretrained=false", *overrides])
        prep = Preprocessing(size, (0.5,) * 3, (0.5,) * 3)
        return feature_key(cfg, prep, SimpleNamespace(fingerprint=fingerprint), precision).digest()

    base = digest()
    assert digest() == base  # stable
    assert digest("model.head_hidden=[3]", "optim.lr=0.5", "train.epochs=7") == base  # the head is not in it
    changed = [digest(size=40), digest(fingerprint="abd"), digest("train.seed=1"), digest(precision="bf16"),
               digest("features.dtype=float32"), digest("model.name=resnet18"),
               digest("model.pretrained=true", f"model.weights={weights}")]
    weights.write_bytes(b"two")  # same path, other content: another hash
    changed.append(digest("model.pretrained=true", f"model.weights={weights}"))
    assert len({base, *changed}) == len(changed) + 1


def test_an_interrupted_extraction_leaves_nothing_that_is_trusted(tmp_path):
    from accelerate import Accelerator

    from dali_pipelines.spec import LoaderSpec, Preprocessing
    from job.config import load_config
    from job.features import FeatureKey, Preempted, cached_features
    from job.model import create_model

    store, _ = prepare(DataConfig(source="synthetic", root=str(tmp_path / "src"), synthetic_train=300,
                                  synthetic_test=60), tmp_path / "store")
    model, _ = create_model(load_config(None, ["model.name=test_resnet", "model.pretrained=false"]).model, 10)
    spec = LoaderSpec(Preprocessing(32, (0.5,) * 3, (0.5,) * 3), num_threads=1)
    key = FeatureKey(model="test_resnet", weights="random:0", image_size=32, interpolation="linear",
                     mean=(0.5,) * 3, std=(0.5,) * 3, store=store.fingerprint, dtype="float16", precision="no")
    accelerator, asked = Accelerator(cpu=True), []

    def sigterm_at_step_3():
        asked.append(1)
        return len(asked) == 3

    with pytest.raises(Preempted, match="SIGTERM during feature extraction"):
        cached_features(accelerator, model, store, spec, key, tmp_path / "cache", 32, sigterm_at_step_3)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())
    # A directory with the right name but no meta.json (e.g. copied by hand, half-written) is not trusted.
    (tmp_path / "cache" / key.digest()).mkdir(parents=True)
    (tmp_path / "cache" / key.digest() / "train_features.npy").write_bytes(b"partial")
    with pytest.raises(Exception):  # it is not ours to replace either: a clear refusal, not a silent reuse
        cached_features(accelerator, model, store, spec, key, tmp_path / "cache", 32, lambda: False)
    (tmp_path / "cache" / key.digest() / "train_features.npy").unlink()
    features = cached_features(accelerator, model, store, spec, key, tmp_path / "cache", 32, lambda: False)
    assert not features.reused and features.features["train"].shape == (270, 96)
    assert cached_features(accelerator, model, store, spec, key, tmp_path / "cache", 32, lambda: False).reused
