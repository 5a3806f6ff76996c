"""``train.strategy=linear_probe``: the linear-evaluation protocol of fixed features.

The backbone is frozen and its pooled features are cached exactly as for ``feature_extraction``
(job/modes.py: FeatureMode, job/features.py). The head is one linear layer, fitted as
L2-regularised multinomial logistic regression on the cached features of the whole training
split, solved to convergence (not trained by SGD for some epochs):

    objective(W, b) = mean_i cross_entropy(W z_i + b, y_i) + l2 / 2 * ||W||_F^2     (bias unpenalised)

with ``z`` the features standardized with the training split's per-feature mean and standard
deviation (a constant feature keeps std 1). Standardizing conditions the problem (L-BFGS converges
in far fewer iterations) and makes one ``l2`` grid fit any backbone; the penalty is therefore on
the standardized weights. At the end the standardization is folded into the layer,
``W_raw = W / std`` and ``b_raw = b - W_raw @ mean``, so the saved head works on raw features
(what ``best/`` is evaluated and served with).

Solver: ``torch.optim.LBFGS`` with ``line_search_fn="strong_wolfe"``, full batch, float64, on the
run's device; it stops when the largest gradient entry is below ``tol`` times its value at W=0,
b=0 (``fit_logistic``), when the objective stops changing in float64 (both count as converged), or
after ``max_iter`` iterations (not converged: the console line and metrics.json say so).

Strength: the values of ``probe.l2_grid`` (default 15 values, 1e1 down to 1e-6, half a
decade apart), in the order given, each solve warm-started from the previous solution (strongest
first: each next problem starts near its answer); the one with the best validation metric
(``early_stopping.metric``, val_accuracy by default; ties keep the earlier grid value) is kept,
and the test split is touched once, with it, by the trainer as for any run. The grid stops early
once ``early_stopping.patience`` consecutive values have not bettered the best by more than
``early_stopping.min_delta`` (patience 0: every value): past the validation peak, weaker
strengths only fall, and they are the slow solves (on all of CIFAR-10 with Lite0 at 160 px, each
of the last six hit the 1,000-iteration cap, ~200 s apiece on 2 cores). The log says where it
stopped and which values it did not solve. One ``history.jsonl``
row per grid value: epoch = grid index, ``lr`` = that l2 (the row's "step size" is the
regularisation strength), ``step`` = L-BFGS iterations so far, train_loss/train_accuracy the data
term and accuracy on the training split, val_loss/val_accuracy on the validation split.

Kornblith, Shlens and Le ("Do Better ImageNet Models Transfer Better?", CVPR 2019) and SimCLR
evaluate fixed features this way (L-BFGS logistic regression, the L2 penalty chosen on a
validation split over 45 log-spaced values between 1e-6 and 1e5). Their penalty is not scaled as
ours (ours multiplies a *mean* loss: l2 here ~ their lambda / N), and whether they standardized the
features is not asserted here; pass their grid as ``probe.l2_grid`` for their sweep size.

Not used by the probe (nothing trains by SGD): train.epochs, optim.*, schedule.*, loss.label_smoothing,
ema.epochs, mixing. Float64 features of the train and val
splits live on the run's device: ~8 bytes x N x width (45,000 x 1,536: 0.55 GB).

Several processes: every rank holds every split's features (the cache), solves the same
deterministic problem on its own device, and takes rank 0's solution (broadcast) so that the
replicas are identical bit for bit: 1 and N processes give the same answer. A preempted probe
starts over (it keeps no checkpoint: the solve is seconds to minutes once features are cached).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from job.config import Config
from job.early_stopping import EarlyStopping, metric_value
from job.records import EpochRecord

# The solver's stopping rule: no run changed them (once config keys, removed in #29). Converged
# means max |gradient| <= PROBE_TOL x its value at zero weights; PROBE_MAX_ITER L-BFGS iterations
# per l2 value at most.
PROBE_TOL = 1e-6
PROBE_MAX_ITER = 1000


@dataclass
class SolveInfo:
    iterations: int  # L-BFGS iterations of this solve
    evaluations: int  # objective and gradient evaluations
    grad_norm: float  # largest |gradient entry| of the penalised objective at the solution
    objective: float
    # stopped before max_iter: the gradient tolerance was met, or the objective no longer changes
    # in float64 (the line search finds no decrease: the solution to machine precision)
    converged: bool
    seconds: float


def standardize(train: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature mean and standard deviation of the training split (std 1 where it is 0)."""
    mean = train.mean(dim=0)
    std = train.std(dim=0, unbiased=False)
    return mean, torch.where(std > 1e-12, std, torch.ones_like(std))


def objective(z: torch.Tensor, y: torch.Tensor, W: torch.Tensor, b: torch.Tensor, l2: float) -> torch.Tensor:
    """Mean cross-entropy + l2 / 2 * ||W||^2 (the bias unpenalised)."""
    return F.cross_entropy(z @ W.T + b, y) + 0.5 * l2 * (W * W).sum()


def _grad_max(z, y, W, b, l2) -> float:
    W, b = W.detach().clone().requires_grad_(True), b.detach().clone().requires_grad_(True)
    gW, gb = torch.autograd.grad(objective(z, y, W, b, l2), (W, b))
    return max(gW.abs().max().item(), gb.abs().max().item())


def fit_logistic(z: torch.Tensor, y: torch.Tensor, l2: float, num_classes: int, *,
                 init: tuple[torch.Tensor, torch.Tensor] | None = None, tol: float = 1e-6,
                 max_iter: int = 1000, on_evaluation=None) -> tuple[torch.Tensor, torch.Tensor, SolveInfo]:
    """Minimise ``objective`` over (W, b) for features ``z`` (N, D) and labels ``y`` (N,) with
    full-batch L-BFGS (strong Wolfe line search) in z's dtype (float64 for the probe), starting
    from ``init`` (a previous solution) or zeros. Stops when max |gradient| <= tol x its value at
    zero, or after ``max_iter`` iterations. Deterministic for given inputs and device.
    ``on_evaluation()`` is called before each objective evaluation (the preemption check: a solve
    takes minutes on a large split, longer than a pod's grace period)."""
    start = time.perf_counter()
    dims = (num_classes, z.shape[1])
    W0, b0 = init if init is not None else (z.new_zeros(dims), z.new_zeros(num_classes))
    W = W0.detach().clone().requires_grad_(True)
    b = b0.detach().clone().requires_grad_(True)
    threshold = tol * _grad_max(z, y, z.new_zeros(dims), z.new_zeros(num_classes), l2)
    opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=max_iter, max_eval=max_iter * 2, tolerance_grad=threshold,
                            tolerance_change=0.0, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        if on_evaluation is not None:
            on_evaluation()
        opt.zero_grad()
        loss = objective(z, y, W, b, l2)
        loss.backward()
        return loss

    opt.step(closure)
    state = opt.state[opt._params[0]]
    grad = _grad_max(z, y, W, b, l2)
    with torch.no_grad():
        value = objective(z, y, W, b, l2).item()
    info = SolveInfo(iterations=int(state.get("n_iter", 0)), evaluations=int(state.get("func_evals", 0)),
                     grad_norm=grad, objective=value, converged=grad <= threshold or state.get("n_iter", 0) < max_iter,
                     seconds=time.perf_counter() - start)
    return W.detach(), b.detach(), info


@torch.no_grad()
def scores(z: torch.Tensor, y: torch.Tensor, W: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of the linear classifier on (z, y)."""
    logits = z @ W.T + b
    return F.cross_entropy(logits, y).item(), (logits.argmax(dim=1) == y).double().mean().item()


@dataclass
class GridPoint:
    l2: float
    W: torch.Tensor
    b: torch.Tensor
    info: SolveInfo
    train_loss: float
    train_accuracy: float
    val_loss: float
    val_accuracy: float


def grid_search(train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor], grid: list[float],
                num_classes: int, metric: str = "val_accuracy", on_point=None, patience: int = 0,
                min_delta: float = 0.0, **solver) -> tuple[list[GridPoint], int]:
    """Solve for the l2 values of ``grid`` in order, each warm-started from the previous solution;
    return the points solved and the index of the best by ``metric`` (the first of equals).
    ``patience`` > 0: stop once that many consecutive values have not bettered the best (by more
    than ``min_delta``): the grid runs from strong to weak regularisation, validation rises to a
    peak and then falls, and the weak end is where L-BFGS needs the most iterations. ``on_point(index,
    point)`` is called after each solve (logging, preemption checks)."""
    points, init = [], None
    pick = EarlyStopping(metric, patience=patience, min_delta=min_delta)
    for i, l2 in enumerate(grid):
        W, b, info = fit_logistic(*train, l2, num_classes, init=init, **solver)
        init = (W, b)
        point = GridPoint(l2, W, b, info, *scores(*train, W, b), *scores(*val, W, b))
        points.append(point)
        pick.update(metric_value(metric, point.val_accuracy, point.val_loss), i)
        if on_point is not None:
            on_point(i, point)
        if pick.should_stop:
            break
    return points, pick.best_epoch


def fold(W: torch.Tensor, b: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer on raw features equal to (W, b) on standardized ones."""
    W_raw = W / std
    return W_raw, b - W_raw @ mean


def _as_tensors(features: np.ndarray, labels: np.ndarray, device) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.from_numpy(np.asarray(features, dtype=np.float64)).to(device),
            torch.from_numpy(np.asarray(labels, dtype=np.int64)).to(device))


@dataclass
class ProbeResult:
    """What the probe's solve returns (job/train.py records it): the chosen layer on raw
    features, the points solved, and the figures metrics.json keeps."""

    W: torch.Tensor
    b: torch.Tensor
    points: list[GridPoint]
    best: int  # index into points
    steps: int  # L-BFGS iterations over the grid: the run's "global steps"
    solve_seconds: float

    @property
    def chosen(self) -> GridPoint:
        return self.points[self.best]

    def summary(self) -> dict:
        """What metrics.json adds for the probe (job/records.py: RunSummary)."""
        return {"probe_l2": self.chosen.l2, "probe_solve_seconds": self.solve_seconds, "probe_iterations": self.steps,
                "probe_converged": all(p.info.converged for p in self.points)}


def point_record(i: int, p: GridPoint, steps: int, n_train: int, n_val: int) -> EpochRecord:
    """A grid value's history row: l2 in place of the learning rate, the solve in place of an epoch."""
    rate = n_train * max(p.info.evaluations, 1) / max(p.info.seconds, 1e-9)
    return EpochRecord(epoch=i, step=steps, lr=p.l2, train_loss=p.train_loss, train_accuracy=p.train_accuracy,
                       train_samples=n_train, epoch_seconds=p.info.seconds, images_per_second=rate,
                       images_per_second_per_device=rate, data_wait_fraction=0.0, val_loss=p.val_loss,
                       val_accuracy=p.val_accuracy, val_samples=n_val)


def solve_probe(acc, cfg: Config, feats, num_classes: int, preempted: Callable[[], bool], trackers) -> ProbeResult:
    """The run's "epochs" for ``train.strategy=linear_probe``: the grid search on the cached
    features ``feats`` (job/features.py: FeatureSet), one history row per grid value in
    ``trackers``; returns the chosen layer, folded onto raw features and equal on every rank.
    ``preempted()`` is the collective SIGTERM poll: every rank solves the same grid, so it is
    reached at the same evaluation everywhere."""
    from accelerate.utils import broadcast

    from job.preemption import Preempted
    from job.records import shown_epoch

    grid = list(cfg.probe.l2_grid)
    x_train, y_train = _as_tensors(feats.features["train"], feats.labels["train"], acc.device)
    x_val, y_val = _as_tensors(feats.features["val"], feats.labels["val"], acc.device)
    mean, std = standardize(x_train)
    train, val = ((x_train - mean) / std, y_train), ((x_val - mean) / std, y_val)
    del x_train, x_val
    acc.print(f"linear probe: L2-regularised logistic regression (L-BFGS, float64, standardized features) on "
              f"{len(y_train)} train / {len(y_val)} val features of width {mean.numel()}, "
              f"{len(grid)} l2 value(s) from {grid[0]:g} to {grid[-1]:g}")
    steps, evaluations = 0, 0

    def on_point(i: int, p: GridPoint) -> None:
        nonlocal steps
        steps += p.info.iterations
        trackers.log_step({"probe/l2": p.l2, "probe/iterations": p.info.iterations,
                           "probe/grad_norm": p.info.grad_norm, "probe/objective": p.info.objective,
                           "probe/converged": int(p.info.converged)}, step=steps)
        trackers.log_epoch(point_record(i, p, steps, len(y_train), len(y_val)))
        acc.print(f"l2 {p.l2:.1e} ({shown_epoch(i)}/{len(grid)}): {p.info.iterations} L-BFGS iterations, "
                  f"|grad| {p.info.grad_norm:.1e}{'' if p.info.converged else ' (NOT converged: max_iter)'}, "
                  f"{p.info.seconds:.1f}s | train_loss {p.train_loss:.4f} acc {p.train_accuracy:.4f} | "
                  f"val_loss {p.val_loss:.4f} acc {p.val_accuracy:.4f}")
        if preempted():
            raise Preempted("SIGTERM")

    def check_preemption() -> None:
        """Every ``train.signal_check_every`` evaluations: a solve outlasts a pod's grace period."""
        nonlocal evaluations
        evaluations += 1
        if evaluations % cfg.train.signal_check_every == 0 and preempted():
            raise Preempted("SIGTERM")

    es = cfg.early_stopping
    start = time.perf_counter()
    points, best = grid_search(train, val, grid, num_classes, metric=es.metric, on_point=on_point,
                               patience=es.patience, min_delta=es.min_delta, tol=PROBE_TOL,
                               max_iter=PROBE_MAX_ITER, on_evaluation=check_preemption)
    solve_seconds = time.perf_counter() - start
    chosen = points[best]
    if len(points) < len(grid):
        acc.print(f"linear probe: stopped the grid after {len(points)} of {len(grid)} l2 values: {es.metric} has not "
                  f"bettered l2={chosen.l2:g} for {es.patience} consecutive weaker values (early_stopping.patience); "
                  f"l2 {', '.join(f'{v:g}' for v in grid[len(points):])} not solved")
    W, b = fold(chosen.W, chosen.b, mean, std)
    # rank 0's answer everywhere: the replicas are identical whatever each device's rounding
    W, b = broadcast(W.contiguous()), broadcast(b.contiguous())
    acc.print(f"linear probe: chose l2={chosen.l2:g} (grid index {best}, val accuracy {chosen.val_accuracy:.4f}); "
              f"{steps} L-BFGS iterations in {solve_seconds:.1f}s")
    return ProbeResult(W=W, b=b, points=points, best=best, steps=steps, solve_seconds=solve_seconds)
