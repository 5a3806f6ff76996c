"""Host-side costs of the GPU paths, checked on CPU: feature extraction copies to the host without
waiting per step (job/features.py: HostRows), sample predictions build no autograd graph."""
from __future__ import annotations

import numpy as np
import torch

from dali_pipelines.spec import LoaderSpec, Preprocessing
from job.features import HostRows
from job.reporting import sample_predictions


def test_host_rows_are_the_samples_in_order_whatever_the_world_size():
    """Step s of world W holds batches s*W + r (rank r): flat, the rows are in sample order, the
    padding of ranks with one batch fewer and of the last partial batch at the end, cut off."""
    n, batch, width = 23, 4, 3
    for world in (1, 2, 3):
        batches = [np.arange(i, min(i + batch, n)) for i in range(0, n, batch)]
        steps = -(-len(batches) // world)
        rows = HostRows(steps, world * batch, width, torch.float16, torch.device("cpu"))
        assert rows.pinned is False  # pinned memory is for copies to and from a GPU
        for step in range(steps):
            gathered = torch.full((world * batch, width), -1.0, dtype=torch.float16)
            for r in range(world):
                if step * world + r < len(batches):
                    ids = batches[step * world + r]
                    gathered[r * batch: r * batch + len(ids)] = torch.from_numpy(ids).view(-1, 1).half()
            rows.add(step, gathered)
        out = rows.numpy(n)
        assert out.shape == (n, width) and out.dtype == np.float16
        assert np.array_equal(out[:, 0], np.arange(n, dtype=np.float16)) and np.array_equal(out[:, 2], out[:, 0])


def test_sample_predictions_run_in_inference_mode(cifar_store):
    seen = []

    class Probe(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(3, 10)

        def forward(self, x):
            seen.append((torch.is_inference_mode_enabled(), torch.is_grad_enabled()))
            return self.linear(x.mean(dim=(2, 3)))

    spec = LoaderSpec(Preprocessing(32, (0.5,) * 3, (0.5,) * 3), num_threads=1, backend="torch")
    model = Probe()
    samples = sample_predictions(model, cifar_store, spec, torch.device("cpu"), count=5)
    assert len(samples) == 5 and seen == [(True, False)]
    assert model.training  # put back as it was
