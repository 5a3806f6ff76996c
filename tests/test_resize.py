"""Image sizes (job/resize.py): progressive resizing (data.image_size as a list, one size per epoch)
and FixRes (data.test_image_size). The keys are checked entry by entry; the training loader makes
each epoch's size, rebuilt only when it changes; evaluation, best/ and its tools use one size; a
run preempted mid-schedule resumes exactly; a separate test size leaves training bit-identical;
compiled, each size is one static graph. In-process, on the tiny synthetic run."""
from __future__ import annotations

import json

import pytest
import torch

from dali_pipelines.loader import image_loader
from dali_pipelines.sampling import Shard
from dali_pipelines.spec import LoaderSpec, Preprocessing
from helpers.runs import REPO
from job.config import ConfigError, ModelConfig, load_config, serving_size, training_sizes
from job.preemption import Preempted
from job.resize import ProgressiveResize, describe, one_graph_per_size, size_at
from job.run_dir import RunDir

MEAN = STD = (0.5, 0.5, 0.5)


def tiny(out, *overrides):
    return load_config(REPO / "tests" / "configs" / "small.yaml",
                       [f"train.output_dir={out}", f"data.prepared_dir={out.parent / 'prep'}",
                        "data.synthetic_train=200", "data.synthetic_test=50", "train.log_every=1000", *overrides])


@pytest.mark.parametrize("overrides,message", [
    (["data.image_size=[96,8,160]"], r"^data.image_size\[1\]=8 must be in \[16, 1024\] \(MAX_IMAGE_SIZE\)"),
    (["data.image_size=[]"], r"^data.image_size=\[\] lists no size"),
    (["data.image_size=[96,x]"], r"^data.image_size\[1\] must be an integer"),
    (["data.image_size=[96,true]"], r"^data.image_size\[1\] must be an integer"),
    (["data.image_size=abc"], r"^data.image_size must be an integer"),
    (["data.image_size=8"], r"^data.image_size must be in \[16, 1024\]"),
    (["data.test_image_size=2000"], r"^data.test_image_size=2000 must be in \[16, 1024\]"),
    (["data.test_image_size=[96]"], r"^data.test_image_size must be an integer"),
    (["data.image_size=[96,128,160]", "train.epochs=2"],
     r"lists 3 sizes, one per epoch, but train.epochs=2: .* Shorten the list to 2 entries"),
    (["data.image_size=[96,160]", "train.strategy=feature_extraction"],
     r"^data.image_size=\[96, 160\] with cached features .*set data.image_size to one size \(e.g. 160\), "
     r"or features.cache=false"),
    (["data.image_size=[96,160]", "train.strategy=linear_probe"],
     r"^data.image_size=\[96, 160\] with cached features \(train.strategy=linear_probe\).*\(e.g. 160\)$"),
    (["data.image_size=160", "data.test_image_size=224", "train.strategy=feature_extraction"],
     r"^data.test_image_size=224 with cached features.*set data.image_size=224 instead"),
    (["data.test_image_size=224", "train.strategy=linear_probe"], r"^data.test_image_size=224 with cached features"),
])
def test_bad_sizes_are_refused_naming_the_key_the_value_and_the_fix(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_lists_and_test_sizes_load_and_round_trip(tmp_path):
    cfg = load_config(None, ["data.image_size=[96,128,160]", "data.test_image_size=192", "train.epochs=3"])
    assert cfg.data.image_size == [96, 128, 160] and cfg.data.test_image_size == 192
    cfg.save(RunDir(tmp_path).config_file)
    assert RunDir(tmp_path).config() == cfg
    # one size for every split: what cached features can use
    for ok in (["data.image_size=[160,160]"], ["data.image_size=224", "data.test_image_size=224"],
               ["data.image_size=[96,160]", "features.cache=false"]):
        load_config(None, ["train.strategy=feature_extraction", *ok])


def test_a_size_per_epoch_the_last_repeating_and_one_serving_size():
    data = load_config(None, ["data.image_size=[16,24,24,32]"]).data
    assert training_sizes(data.image_size, 299) == [16, 24, 24, 32]
    assert [size_at([16, 24, 24, 32], e) for e in range(6)] == [16, 24, 24, 32, 32, 32]
    assert serving_size(data.image_size, data.test_image_size, 299) == 32
    data.test_image_size = 40
    assert serving_size(data.image_size, data.test_image_size, 299) == 40
    assert training_sizes(None, 299) == [299] and training_sizes(128, 299) == [128]
    assert describe([16, 24, 24, 32], 40) == "training at 16 px (epoch 1), 24 px (epochs 2-3), 32 px (epochs 4+); " \
                                             "evaluating at 40 px"


class _Loader:
    """What ProgressiveResize asks of a loader."""
    built: list[int] = []

    def __init__(self, size):
        self.spec = LoaderSpec(Preprocessing(size, MEAN, STD), num_threads=1)
        self.closed = False
        _Loader.built.append(size)

    def resized(self, size):
        return _Loader(size)

    def close(self):
        self.closed = True


def test_each_size_is_built_once_and_a_size_that_comes_back_is_kept():
    _Loader.built = []
    resize = ProgressiveResize([16, 24, 16, 32], say=lambda _: None)
    first = _Loader(32)  # the run's loader, at the serving size
    loaders = [first]
    for epoch in range(6):
        loaders.append(resize.train_loader(epoch, loaders[-1]))
    assert [loader.spec.prep.image_size for loader in loaders[1:]] == [16, 24, 16, 32, 32, 32]
    assert _Loader.built == [32, 16, 24]  # 16 and 32 were kept for their return, 24 closed
    assert loaders[3] is loaders[1] and loaders[4] is first and loaders[2].closed and not first.closed


def test_every_size_is_checked_against_the_architecture_and_the_card_size_is_the_serving_one():
    from job.features import feature_key
    from job.model import create_model

    vit = ModelConfig(name="test_maxvit", pretrained=False)  # its windows need >= 64 px (160 pretrained)
    with pytest.raises(ConfigError, match=r"^data.image_size\[1\]=32 is too small for test_maxvit .*"
                                          r"Use another data.image_size, or the pretrained size \(160\)"):
        create_model(vit, 10, image_size=[160, 32, 32])
    with pytest.raises(ConfigError, match=r"^data.test_image_size=16 is too small .*null to evaluate at the last"):
        create_model(vit, 10, test_image_size=16)
    small = ModelConfig(name="test_efficientnet", pretrained=False)
    assert create_model(small, 10, image_size=[16, 24])[1].image_size == 24
    assert create_model(small, 10, image_size=16, test_image_size=40)[1].image_size == 40
    cfg = load_config(None, ["model.name=test_efficientnet", "model.pretrained=false", "data.image_size=[24,24]",
                             "train.strategy=feature_extraction"])
    _, prep = create_model(cfg.model, 10, cfg.data.image_size, cfg.data.test_image_size)
    key = feature_key(cfg, prep, type("Store", (), {"fingerprint": "f"})())
    assert key.image_size == 24


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_a_resized_loader_makes_the_new_size_from_the_same_plan(cifar_store, backend):
    data = cifar_store.split("train")
    spec = LoaderSpec(Preprocessing(32, MEAN, STD), num_threads=1, backend=backend)
    loader = image_loader(spec, labels=data.labels[:48], images=data.images[:48], files=None, train=True,
                          shard=Shard(batch_size=16, seed=3))
    bigger = loader.resized(40)
    batches = []
    for each in (loader, bigger):
        each.set_epoch(2, start_sample=16)
        batches.append([(x.clone(), y.clone()) for x, y in each])
        each.close()
    assert [x.shape for x, _ in batches[0]] == [(16, 3, 32, 32)] * 2
    assert [x.shape for x, _ in batches[1]] == [(16, 3, 40, 40)] * 2
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(*batches))
    shrunk = torch.nn.functional.interpolate(batches[1][0][0], size=(32, 32), mode="bilinear", antialias=True)
    assert (shrunk - batches[0][0][0]).abs().mean() < 0.1  # the same pictures (shift and flip too), resized


def test_compiled_each_size_is_one_static_graph_compiled_once():
    """A TINY network and a backend that counts the graphs dynamo hands it (no inductor), fed as
    job/loop.py feeds the compiled model: the batch dimension marked dynamic, batches of two sizes."""
    import torch._dynamo

    graphs = []

    def counting(gm, example_inputs):
        values = [n.meta.get("example_value") for n in gm.graph.nodes if n.op == "placeholder"]
        # the images: 4-d with the marked, symbolic batch dimension (the weights are placeholders too)
        images = [v.shape for v in values if getattr(v, "ndim", 0) == 4 and not isinstance(v.shape[0], int)]
        graphs.append([tuple(shape[2:]) for shape in images])
        return gm.forward

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(4, 2))

    def feed(sizes):
        torch._dynamo.reset()
        graphs.clear()
        model = torch.compile(net, backend=counting)
        for size in sizes:
            for batch in (4, 3):  # an epoch's tail: the marked batch dimension does not recompile
                x = torch.randn(batch, 3, size, size)
                torch._dynamo.maybe_mark_dynamic(x, 0)
                model(x)
        return list(graphs)

    try:
        with torch._dynamo.config.patch(automatic_dynamic_shapes=True, cache_size_limit=2):
            default = feed([8, 12, 16])
            assert len(default) == 2 and not all(isinstance(d, int) for d in default[1][0])  # symbolic H, W
            one_graph_per_size(3)
            assert torch._dynamo.config.cache_size_limit >= 3
            ours = feed([8, 12, 16, 8, 12])
        assert ours == [[(8, 8)], [(12, 12)], [(16, 16)]]  # static, each compiled once, the third not refused
    finally:
        torch._dynamo.reset()


def test_a_schedule_trains_each_epoch_at_its_size_resumes_exactly_and_fixres_changes_evaluation_only(
        tmp_path, capsys):
    """Tiny runs at [16, 24] px (epoch 1 at 16, epoch 2 at 24), evaluated at 32 (data.test_image_size)
    or at 24 (the last size); the former's second epoch again, from a copy of its first epoch's end,
    preempted after one update and resumed."""
    import shutil

    from job.checkpoint import check_resume
    from job.evaluate import evaluation_preprocessing, main as evaluate_main
    from job.train import Trainer

    common = ("data.image_size=[16,24]", "train.epochs=2", "tta.test=flip", "data.synthetic_train=100",
              "data.synthetic_test=20")  # 90 training images: batches of 32, 32 and 26

    def trainer(name, *extra):
        built = Trainer(tiny(tmp_path / name, *common, *extra))
        built.setup()
        seen = []  # (training?, image side) of every forward pass
        built.bare.register_forward_pre_hook(lambda m, args: seen.append((m.training, args[0].shape[-1])))
        return built, seen

    fixres, seen = trainer("fixres", "data.test_image_size=32")
    fixres.train_and_validate_epoch(0)
    shutil.copytree(fixres.out, tmp_path / "interrupted")  # the run at its first epoch's end
    assert set(seen) == {(True, 16), (False, 32)}
    seen.clear()
    fixres.train_and_validate_epoch(1)
    assert set(seen) == {(True, 24), (False, 32)}
    uninterrupted = {k: v.clone() for k, v in fixres.bare.state_dict().items()}  # before the test loads best/

    last, _ = trainer("last")  # the same run without data.test_image_size: evaluated at 24
    last.train_and_validate_epoch(0)
    a, b = RunDir(last.out).epochs()[0], RunDir(fixres.out).epochs()[0]
    assert a.train_loss == b.train_loss and a.train_accuracy == b.train_accuracy  # training bit-identical
    assert a.val_loss != b.val_loss  # evaluated at 24 px, and at 32 px
    assert RunDir(last.out).card().image_size == 24 and RunDir(fixres.out).card().image_size == 32

    # best/ and its tools: the test (and its flips) at 32 px, and evaluate.py through the card
    test = fixres.test_with_best()
    capsys.readouterr()
    assert evaluate_main(["--run", str(fixres.out), "--tta", "flip"]) == 0
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert (result["image_size"], result["accuracy"], result["accuracy_tta"]) == (
        32, test["accuracy"], test["accuracy_tta"])
    card = RunDir(fixres.out).card()
    assert evaluation_preprocessing(fixres.bare, card, 24).image_size == 24
    with pytest.raises(ConfigError, match=r"--image-size=8 must be in \[16, 1024\]"):
        evaluation_preprocessing(fixres.bare, card, 8)

    # preempted mid-epoch at 24 px, then resumed: the same weights and history as uninterrupted
    interrupted, _ = trainer("interrupted", "data.test_image_size=32")
    assert interrupted.state.epoch == 1
    interrupted.preemption.received = True  # as the SIGTERM handler does: stops after the first update
    with pytest.raises(Preempted):
        interrupted.train_and_validate_epoch(1)
    interrupted.exit_preempted(Preempted("SIGTERM"))
    with pytest.raises(ConfigError, match=r"data.image_size=\[16, 24\] there, data.image_size=\[16, 32\] in this"):
        check_resume(tiny(tmp_path / "interrupted", "data.image_size=[16,32]", *common[1:], "data.test_image_size=32"))
    capsys.readouterr()
    resumed, seen = trainer("interrupted", "data.test_image_size=32")
    resumed.train_and_validate_epoch(1)
    out = capsys.readouterr().out
    assert "(epoch 2, sample 32)" in out and "epoch 2: training images at 24 px" in out  # shown 1-based
    assert set(seen) == {(True, 24), (False, 32)}
    for (name, x), y in zip(uninterrupted.items(), resumed.bare.state_dict().values()):
        assert torch.allclose(x.float(), y.float(), atol=1e-6), name
    for x, y in zip(RunDir(fixres.out).epochs(), RunDir(resumed.out).epochs(), strict=True):
        assert (y.train_loss, y.val_loss) == pytest.approx((x.train_loss, x.val_loss), rel=1e-6)
