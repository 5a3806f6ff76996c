"""Training images at another size than the evaluation's (``data.image_size`` as a list, and
``data.test_image_size``): progressive resizing, low resolution early and full resolution late
(fast.ai's DAWNBench ImageNet runs, EfficientNetV2's progressive learning, Composer's progressive
resizing), and FixRes (Touvron et al., NeurIPS 2019: training crops make objects look larger than
test images do, so a model trained at one size tests best at a larger one).

The run's preprocessing is the serving size (job/config.py: serving_size): validation, the test,
test-time flips, the feature cache and ``best/model.json`` (hence evaluate, predict and export)
all use it. Only the training loader differs: epoch i trains at entry i of ``data.image_size``
(the last entry for the epochs after the list). A size is a function of the epoch, so nothing
is checkpointed and a resume mid-epoch trains at that epoch's size.
"""
from __future__ import annotations

from typing import Callable

from job.components import Component
from job.config import DataConfig, TimeoutsConfig, serving_size, training_sizes
from job.distributed import setup_timeouts, training_timeouts
from job.records import shown_epoch


def size_at(sizes: list[int], epoch: int) -> int:
    """Epoch ``epoch``'s (0-based) training size: its entry, or the last for the epochs after the list."""
    return sizes[min(epoch, len(sizes) - 1)]


def one_graph_per_size(distinct_sizes: int) -> None:
    """``torch.compile`` of a model fed several image sizes: each size gets its own static graph,
    compiled once when it first arrives. Dynamo's default would recompile at the second size into one
    graph with symbolic height and width (kernels tuned for no size) and, past cache_size_limit
    (8) graphs, run the model uncompiled. The batch dimension stays dynamic: job/loop.py marks it
    (maybe_mark_dynamic), which dynamo honours without automatic dynamic shapes."""
    import torch._dynamo

    torch._dynamo.config.automatic_dynamic_shapes = False
    # every size a graph, with the default room for the others (two_stage's unfreeze, grad mode)
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, distinct_sizes + 8)


def describe(sizes: list[int], serving: int) -> str:
    """``training at 16 px (epoch 1), 24 px (epochs 2+); evaluating at 32 px``, epochs shown 1-based."""
    spans, start = [], 0
    for i in range(1, len(sizes) + 1):
        if i == len(sizes) or sizes[i] != sizes[start]:
            last = "+" if i == len(sizes) else (f"-{shown_epoch(i - 1)}" if i - 1 > start else "")
            many = "s" if last else ""
            spans.append(f"{sizes[start]} px (epoch{many} {shown_epoch(start)}{last})")
            start = i
    return f"training at {', '.join(spans)}; evaluating at {serving} px"


class ProgressiveResize(Component):
    """Trains each epoch from a loader at that epoch's size (``train_loader``), built when the size
    changes; a loader whose size comes back later in the schedule is kept for it, so each size's
    pipeline is built at most once. With ``train.compile`` each size compiles one static graph, in
    the first step at that size, under the setup timeout (``timeouts.setup_minutes``) until that
    step's update, as the first step of the run is."""

    name = "resize"

    def __init__(self, sizes: list[int], timeouts: TimeoutsConfig | None = None, accelerator=None,
                 say: Callable[[str], None] = print):
        self.sizes, self.timeouts, self.accelerator, self.say = sizes, timeouts, accelerator, say
        self.kept: dict[int, object] = {}  # size -> a loader the schedule comes back to
        self.recompiling = False

    @classmethod
    def build(cls, data: DataConfig, model, accelerator, timeouts: TimeoutsConfig | None) -> "ProgressiveResize | None":
        """None when every epoch trains at the evaluation size. ``timeouts``: set when the model is
        compiled (a new size then recompiles in its first step)."""
        from job.model import preprocessing

        pretrained = preprocessing(model.backbone).image_size
        sizes = training_sizes(data.image_size, pretrained)
        serving = serving_size(data.image_size, data.test_image_size, pretrained)
        if set(sizes) == {serving}:
            return None
        if timeouts is not None and len(set(sizes)) > 1:
            one_graph_per_size(len(set(sizes)))
        accelerator.print(f"data.image_size / data.test_image_size: {describe(sizes, serving)}")
        return cls(sizes, timeouts, accelerator, accelerator.print)

    def train_loader(self, epoch: int, loader):
        size = size_at(self.sizes, epoch)
        current = loader.spec.prep.image_size
        if size == current:
            return loader
        if current in {*self.sizes[epoch:], self.sizes[-1]}:  # trained at again later: keep its pipeline
            self.kept[current] = loader
        else:
            loader.close()
        resized = self.kept.pop(size, None) or loader.resized(size)
        self.say(f"epoch {shown_epoch(epoch)}: training images at {size} px (data.image_size)")
        if self.timeouts is not None:
            setup_timeouts(self.accelerator, self.timeouts)
            self.recompiling = True
        return resized

    def on_update(self, step: int) -> None:
        if self.recompiling:  # the new size's graph is compiled: a long wait means a lost peer again
            training_timeouts(self.accelerator, self.timeouts)
            self.recompiling = False
