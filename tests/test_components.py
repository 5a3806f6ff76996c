"""Each feature a component (issue #29): its own config section, its own file, one registration
line in job/train.py. Old keys are refused with their new place; the trainer holds the parts every
run has and the components list; the shape limits the issue set are checked here."""
from __future__ import annotations

import ast
import dataclasses

import pytest
import yaml

from helpers.runs import REPO
from job.config import MOVED_KEYS, REMOVED_KEYS, Config, ConfigError, TrainConfig, load_config


def tiny(tmp_path, *overrides):
    return load_config(REPO / "tests" / "configs" / "small.yaml",
                       [f"train.output_dir={tmp_path / 'run'}", f"data.prepared_dir={tmp_path / 'prep'}",
                        "data.synthetic_train=200", "data.synthetic_test=50", "train.log_every=1000", *overrides])


@pytest.mark.parametrize("old,new", sorted(MOVED_KEYS.items()))
def test_a_moved_key_is_refused_with_its_new_name(old, new, tmp_path):
    with pytest.raises(ConfigError, match=f"^{old} is now {new}: rename it"):
        load_config(None, [f"{old}=1"])
    section, name = old.split(".")
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump({section: {name: 1}}))
    with pytest.raises(ConfigError, match=f"^{old} is now {new}"):
        load_config(path)
    new_section, new_name = new.split(".")
    assert new_name in {f.name for f in dataclasses.fields(getattr(Config(), new_section))}


@pytest.mark.parametrize("old", sorted(REMOVED_KEYS))
def test_a_removed_key_is_refused_saying_what_replaced_it(old):
    with pytest.raises(ConfigError, match=f"^{old} is no longer a key"):
        load_config(None, [f"{old}=1"])


def test_the_moved_keys_have_no_default_change():
    """Behaviour stays: every moved key's default is the one it had under train: (or model:)."""
    cfg = Config()
    assert (cfg.ema.epochs, cfg.mix.mixup_alpha, cfg.mix.cutmix_alpha, cfg.mix.prob, cfg.mix.off_epoch) == (
        0.0, 0.0, 0.0, 1.0, 0)
    assert (cfg.features.cache, cfg.features.dtype, cfg.features.cache_dir) == ("auto", "float16", None)
    assert (cfg.checkpoint.keep, cfg.checkpoint.every_minutes) == (2, 30.0)
    assert (cfg.timeouts.setup_minutes, cfg.timeouts.step_minutes) == (60.0, 5.0)
    assert (cfg.ddp.sync_batchnorm, cfg.tta.test, len(cfg.probe.l2_grid)) == ("auto", "none", 15)


def test_train_keeps_at_most_16_keys():
    assert len(dataclasses.fields(TrainConfig)) <= 16


def test_no_function_in_config_is_over_40_lines():
    tree = ast.parse((REPO / "job" / "config.py").read_text())
    lengths = {n.name: n.end_lineno - n.lineno + 1 for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
    assert max(lengths.values()) <= 40, {k: v for k, v in lengths.items() if v > 40}


def test_nothing_outside_train_py_takes_the_trainer():
    takers = []
    for path in sorted((REPO / "job").rglob("*.py")):
        if path.name == "train.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = node.args.args + node.args.kwonlyargs
                if any(a.arg == "trainer" or "Trainer" in ast.unparse(a.annotation or ast.Constant(""))
                       for a in args):
                    takers.append(f"{path.name}:{node.name}")
    assert takers == []


def test_pick_best_keeps_the_raw_weights_on_a_tie_and_reads_the_metric_once():
    from job.components import pick_best
    from job.early_stopping import metric_value

    raw, ema = {"accuracy": 0.5, "loss": 1.0}, {"accuracy": 0.6, "loss": 1.2}
    assert pick_best({"raw": raw, "ema": ema}, "val_accuracy") == "ema"
    assert pick_best({"raw": raw, "ema": ema}, "val_loss") == "raw"
    assert pick_best({"raw": raw, "ema": dict(raw)}, "val_accuracy") == "raw"
    assert (metric_value("val_accuracy", 0.25, 3.0), metric_value("val_loss", 0.25, 3.0)) == (0.25, 3.0)


def test_each_section_registers_its_component_once_and_its_state_with_the_checkpointer(tmp_path):
    from job.train import Trainer

    plain = Trainer(tiny(tmp_path / "plain", "checkpoint.every_minutes=0", "train.epochs=1"))
    plain.setup()
    assert [c.name for c in plain.components] == ["progress", "timeouts"]
    assert plain.checkpointer.tensor_states == {}
    assert len(vars(plain)) <= 12, sorted(vars(plain))

    every = Trainer(tiny(tmp_path / "every", "ema.epochs=0.5", "mix.mixup_alpha=0.2", "tta.test=flip",
                         "checkpoint.every_minutes=5", "train.epochs=1", "data.test_image_size=24"))
    every.setup()
    assert [c.name for c in every.components] == ["progress", "timeouts", "mix", "ema", "timed_checkpoint", "tta",
                                                  "resize"]
    assert every.parts.mix is every.components[2]
    (ema,) = every.checkpointer.tensor_states.values()
    assert list(every.checkpointer.tensor_states) == ["ema"] and ema is every.components[3]
    assert len(vars(every)) <= 12, sorted(vars(every))


def test_the_timed_checkpoint_is_due_by_its_clock_and_resets_on_a_save():
    from job.checkpoint import TimedCheckpoint
    from job.config import CheckpointConfig

    said = []
    assert TimedCheckpoint.build(CheckpointConfig(every_minutes=0), said.append) is None
    timed = TimedCheckpoint.build(CheckpointConfig(every_minutes=1.0), said.append)
    assert not timed.checkpoint_due()
    timed.last -= 61  # a minute and a second ago
    assert timed.checkpoint_due()
    timed.on_checkpoint("ckpt", timed=True)
    assert not timed.checkpoint_due() and said == ["saved ckpt (checkpoint.every_minutes=1)"]
    timed.on_checkpoint("epoch-end")  # an epoch-end save resets the clock without a line
    assert said == ["saved ckpt (checkpoint.every_minutes=1)"]


def test_each_refusal_is_named_for_what_happened_under_one_base():
    """Item 5: a NaN loss and a damaged checkpoint are not configuration errors; every kind of
    bad input is a BadInput, which job/train.py turns into exit 2."""
    from job.checkpoint import CheckpointError
    from job.config import BadInput
    from job.loop import NonFiniteLossError
    from job.tracking import TrackingError

    assert all(issubclass(e, BadInput) for e in (ConfigError, CheckpointError, NonFiniteLossError, TrackingError))
    assert not issubclass(CheckpointError, ConfigError) and not issubclass(NonFiniteLossError, ConfigError)


def test_a_damaged_checkpoint_is_a_checkpoint_error(tmp_path):
    from job.checkpoint import Checkpointer, CheckpointError
    from job.config import CHECKPOINT_MARKER
    from job.distributed import build_accelerator

    cfg = load_config(None, ["train.device=cpu"])
    ckpt = tmp_path / "checkpoints" / "epoch0001-step00000001"
    ckpt.mkdir(parents=True)
    (ckpt / CHECKPOINT_MARKER).write_text("{not json")
    checkpointer = Checkpointer(build_accelerator(cfg.train, cfg.timeouts), tmp_path, keep=2, states={})
    with pytest.raises(CheckpointError, match="not a readable checkpoint of this job"):
        checkpointer.load(ckpt)
