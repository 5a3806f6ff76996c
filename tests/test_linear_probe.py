"""train.strategy=linear_probe (job/linear_probe.py): the solver against an independent reference,
the grid's choice, a whole run in-process whose best/ job/evaluate.py reproduces, 1 process = 2
processes exactly, and the refusals."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from helpers.runs import REPO, accelerate_launch, run, small_run
from job.config import ConfigError, load_config
from job.linear_probe import fit_logistic, fold, grid_search, objective, scores, standardize
from job.modes import LinearProbeMode, build_mode
from job.run_dir import RunDir

GRID = ["probe.l2_grid=[1.0,0.01,0.0001]"]
PROBE = ["train.strategy=linear_probe", "model.head_hidden=[]", "model.head_dropout=0"]


def tiny(tmp_path, *overrides):
    return load_config(REPO / "tests" / "configs" / "small.yaml",
                       [f"train.output_dir={tmp_path / 'run'}", f"data.prepared_dir={tmp_path / 'prep'}",
                        "data.synthetic_train=200", "data.synthetic_test=50", "train.log_every=1000", *overrides])


def problem(n=150, d=12, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, classes, (n,), generator=g)
    return centers[y] + 1.5 * torch.randn(n, d, generator=g, dtype=torch.float64), y


def test_the_solver_reaches_the_optimum_that_scikit_learn_finds():
    z, y = problem()
    l2 = 0.05
    W, b, info = fit_logistic(z, y, l2, 4, tol=1e-10)
    assert info.converged and info.iterations > 0
    # KKT: the gradient of the penalised objective vanishes at the solution
    Wg, bg = W.clone().requires_grad_(True), b.clone().requires_grad_(True)
    gW, gb = torch.autograd.grad(objective(z, y, Wg, bg, l2), (Wg, bg))
    assert gW.abs().max() < 1e-8 and gb.abs().max() < 1e-8
    # scikit-learn minimises C * sum(CE) + ||W||^2 / 2, i.e. ours times C * N with C = 1 / (l2 * N)
    linear_model = pytest.importorskip("sklearn.linear_model")
    ref = linear_model.LogisticRegression(C=1 / (l2 * len(y)), tol=1e-12, max_iter=10_000)
    ref.fit(z.numpy(), y.numpy())
    torch.testing.assert_close(W, torch.from_numpy(ref.coef_), atol=1e-6, rtol=1e-6)
    # the bias is unpenalised and softmax ignores a shift common to every class: compare centred
    ref_b = torch.from_numpy(ref.intercept_)
    torch.testing.assert_close(b - b.mean(), ref_b - ref_b.mean(), atol=1e-6, rtol=1e-6)
    # warm-started from the answer, it stops at once on the same answer
    W2, b2, again = fit_logistic(z, y, l2, 4, init=(W, b), tol=1e-10)
    assert again.iterations <= 1 and torch.allclose(W2, W, atol=1e-10)


def test_the_grid_keeps_the_best_validation_accuracy_and_the_fold_works_on_raw_features():
    x, y = problem(n=200, d=30, seed=1)
    x = x * torch.linspace(0.1, 50, 30, dtype=torch.float64) + 7  # scales that standardization undoes
    mean, std = standardize(x[:120])
    z = (x - mean) / std
    grid = [10.0, 1.0, 0.1, 0.01, 1e-3, 1e-4]
    seen = []
    points, best = grid_search((z[:120], y[:120]), (z[120:], y[120:]), grid, 4,
                               on_point=lambda i, p: seen.append(i))
    assert seen == list(range(len(grid))) and [p.l2 for p in points] == grid
    accuracies = [p.val_accuracy for p in points]
    assert best == accuracies.index(max(accuracies))  # the argmax, the first of equals
    assert all(p.info.converged for p in points)
    W, b = fold(points[best].W, points[best].b, mean, std)
    torch.testing.assert_close(x @ W.T + b, z @ points[best].W.T + points[best].b)
    assert scores(x[120:], y[120:], W, b)[1] == pytest.approx(max(accuracies))


@pytest.mark.parametrize("patience, min_delta, solved, best", [
    (2, 0.0, [10.0, 3.0, 1.0, 0.3, 0.1], 2),  # peak at 1.0, two falls: 0.03 onwards never solved
    (3, 0.0, [10.0, 3.0, 1.0, 0.3, 0.1, 0.03, 0.01, 0.003, 0.001], 5),  # a later, higher peak resets the count
    (2, 0.05, [10.0, 3.0, 1.0, 0.3], 1),  # 1.0's +0.03 is within min_delta: not an improvement
    (0, 0.0, [10.0, 3.0, 1.0, 0.3, 0.1, 0.03, 0.01, 0.003, 0.001, 0.0003], 5),  # patience 0: the whole grid
])
def test_the_grid_stops_after_patience_values_without_improvement(monkeypatch, patience, min_delta, solved, best):
    """The grid runs strong to weak; past the validation peak the weak, slow solves only lose.
    Validation accuracy is scripted per grid value (the solves are real): which strengths were
    solved is exact."""
    from job import linear_probe

    grid = [10.0, 3.0, 1.0, 0.3, 0.1, 0.03, 0.01, 0.003, 0.001, 0.0003]
    val_accuracy = [0.50, 0.60, 0.63, 0.61, 0.60, 0.70, 0.69, 0.68, 0.67, 0.66]
    calls = []

    def scripted(z, y, W, b):  # grid_search scores train, then val, for each point
        calls.append(len(calls))
        point = (len(calls) - 1) // 2
        return 1.0, (val_accuracy[point] if len(calls) % 2 == 0 else 0.9)

    monkeypatch.setattr(linear_probe, "scores", scripted)
    x, y = problem()
    seen = []
    points, chosen = grid_search((x[:100], y[:100]), (x[100:], y[100:]), grid, 4, patience=patience,
                                 min_delta=min_delta, on_point=lambda i, p: seen.append(p.l2))
    assert [p.l2 for p in points] == seen == solved
    assert chosen == best


@pytest.fixture(scope="module")
def probe_run(tmp_path_factory):
    """One 1-process probe run in-process, shared by the tests below (the suite is long)."""
    from job.train import fit

    tmp = tmp_path_factory.mktemp("probe")
    cfg = tiny(tmp, *PROBE, *GRID)
    assert isinstance(build_mode(cfg), LinearProbeMode)
    assert fit(cfg) == 0
    return tmp


def test_a_probe_run_writes_every_output_and_evaluate_reproduces_its_test(probe_run, capsys):
    from job.evaluate import main as evaluate_main

    out = RunDir(probe_run / "run")
    history, summary = out.epochs(), out.summary()
    assert [r.epoch for r in history] == [0, 1, 2] and [r.lr for r in history] == [1.0, 0.01, 0.0001]
    accuracies = [r.val_accuracy for r in history]
    best = accuracies.index(max(accuracies))
    assert summary.best_epoch == best and summary.probe_l2 == history[best].lr
    assert summary.best_val_accuracy == max(accuracies) and summary.epochs_completed == 3
    assert summary.features_cached and summary.probe_solve_seconds > 0 and summary.probe_iterations > 0
    assert abs(summary.test_accuracy - summary.test_accuracy_cached) <= 2 / summary.test_samples
    card = out.card()
    assert card.head_hidden == [] and card.epoch == best and card.val_accuracy == max(accuracies)
    capsys.readouterr()
    assert evaluate_main(["--run", str(out.path)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["accuracy"] == summary.test_accuracy and result["samples"] == summary.test_samples


def test_one_and_two_processes_give_the_same_probe(probe_run, tmp_path):
    """Every rank solves the same problem on the same cached features; rank 0's layer is kept:
    the 2-process run's model is the 1-process run's (probe_run), bit for bit. The features are
    extracted anew by the 2 processes (another cache directory), from the same prepared store."""
    two = tmp_path / "two"
    args = small_run(two, probe_run / "prep", *PROBE, *GRID, "data.synthetic_train=200", "data.synthetic_test=50",
                     "train.log_every=1000", f"features.cache_dir={tmp_path / 'features'}")
    out = run(accelerate_launch(2, "job/train.py", *args), timeout=300).stdout
    assert "extracted features" in out
    a, b = RunDir(probe_run / "run"), RunDir(two)
    assert b.summary().world_size == 2 and b.summary().replicas_identical is True
    assert a.summary().test_accuracy == b.summary().test_accuracy
    assert a.summary().probe_l2 == b.summary().probe_l2
    assert [r.val_accuracy for r in a.epochs()] == [r.val_accuracy for r in b.epochs()]
    wa, wb = load_file(str(a.weights_file)), load_file(str(b.weights_file))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("override, needles", [
    ("model.head_hidden=[16]", ("model.head_hidden=[16]", "linear_probe", "model.head_hidden=[]")),
    ("features.cache=false", ("features.cache=false", "linear_probe", "features.cache=auto")),
    ("probe.l2_grid=[]", ("probe.l2_grid",)),
    ("probe.l2_grid=[0.1,0]", ("probe.l2_grid",)),
])
def test_what_a_probe_cannot_be_is_refused(tmp_path, capsys, override, needles):
    from job.train import main

    base = ["model.head_hidden=[]", "train.strategy=linear_probe"]
    with pytest.raises(ConfigError):
        tiny(tmp_path, *base, override)
    args = ["--config", str(REPO / "tests" / "configs" / "small.yaml"), f"train.output_dir={tmp_path / 'out'}",
            *base, override]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert all(n in err for n in needles), err
    assert not (tmp_path / "out").exists()


def test_a_sigterm_stops_the_probe_inside_a_solve_not_after_the_grid(tmp_path):
    """A solve takes minutes on a full split, longer than a pod's grace period: the preemption
    check runs between L-BFGS evaluations, so the job exits 143 within one check of the signal."""
    from job.preemption import EXIT_PREEMPTED, Preempted
    from job.train import Trainer

    trainer = Trainer(tiny(tmp_path, *PROBE, *GRID, "train.signal_check_every=3"))
    trainer.setup()
    trainer.preemption.received = True  # what the SIGTERM handler sets
    with pytest.raises(Preempted):
        trainer.solve_probe()
    assert not RunDir(trainer.out).history_file.exists() or not RunDir(trainer.out).epochs()  # stopped mid-solve
    assert trainer.exit_preempted(Preempted("SIGTERM")) == EXIT_PREEMPTED


def test_a_probe_run_that_stops_the_grid_says_so_and_records_only_what_it_solved(tmp_path, monkeypatch, capsys):
    """The whole run in-process, validation scripted to fall after the first value: with
    early_stopping.patience=2 only 3 of the 5 strengths are solved, the log names the rest,
    history.jsonl has 3 rows and metrics.json says it stopped early."""
    from job import linear_probe
    from job.train import fit

    real = linear_probe.scores
    falling = iter([0.9, 0.8, 0.7, 0.6, 0.5])

    def scripted(z, y, W, b):
        loss, accuracy = real(z, y, W, b)
        return (loss, next(falling)) if len(y) == 20 else (loss, accuracy)  # the 20 validation features

    monkeypatch.setattr(linear_probe, "scores", scripted)
    cfg = tiny(tmp_path, *PROBE, "probe.l2_grid=[1.0,0.1,0.01,0.001,0.0001]", "early_stopping.patience=2")
    assert fit(cfg) == 0
    out = capsys.readouterr().out
    assert "stopped the grid after 3 of 5 l2 values" in out and "l2 0.001, 0.0001 not solved" in out, out
    run_dir = RunDir(tmp_path / "run")
    assert [r.lr for r in run_dir.epochs()] == [1.0, 0.1, 0.01]
    summary = run_dir.summary()
    assert summary.stopped_early and summary.epochs_completed == 3 and summary.probe_l2 == 1.0
