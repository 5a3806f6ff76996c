"""Partial fine-tuning over a cached trunk (job/trunk.py): where a backbone can be cut, the refusals,
what trains and what stays, the cached maps against the trunk's own output (and the mirror view),
the views each epoch draws, the cache's invalidation when its inputs change, the test end to end.
In-process, on the tiny synthetic run (test_resnet, 32 px)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from dali_pipelines.loader import make_loader
from dali_pipelines.sampling import Shard, epoch_augmentation, epoch_permutation
from helpers.runs import REPO
from job.config import ConfigError, ModelConfig, load_config
from job.ema import state_names
from job.model import TransferModel, build_head, create_model
from job.modes import build_mode
from job.run_dir import RunDir
from job.train import Trainer
from job.trunk import TrunkLoader, TrunkMode, backbone_units, split_backbone, translate


def tiny(tmp_path, name="run", *overrides):
    return load_config(REPO / "tests" / "configs" / "small.yaml",
                       [f"train.output_dir={tmp_path / name}", f"data.prepared_dir={tmp_path / 'prep'}",
                        "data.synthetic_train=200", "data.synthetic_test=50", "train.log_every=1000",
                        "trunk.train_from=layer3", *overrides])


@pytest.mark.parametrize("overrides,message", [
    (["train.strategy=feature_extraction"], r"^trunk.train_from=layer3 with train.strategy=feature_extraction: .*"
                                            r"set train.strategy=finetune"),
    (["features.cache=false"], r"^trunk.train_from=layer3 with features.cache=false: .*always cached"),
    (["data.auto_augment=rand_augment"], r"with data.auto_augment=rand_augment: .*set data.auto_augment=none"),
    (["mix.cutmix_alpha=1.0"], r"with mix.cutmix_alpha=1: .*set mix.cutmix_alpha=0"),
    (["trunk.views=3"], r"^trunk.views=3: 1 \(the image\) or 2"),
    (["data.image_size=[32,48]"], r"^data.image_size=\[32, 48\] with a cached trunk \(trunk.train_from=layer3\)"),
    (["data.test_image_size=48"], r"^data.test_image_size=48 with a cached trunk"),
])
def test_what_a_cached_trunk_cannot_do_is_refused_naming_the_fix(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        tiny(tmp_path, "run", *overrides)


def test_every_cut_chains_back_to_the_whole_model_and_a_bad_name_lists_the_good_ones():
    model, _ = create_model(ModelConfig(name="test_resnet", pretrained=False), 10, 32)
    names = [name for name, _ in backbone_units(model.backbone)]
    assert names[0] == "conv1.0" and names[-5:] == ["maxpool", "layer1", "layer2", "layer3", "layer4"]  # no fc
    x = torch.randn(3, 3, 32, 32)
    model.eval()
    for name in names[1:]:
        split = split_backbone(model, name, 32)
        with torch.no_grad():
            assert torch.allclose(split.upper(split.trunk(x)), model(x), atol=1e-5), name
        assert split.upper.head is model.head  # the model's own modules, not copies
    listed = r"train_from='layer9' is not a module .* one of: conv1.1, .*, layer4 \(`python -m job.trunk"
    with pytest.raises(ConfigError, match=listed):
        split_backbone(model, "layer9", 32)
    with pytest.raises(ConfigError, match=r"trunk.train_from='conv1.0' is not a module"):  # nothing to cache
        split_backbone(model, "conv1.0", 32)


def test_a_backbone_whose_forward_is_not_its_chain_of_modules_is_refused():
    class Scaled(nn.Module):  # forward_features does more than call its children in order
        num_features = 4

        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3)

        def forward_features(self, x):
            return self.b(self.a(x)) * 2

    model = TransferModel(Scaled(), build_head(4, 10, [], 0.0))
    with pytest.raises(ConfigError, match=r"Scaled's forward is not the chain of its modules.*trunk.train_from=null"):
        split_backbone(model, "b", 32)


def test_the_trunk_stays_the_rest_trains_and_the_cache_holds_the_trunk_maps_of_both_views(tmp_path):
    cfg = tiny(tmp_path, "run", "train.epochs=1", "tta.test=flip", "ema.epochs=0.5")
    assert isinstance(build_mode(cfg), TrunkMode)
    trainer = Trainer(cfg)
    trainer.setup()
    split = trainer.mode.split
    assert trainer.mode.trainable(trainer.bare) is split.upper is trainer.mode.evaluated(trainer.bare)
    before = {k: v.clone() for k, v in trainer.bare.state_dict().items()}
    trunk_keys = set(state_names(trainer.bare, split.trunk).values())
    assert trunk_keys and all(k.startswith("backbone.") for k in trunk_keys)

    # The cache: train (N, 2, C, H, W), val (N, 1, C, H, W); view 0 the trunk's maps of the image,
    # view 1 of its mirror image, as float16 (features.dtype).
    maps = trainer.mode.features.features
    n_train, n_val = len(trainer.data.store.split("train")), len(trainer.data.store.split("val"))
    assert maps["train"].shape == (n_train, 2, *split.map_shape) and maps["val"].shape == (n_val, 1, *split.map_shape)
    images, _ = next(iter(make_loader(trainer.data.store, "train", trainer.data.spec, train=False,
                                      shard=Shard(batch_size=8))))
    with torch.no_grad():  # in eval mode, as cached: batch norm with its running statistics
        expected = torch.stack([split.trunk.eval()(images), split.trunk(images.flip(-1))], 1)
    assert torch.allclose(torch.from_numpy(np.array(maps["train"][:8])).float(), expected, atol=2e-2, rtol=1e-2)
    assert not torch.allclose(expected[:, 0], expected[:, 1])  # the second view is another view

    trainer.train_and_validate_epoch(0)
    after = trainer.bare.state_dict()
    for key in before:
        if before[key].is_floating_point():
            assert torch.equal(before[key], after[key]) == (key in trunk_keys), key  # trunk frozen, the rest trains
    test = trainer.test_with_best()  # end to end: images through the trunk too
    assert test["samples"] == 50 and test["accuracy_tta"] is not None
    trainer.summarise_run(test)
    assert RunDir(trainer.out).summary().test_accuracy == test["accuracy"]
    best = RunDir(trainer.out).card()
    assert best.weights in ("raw", "ema")

    # The same inputs reuse the cache; each input of the maps, changed, makes a new one.
    def cache_of(name, *overrides):
        run = Trainer(tiny(tmp_path, name, "train.epochs=1", *overrides))
        run.setup()
        return run.mode.features

    again = cache_of("again", "optim.lr=0.1")  # not an input of the maps
    assert again.reused and again.path == trainer.mode.features.path
    paths = {again.path}
    for overrides in (["trunk.train_from=layer4"], ["trunk.views=1"], ["data.image_size=48"],
                      ["features.dtype=float32"], ["train.seed=1"]):  # seed: the random backbone's weights
        other = cache_of("other", *overrides)
        assert not other.reused and other.path not in paths, overrides
        paths.add(other.path)


def test_each_epoch_draws_each_samples_view_from_its_flip_draw_and_evaluation_reads_view_zero():
    n, views = 10, 2
    maps = np.arange(n * views, dtype=np.float16).reshape(n, views, 1, 1, 1)
    labels = np.arange(n)
    loader = TrunkLoader(maps, labels, train=True, shard=Shard(batch_size=4, seed=3), device="cpu",
                         channels_last=False)
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        order, flip = epoch_permutation(n, 3, epoch), epoch_augmentation(n, 3, epoch).flip
        x = torch.cat([batch for batch, _ in loader]).flatten()
        y = torch.cat([label for _, label in loader])
        assert y.tolist() == order.tolist()
        assert x.tolist() == [2 * order[p] + flip[p] for p in range(n)]
    assert 0 < sum(flip) < n
    val = TrunkLoader(maps, labels, train=False, shard=Shard(batch_size=4), device="cpu", channels_last=False)
    assert torch.cat([batch for batch, _ in val]).flatten().tolist() == [2 * i for i in range(n)]


def test_shift_moves_each_training_map_by_the_epochs_shift_draw_in_whole_cells_and_never_evaluation():
    one_hot = torch.zeros(2, 1, 5, 5)
    one_hot[:, 0, 2, 2] = 1
    moved = translate(one_hot, np.array([[1, 0], [-2, 1]]))
    assert moved[0, 0, 2, 3] == 1 and moved[1, 0, 3, 0] == 1 and moved.sum() == 2  # (x, y): right, then left-down
    assert translate(one_hot, np.array([[3, 0], [0, 0]]))[0].sum() == 0  # moved out: zero-filled

    n, side = 12, 16  # a 16-cell map: shifts of up to 4/32 of the side are up to 2 cells
    maps = torch.randn(n, 2, 3, side, side).half().numpy()
    loader = TrunkLoader(maps, np.arange(n), train=True, shard=Shard(batch_size=5, seed=1), device="cpu",
                         channels_last=True, shift=True)
    loader.set_epoch(2)
    order, aug = epoch_permutation(n, 1, 2), epoch_augmentation(n, 1, 2)
    cells = np.rint(aug.shift * side).astype(np.int64)
    assert np.abs(cells).max() == 2 and (cells != 0).any()
    x = torch.cat([batch for batch, _ in loader])
    assert x.is_contiguous(memory_format=torch.channels_last)
    for p in range(n):
        view = torch.from_numpy(maps[order[p], aug.flip[p]]).float()[None]
        assert torch.equal(x[p], translate(view, cells[p:p + 1])[0]), p
    val = TrunkLoader(maps, np.arange(n), train=False, shard=Shard(batch_size=5), device="cpu", channels_last=False,
                      shift=True)
    assert torch.equal(torch.cat([batch for batch, _ in val]), torch.from_numpy(maps[:, 0]).float())
