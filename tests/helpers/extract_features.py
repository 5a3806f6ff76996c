"""Run under 1 or N processes: extract a store's features into a cache, twice.

1. ``test_resnet`` (random weights, seed 0) through the real extraction: the arrays must be
   the same whatever the world size.
2. A 'backbone' whose features are the sample index decoded from the pixels: row i must hold i,
   which proves every sample was computed once and landed in its own row.

Usage: extract_features.py STORE CACHE_ROOT DTYPE OUT.json
"""
import json
import sys
from pathlib import Path


import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from dali_pipelines.spec import LoaderSpec, Preprocessing
from job.config import load_config
from job.data import load_store
from job.features import FeatureKey, cached_features
from job.model import create_model

store_path, cache_root, dtype, out = sys.argv[1], Path(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
accelerator = Accelerator(cpu=True)
store = load_store(store_path)
set_seed(0)
model, prep = create_model(load_config(None, ["model.name=test_resnet", "model.pretrained=false"]).model, 10)
spec = LoaderSpec(Preprocessing(32, prep.mean, prep.std), num_threads=1)
key = FeatureKey(model="test_resnet", weights="random:0", image_size=32, interpolation="linear", mean=prep.mean,
                 std=prep.std, store=store.fingerprint, dtype=dtype, precision="no")
real = cached_features(accelerator, model, store, spec, key, cache_root, batch_size=24, stop_requested=lambda: False)


class IndexFromPixels(torch.nn.Module):
    """pooled_features = [index, index] with index = R + 256 G of the top-left pixel."""

    class backbone:  # noqa: N801 - mimics TransferModel.backbone.num_features
        num_features = 2

    def pooled_features(self, x):
        pixels = (x[:, :2, 0, 0] * 255).round()
        return (pixels[:, :1] + 256 * pixels[:, 1:2]).repeat(1, 2)


index_spec = LoaderSpec(Preprocessing(8, (0, 0, 0), (1, 1, 1)), num_threads=1)
index_key = FeatureKey(model="index", weights="none", image_size=8, interpolation="linear", mean=(0, 0, 0),
                       std=(1, 1, 1), store=store.fingerprint, dtype="float32", precision="no")
index = cached_features(accelerator, IndexFromPixels(), store, index_spec, index_key, cache_root, batch_size=7,
                        stop_requested=lambda: False)
if accelerator.is_main_process:
    out.write_text(json.dumps({"real": str(real.path), "index": str(index.path), "reused": real.reused,
                               "world_size": accelerator.num_processes}))
accelerator.end_training()
