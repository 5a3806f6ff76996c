"""Config loading: defaults < YAML < CLI, and every invalid value rejected with a clear message."""
import pytest
import yaml

from job.config import Config, ConfigError, load_config
from job.run_dir import RunDir


def test_defaults_are_the_products_defaults():
    cfg = load_config()
    assert cfg.model.name == "inception_resnet_v2" and cfg.model.pretrained
    assert cfg.data.image_size is None and cfg.data.val_fraction == 0.1
    assert cfg.train.strategy == "finetune" and cfg.train.resume == "auto"


def test_yaml_then_overrides_win(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"train": {"epochs": 7, "strategy": "two_stage"}, "optim": {"lr": 0.5}}))
    cfg = load_config(path, ["train.epochs=3", "model.head_hidden=[1024,512,256]", "model.weights=null",
                             "optim.lr=1e-3", "tracking.tags=[a,b]", "data.root=/x/y"])
    assert cfg.train.epochs == 3 and cfg.train.strategy == "two_stage"
    assert cfg.model.head_hidden == [1024, 512, 256] and cfg.model.weights is None
    assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.lr, float)
    assert cfg.tracking.tags == ["a", "b"] and cfg.data.root == "/x/y"


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(None, ["train.epochs=4", "schedule.name=plateau"])
    cfg.save(RunDir(tmp_path).config_file)
    again = RunDir(tmp_path).config()
    assert again == cfg and isinstance(again, Config)


@pytest.mark.parametrize("override,message", [
    ("train.epoch=3", "unknown key.*train.epoch.*valid keys: train.strategy"),
    ("trian.epochs=3", "unknown key.*trian"),
    ("train.strategy=freeze", "choose one of feature_extraction, finetune, two_stage"),
    ("optim.name=lion", "choose one of sgd, adamw, adam"),
    ("schedule.name=linear", "choose one of cosine, step, plateau"),
    ("train.mixed_precision=fp8", "choose one of auto, bf16, fp16, no"),
    ("early_stopping.metric=accuracy", "choose one of val_accuracy, val_loss"),
    ("tracking.wandb=yes", "choose one of auto, online, offline, disabled"),
    ("data.source=imagenet", "choose one of cifar10, folder, synthetic"),
    ("train.epochs=three", "train.epochs must be an integer"),
    ("train.epochs=2.5", "train.epochs must be an integer"),
    ("model.pretrained=maybe", "model.pretrained must be true or false"),
    ("model.head_hidden=512", "must be a list"),
    ("model.head_hidden=[512,x]", r"model.head_hidden\[1\] must be an integer"),
    ("train.epochs=0", "train.epochs must be >= 1"),
    ("data.batch_size=0", "data.batch_size must be >= 1"),
    ("data.val_fraction=1.0", r"data.val_fraction must be in \(0, 1\)"),
    ("data.val_fraction=0", r"training needs a validation split"),
    ("train.seed=-3", r"train.seed must be >= 0"),
    ("optim.lr=-1", "optim.lr must be > 0"),
    ("model.head_dropout=1.5", "head_dropout"),
    ("data.image_size=8", r"data.image_size must be in \[16, 1024\]"),
    ("data.image_size=100000", r"data.image_size must be in \[16, 1024\] \(MAX_IMAGE_SIZE\)"),
    ("optim.lr=.inf", "optim.lr=inf is not a finite number"),
    ("schedule.min_lr=.nan", "schedule.min_lr=nan is not a finite number"),
    ("optim.weight_decay=-inf", "optim.weight_decay=-inf is not a finite number"),
    ("optim.momentum=-0.5", r"optim.momentum must be in \[0, 1\)"),
    ("train.resume=/does/not/exist", "not a checkpoint written by this job"),
    ("epochs=3", "section.key=value"),
])
def test_invalid_values_are_rejected_with_the_fix(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_cross_field_rules():
    with pytest.raises(ConfigError, match="head_epochs must be in"):
        load_config(None, ["train.strategy=two_stage", "train.epochs=2", "train.head_epochs=2"])
    with pytest.raises(ConfigError, match="data.root is required"):
        load_config(None, ["data.source=folder"])
    with pytest.raises(ConfigError, match="download only applies"):
        load_config(None, ["data.source=synthetic", "data.download=true"])


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "bad.yaml").write_text("train: {epochs: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")


def test_presets_load(tmp_path):
    from pathlib import Path

    presets = sorted((Path(__file__).parent.parent / "job" / "configs").glob("*.yaml"))
    assert {p.stem for p in presets} >= {"demo", "feature_extraction", "finetune"}
    for preset in presets:
        load_config(preset)


def _readme_key_table() -> dict[str, str]:
    import re

    from helpers.runs import REPO

    text = (REPO / "README.md").read_text()
    table = text.split("<!-- config-keys:start -->")[1].split("<!-- config-keys:end -->")[0]
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    return {re.match(r"\| `([^`]+)`", row).group(1): re.match(r"\| `[^`]+` \| `([^`]*)`", row).group(1)
            for row in rows}


def test_the_readme_key_table_is_every_key_with_its_default():
    """The README's table cannot drift from job/config.py: same keys, same defaults."""
    import dataclasses

    from job.config import Config

    documented = _readme_key_table()
    defaults = {}
    for section in dataclasses.fields(Config):
        for f in dataclasses.fields(section.default_factory()):
            value = getattr(section.default_factory(), f.name)
            defaults[f"{section.name}.{f.name}"] = value
    assert sorted(documented) == sorted(defaults)
    for key, value in defaults.items():
        assert yaml.safe_load(documented[key]) == value, (key, documented[key], value)


def test_the_readme_lists_the_history_keys_that_are_written():
    import dataclasses
    import re

    from helpers.runs import REPO
    from job.records import EpochRecord

    row = next(line for line in (REPO / "README.md").read_text().splitlines() if line.startswith("| `history.jsonl`"))
    listed = re.findall(r"`([a-z_]+)`", row.split("|")[2])
    assert listed == [f.name for f in dataclasses.fields(EpochRecord)]


def test_a_global_batch_is_divided_over_processes_and_accumulation_exactly():
    from job.config import ConfigError, load_config, per_process_batch

    data = load_config(None, ["data.global_batch_size=256"]).data
    assert per_process_batch(data, world_size=8, grad_accum_steps=1) == 32
    assert per_process_batch(data, world_size=1, grad_accum_steps=4) == 64
    assert per_process_batch(data, world_size=64, grad_accum_steps=1) == 4
    with pytest.raises(ConfigError, match="data.global_batch_size=256 is not a multiple of 3"):
        per_process_batch(data, world_size=3, grad_accum_steps=1)
    plain = load_config(None, ["data.batch_size=48"]).data
    assert per_process_batch(plain, world_size=8, grad_accum_steps=2) == 48  # per process, as documented


def test_help_names_every_key_with_its_default_and_meaning():
    """`job/train.py --help` is the reference a user reads first: every key, its default, and the
    comment or the choices from job/config.py (the README table's source too)."""
    import dataclasses
    import subprocess
    import sys

    from helpers.runs import REPO
    from job.config import Config

    out = subprocess.run([sys.executable, "job/train.py", "--help"], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout
    assert "on CIFAR-10 or\nyour own image folders" in out  # the whole first paragraph, not a cut line
    for section in dataclasses.fields(Config):
        for f in dataclasses.fields(section.default_factory()):
            assert f"  {section.name}.{f.name}=" in out, f"{section.name}.{f.name}"
    assert "train.strategy=finetune" in out and "feature_extraction | finetune | two_stage" in out
    assert "data.batch_size=64" in out and "images per process per step" in out


def test_help_never_splits_a_word_across_lines():
    """A long default (probe.l2_grid's list) once pushed its meaning's first word apart
    (``...1.0e-06]l`` / ``inear_probe``): long defaults now get a line of their own."""
    from job.config import keys_help

    text = keys_help()
    lines = text.splitlines()
    grid = next(i for i, line in enumerate(lines) if line.strip().startswith("probe.l2_grid="))
    assert lines[grid].strip().endswith("1.0e-06]")  # the whole default on one line
    assert lines[grid + 1].split()[0] == "linear_probe"
    assert "inear_probe" not in text.replace("linear_probe", "")
    words = set(text.split())
    assert {"L-BFGS", "(job/linear_probe.py):", "cross-entropy"} <= words
