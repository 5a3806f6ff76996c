"""Weight EMA (``ema.epochs``): an exponential moving average of the weights that train,
timm's ``ModelEmaV3`` (batch-norm statistics included, with its warm-up), updated once per
optimizer update (not per micro-batch) on every rank alike, saved and resumed with the checkpoint.
Validation scores it beside the raw weights; ``best/`` keeps whichever validation picks."""
from __future__ import annotations

import torch
from timm.utils import ModelEmaV3

from job.components import Component, Evaluate
from job.config import EmaConfig


def ema_decay(horizon_epochs: float, updates_per_epoch: int) -> float:
    """The per-update decay of an average over ``horizon_epochs`` (also what bench/recipe.py
    passes to timm's ``--model-ema-decay``)."""
    return 1.0 - 1.0 / max(horizon_epochs * updates_per_epoch, 1.0)


class WeightEma:
    """The averaged copy of ``module`` (the mode's trainable module: the whole network, or the
    head on cached features). ``horizon_epochs`` is the averaging horizon: the per-update decay is
    ``1 - 1 / (horizon_epochs x updates_per_epoch)``, reached after timm's warm-up (early updates
    weigh more, so the average does not start as the random head).

    The update is ``ModelEmaV3.apply_update_``'s arithmetic without its host cost: timm rebuilds
    both ``state_dict()``s every call (one ``detach`` per entry: 2,612 aten ops and 8.5 ms for
    Inception-ResNet-V2's 1,306 entries, the step time of a launch-bound GPU). The tensor lists are
    taken once, then one update is one ``_foreach_lerp_`` over the floating-point entries and one
    ``_foreach_copy_`` of the integer ones (``num_batches_tracked``): 2 aten ops, the same numbers
    (tests/test_ema_update.py)."""

    def __init__(self, module: torch.nn.Module, horizon_epochs: float, updates_per_epoch: int):
        self.decay = ema_decay(horizon_epochs, updates_per_epoch)
        self.average = ModelEmaV3(module, decay=self.decay, use_warmup=True)
        self.average.requires_grad_(False)
        self._pairs: tuple[int, tuple[list, list, list, list] | None] | None = None  # (id(module), lists or None)

    @property
    def module(self) -> torch.nn.Module:
        return self.average.module

    def update(self, module: torch.nn.Module, step: int) -> None:
        """After optimizer update ``step`` (1-based): the same decay on every rank, and on resume."""
        decay = self.average.get_decay(step)
        pairs = self._tensor_lists(module)
        if pairs is None:  # low-precision EMA (timm's stochastic rounding) or mixed dtypes: timm's own path
            self.average.update(module, step=step)
            return
        ema_floats, model_floats, ema_ints, model_ints = pairs
        with torch.no_grad():
            if ema_floats:
                torch._foreach_lerp_(ema_floats, model_floats, weight=1.0 - decay)
            if ema_ints:
                torch._foreach_copy_(ema_ints, model_ints)

    def _tensor_lists(self, module: torch.nn.Module):
        """The (EMA, model) tensor lists in ``state_dict`` order, taken once per module. ``keep_vars``:
        the Parameter and buffer objects themselves, whose storage every update reads and writes in
        place (the optimizer, batch norm and ``load_state_dict`` all update in place)."""
        if self._pairs is not None and self._pairs[0] == id(module):
            return self._pairs[1]
        ema_state = self.module.state_dict(keep_vars=True)
        model_state = module.state_dict(keep_vars=True)
        if list(ema_state) != list(model_state):
            raise ValueError("the EMA and the module it averages have different state_dict keys")
        lists = ([], [], [], [])
        for key, ema_v in ema_state.items():
            model_v = model_state[key]
            if ema_v.is_floating_point():
                if ema_v.dtype != model_v.dtype or ema_v.dtype == torch.bfloat16 or ema_v.device != model_v.device:
                    lists = None
                    break
                lists[0].append(ema_v)
                lists[1].append(model_v)
            else:
                lists[2].append(ema_v)
                lists[3].append(model_v)
        self._pairs = (id(module), lists)
        return lists

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)
        self._pairs = None  # in place today; taken again in case a later torch assigns new tensors


class EmaComponent(Component):
    """``ema:``: a weight EMA of ``module`` (the mode's trainable module, named ``prefix`` inside
    the whole model), updated once per optimizer update, validated beside the raw weights and saved
    with every checkpoint."""

    name = "ema"
    tensor_state = True

    def __init__(self, module: torch.nn.Module, names: dict[str, str], horizon_epochs: float, updates_per_epoch: int):
        self.module, self.names = module, names
        self.ema = WeightEma(module, horizon_epochs, updates_per_epoch)

    @classmethod
    def build(cls, cfg: EmaConfig, model: torch.nn.Module, trainable: torch.nn.Module,
              updates_per_epoch: int) -> "EmaComponent | None":
        """None when ``ema.epochs`` is 0 (off)."""
        if cfg.epochs <= 0:
            return None
        return cls(trainable, state_names(model, trainable), cfg.epochs, updates_per_epoch)

    def on_update(self, step: int) -> None:
        self.ema.update(self.module, step=step)

    def validate(self, evaluate: Evaluate) -> dict:
        return evaluate(self.ema.module)

    def best_weights(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The whole model's weights with the EMA's in place of the module that trains."""
        return {**weights, **{self.names[k]: v for k, v in self.ema.state_dict().items()}}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.ema.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.ema.load_state_dict(state)


def state_names(model: torch.nn.Module, module: torch.nn.Module) -> dict[str, str]:
    """Each ``module`` state_dict key -> the key of the same tensor in ``model``'s: the trainable
    module may be a submodule (the head) or a view of several (job/trunk.py's upper modules)."""
    names = {id(v): k for k, v in model.state_dict(keep_vars=True).items()}
    return {k: names[id(v)] for k, v in module.state_dict(keep_vars=True).items()}
