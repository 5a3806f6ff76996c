"""Bad, hostile and careless inputs through the real entry points (issue 19's probe): each is exit
code 2 with one line naming the file or value, leaves the user's files byte-identical and writes
nothing outside the output. In-process ``main()`` where that is the same code path; a child
process where the point is a traceback, a permission, memory or time."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

from job.config import DataConfig
from helpers.runs import (CIFAR_MINI, CIFAR_TARBALL, FOLDER_MINI, PYTHON, assert_refused, folder_subset, prepare_cli,
                          run, small_run, snapshot)
from job.atomic import TEMPORARY_MARKER
from job.run_dir import RunDir


def train_args(out: Path, prep: Path, *overrides: str) -> list[str]:
    return small_run(out, prep, "data.synthetic_train=200", "data.synthetic_test=50", *overrides)


def refused_in_process(main, argv: list[str], capsys, *needles: str) -> str:
    """``main(argv)`` returns 2 and prints one error line holding every needle."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err[-3000:]
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err[-3000:]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def _folder_root(tmp_path: Path, classes=("cat", "ship"), per_class: int = 6) -> Path:
    return folder_subset(tmp_path, classes, per_class)


# ---------------------------------------------------------------- data loss and stray writes

def test_a_user_folder_named_like_our_temporary_is_never_deleted(tmp_path):
    """Cleanup of abandoned temporaries matches our marker file, not the name: a user's
    ``.store.tmp-HOST-DEADPID`` survives, a marked one of ours is removed."""
    dead_pid = 2**22 + 4242  # above the default pid_max: no such process
    mine = tmp_path / f".store.tmp-{socket.gethostname()}-{dead_pid}"
    (mine / "thesis").mkdir(parents=True)
    (mine / "thesis" / "chapter1.tex").write_text("precious")
    before = snapshot(mine)
    ours = tmp_path / f".store.tmp-{socket.gethostname()}-{dead_pid + 1}"
    ours.mkdir()
    (ours / TEMPORARY_MARKER).write_text("")
    run([PYTHON, "-m", "job.data", "prepare", "--source", "cifar10", "--root", str(CIFAR_MINI),
         "--out", str(tmp_path / "store")])
    assert snapshot(mine) == before
    assert not ours.exists()
    assert not any(p.name.startswith(".store.old") for p in tmp_path.iterdir())
    assert not (tmp_path / "store" / TEMPORARY_MARKER).exists()  # the marker leaves with the swap


def test_an_output_dir_of_user_files_is_refused_before_anything_is_written(tmp_path, capsys):
    from job.train import main

    out = tmp_path / "my-project"
    out.mkdir()
    RunDir(out).config_file.write_text("lr: 0.1\nnotes: my own experiment\n")  # a user's files of those names
    RunDir(out).history_file.write_text('{"when": "yesterday", "what": "my notes"}\n')
    before = snapshot(out)
    refused_in_process(main, train_args(out, tmp_path / "prep"), capsys, f"train.output_dir={out}",
                       "no run of this job wrote")
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["my-project"]


def test_a_run_folder_whose_history_is_not_ours_is_refused_naming_the_file(tmp_path, capsys):
    from job.config import load_config
    from job.train import main

    out, prep = tmp_path / "out", tmp_path / "prep"
    argv = train_args(out, prep)
    out.mkdir()
    run_dir = RunDir(out)
    load_config(argv[1], argv[2:]).save(run_dir.config_file)  # a run folder of ours, as train.py writes it
    run_dir.history_file.write_text('{"when": "yesterday"}\n')
    refused_in_process(main, argv, capsys, str(run_dir.history_file), "line 1 is not an epoch record")
    assert run_dir.history_file.read_text() == '{"when": "yesterday"}\n'


@pytest.mark.parametrize("key, where", [("train.output_dir", "train"), ("train.output_dir", "."),
                                        ("train.output_dir", ".."), ("features.cache_dir", "train/cat")])
def test_outputs_inside_or_around_the_dataset_are_refused(tmp_path, capsys, key, where):
    from job.train import main

    root = _folder_root(tmp_path)
    before = snapshot(root)
    target = (root / where).resolve()
    argv = train_args(tmp_path / "out", tmp_path / "prep", "data.source=folder", f"data.root={root}", f"{key}={target}")
    refused_in_process(main, argv, capsys, f"{key}={target}", "overlaps data.root", "outside data.root")
    assert snapshot(root) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imgs"]


@pytest.mark.parametrize("override, needles", [
    ("data.image_size=100000", ("data.image_size must be in [16, 1024]",)),
    ("optim.lr=.inf", ("optim.lr=inf is not a finite number",)),
    ("optim.momentum=-0.5", ("optim.momentum must be in [0, 1)",)),
])
def test_config_values_refused_before_anything_is_written(tmp_path, capsys, override, needles):
    from job.train import main

    refused_in_process(main, train_args(tmp_path / "out", tmp_path / "prep", override), capsys, *needles)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- hangs and unbounded memory

def test_a_billion_laughs_config_is_refused_quickly_with_a_short_message(tmp_path, capsys):
    from job.train import main

    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, 9):
        lines.append(f"{chr(97 + i)}: &{chr(97 + i)} [{','.join(['*' + chr(96 + i)] * 9)}]")
    lines.append("model:\n  head_hidden: *i")
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\n")
    line = refused_in_process(main, ["--config", str(bomb)], capsys, str(bomb), "MAX_CONFIG_VALUES")
    assert len(line) < 300
    override = refused_in_process(main, ["train.epochs=" + "[" * 3 + "1" * 5000 + "]" * 3], capsys, "train.epochs")
    assert len(override) < 300  # the value is cut in the message


def test_config_files_that_never_end_or_block_are_refused(tmp_path):
    from job.config import ConfigError, load_config

    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    big = tmp_path / "big.yaml"
    big.write_text("tags: [" + "x," * 600_000 + "x]\n")
    for path, needle in ((Path("/dev/zero"), "is not a regular file"), (fifo, "is not a regular file"),
                         (big, "larger than MAX_CONFIG_BYTES"), (tmp_path / "none.yaml", "not found")):
        with pytest.raises(ConfigError, match=needle):
            load_config(path)


def test_synthetic_sizes_are_bounded_and_the_bound_is_named(tmp_path):
    proc = run([PYTHON, "-m", "job.data", "prepare", "--source", "synthetic", "--root", str(tmp_path / "src"),
                "--out", str(tmp_path / "store"), "--num-train", "100000000"], check=False, timeout=60)
    assert_refused(proc, "num_train=100000000", "MAX_SYNTHETIC_TRAIN=60000")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- OS errors on inputs and outputs

@pytest.fixture
def shared_tmp():
    """A directory another user may enter (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="refusals-"))
    path.chmod(0o777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def prepare_as_nobody(root: Path, out: Path, source: str) -> subprocess.CompletedProcess:
    """The prepare CLI as uid 65534: root reads everything, whatever the permissions say."""
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is needed to run as another user")
    return run(["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", PYTHON, "-m", "job.data",
                "prepare", "--source", source, "--root", str(root), "--out", str(out)], check=False,
               env={"HOME": "/tmp"})


def _open_to_all(path: Path) -> None:
    for p in (path, *path.rglob("*")):
        p.chmod(0o777 if p.is_dir() else 0o666)


@pytest.mark.skipif(os.geteuid() != 0, reason="switches to uid 65534 with setpriv, which needs root")
@pytest.mark.parametrize("case", ["unreadable batch file", "unreadable class folder", "read-only parent of --out"])
def test_permissions_are_named_refusals(shared_tmp, case):
    if case == "unreadable batch file":
        root = shared_tmp / "cifar"
        shutil.copytree(CIFAR_MINI, root)
        _open_to_all(shared_tmp)
        bad, out, source, needle = root / "data_batch_2", shared_tmp / "store", "cifar10", "Permission denied"
        bad.chmod(0)
    elif case == "unreadable class folder":
        root = _folder_root(shared_tmp)
        _open_to_all(shared_tmp)
        bad, out, source, needle = root / "test" / "ship", shared_tmp / "store", "folder", "Permission denied"
        bad.chmod(0)
    else:
        root = _folder_root(shared_tmp)
        locked = shared_tmp / "locked"
        locked.mkdir()
        _open_to_all(shared_tmp)
        locked.chmod(0o555)
        bad, out, source, needle = locked, locked / "store", "folder", "is not writable"
    proc = prepare_as_nobody(root, out, source)
    assert_refused(proc, str(bad), needle)
    assert not out.exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="switches to uid 65534 with setpriv, which needs root")
def test_a_store_on_a_read_only_mount_is_reused_not_refused(shared_tmp):
    """Training pods mount the prepared data read-only: the upfront write checks spare a store of
    ours, and only a rebuild there is refused (named, at the write)."""
    from job.data import prepare

    prepare(DataConfig(source="cifar10", root=str(CIFAR_TARBALL)), shared_tmp / "data" / "store")
    _open_to_all(shared_tmp)
    for d in (shared_tmp / "data", shared_tmp / "data" / "store"):
        d.chmod(0o555)
    before = snapshot(shared_tmp / "data")
    reused = prepare_as_nobody(CIFAR_TARBALL, shared_tmp / "data" / "store", "cifar10")
    assert reused.returncode == 0 and json.loads(reused.stdout)["reused"], reused.stderr[-2000:]
    proc = run(["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", PYTHON, "-m", "job.data",
                "prepare", "--source", "cifar10", "--root", str(CIFAR_TARBALL), "--out",
                str(shared_tmp / "data" / "store"), "--seed", "3"], check=False, env={"HOME": "/tmp"})
    assert_refused(proc, "Permission denied", f"where the store goes ({shared_tmp / 'data' / 'store'})")
    assert snapshot(shared_tmp / "data") == before


def test_links_files_and_tarballs_in_the_wrong_place_are_named(tmp_path):
    """Each case fails before any image is checked or anything is written."""
    root = _folder_root(tmp_path)
    cases = []
    loop = root / "train" / "cat" / "loop.jpg"
    loop.symlink_to(loop)
    cases.append((prepare_cli(root, tmp_path / "store", "folder"), str(loop)))
    loop.unlink()
    dangling = root / "train" / "cat" / "gone.jpg"
    dangling.symlink_to(tmp_path / "imgs" / "nowhere.jpg")
    cases.append((prepare_cli(root, tmp_path / "store", "folder"), str(dangling)))
    dangling.unlink()
    looped_root = tmp_path / "looped"
    looped_root.symlink_to(looped_root)
    cases.append((prepare_cli(looped_root, tmp_path / "store", "folder"), str(looped_root)))
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    cases.append((prepare_cli(root, a_file / "store", "folder"), f"inside {a_file}, which is not a directory"))
    tarball = tmp_path / "cifar-10-python.tar.gz"
    shutil.copy(CIFAR_TARBALL, tarball)
    cases.append((prepare_cli(tarball, tmp_path / "store", "cifar10", "--download"), f"--root {tarball} is a file"))
    for proc, needle in cases:
        assert_refused(proc, needle)
    assert a_file.read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cifar-10-python.tar.gz", "imgs", "looped", "notes.txt"]


# ---------------------------------------------------------------- weights files

class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_weights_convert_names_the_forbidden_global_and_never_suggests_running_it(tmp_path, capsys):
    import torch

    from job.weights import main

    marker, evil = tmp_path / "PWNED", tmp_path / "evil.pth"
    torch.save({"conv1.weight": torch.zeros(1), "x": _Exploit(marker)}, evil)
    line = refused_in_process(main, ["convert", str(evil), "--model", "test_resnet", "--out",
                                     str(tmp_path / "out.safetensors")], capsys, str(evil), "posix.system")
    assert "weights_only=False" not in line and "torch.load" not in line
    assert not marker.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.pth"]


def test_weights_convert_keeps_the_users_umask(tmp_path, capsys):
    import timm
    import torch

    from job.weights import main

    src = tmp_path / "test_resnet.pth"
    torch.save(timm.create_model("test_resnet", pretrained=False).state_dict(), src)
    previous = os.umask(0o022)
    try:
        assert main(["convert", str(src), "--model", "test_resnet", "--out", str(tmp_path / "w.safetensors")]) == 0
    finally:
        os.umask(previous)
    assert (tmp_path / "w.safetensors").stat().st_mode & 0o777 == 0o644


# ---------------------------------------------------------------- training, checkpoints, finished runs

@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One epoch of the small run: a checkpoint, best/ and config.yaml to damage (copies of)."""
    base = tmp_path_factory.mktemp("finished")
    run([PYTHON, "job/train.py", *train_args(base / "run", base / "prep", "train.epochs=1")])
    return base / "run", base / "prep"


def _copy(finished_run, tmp_path: Path) -> Path:
    shutil.copytree(finished_run[0], tmp_path / "run")
    return tmp_path / "run"


@pytest.mark.parametrize("damage, needles", [
    ("empty trainer state", ("trainer_state.json", "not the trainer state this job writes")),
    ("bad trainer state values", ("trainer_state.json", "not the trainer state this job writes")),
    ("truncated weights", ("cannot restore this checkpoint", "SafetensorError")),
])
def test_a_damaged_checkpoint_is_a_named_refusal(finished_run, tmp_path, capsys, damage, needles):
    from job.train import main

    out = _copy(finished_run, tmp_path)
    (checkpoint,) = RunDir(out).checkpoints.iterdir()
    if damage == "empty trainer state":
        (checkpoint / "trainer_state.json").write_text("{}")
    elif damage == "bad trainer state values":
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        state["state"] = {"epoch": "one"}
        (checkpoint / "trainer_state.json").write_text(json.dumps(state))
    else:
        weights = checkpoint / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
    before = snapshot(out)
    refused_in_process(main, train_args(out, finished_run[1], "train.epochs=2"), capsys, str(checkpoint), *needles)
    assert snapshot(out) == before


def test_an_architecture_that_cannot_take_the_image_size_is_refused(tmp_path, capsys):
    """A ViT's patch grid is fixed (timm asserts); the size check caught only RuntimeError."""
    from job.train import main

    argv = train_args(tmp_path / "out", tmp_path / "prep", "model.name=vit_tiny_patch16_224", "data.image_size=32")
    refused_in_process(main, argv, capsys, "data.image_size=32 is too small for vit_tiny_patch16_224",
                       "its pretrained size is 224")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage, needles", [
    ("model.json not JSON", ("best/model.json is not a model card of this job",)),
    ("classes edited", ("does not fit the model", "was model.json edited")),
    ("head edited to 10^8 units", ("does not fit the model", "was model.json edited")),  # refused unallocated
    ("truncated weights", ("best/model.safetensors is not a readable safetensors file",)),
    ("empty config.yaml", ("config.yaml", "must be a mapping")),
])
def test_evaluate_refuses_a_damaged_run(finished_run, tmp_path, capsys, damage, needles):
    from job.evaluate import main

    out = _copy(finished_run, tmp_path)
    run_dir = RunDir(out)
    card = run_dir.card_file
    if damage == "model.json not JSON":
        card.write_text("{not json")
    elif damage == "classes edited":
        card.write_text(json.dumps({**json.loads(card.read_text()), "classes": ["a", "b", "c"]}))
    elif damage.startswith("head edited"):
        card.write_text(json.dumps({**json.loads(card.read_text()), "head_hidden": [10**8]}))
    elif damage == "truncated weights":
        weights = run_dir.weights_file
        weights.write_bytes(weights.read_bytes()[:1000])
    else:
        run_dir.config_file.write_text("")
    before = snapshot(out)
    refused_in_process(main, ["--run", str(out)], capsys, str(out), *needles)
    assert snapshot(out) == before


def test_evaluate_and_predict_accept_the_run_they_refuse_once_damaged(finished_run, capsys):
    """The control: the checks above (card against the weights' header, sizes) pass a good run."""
    from job.evaluate import main as evaluate_main
    from job.predict import main as predict_main

    assert evaluate_main(["--run", str(finished_run[0]), "--batch-size", "16"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["samples"] == 50
    image = sorted((FOLDER_MINI / "test" / "cat").iterdir())[0]
    assert predict_main(["--run", str(finished_run[0]), "--top", "2", str(image)]) == 0
    assert len(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["top"]) == 2


@pytest.mark.parametrize("script, argv, needle", [
    ("evaluate", ["--batch-size", "0"], "argument --batch-size: 0 must be >= 1"),
    ("predict", ["--top", "-1", str(FOLDER_MINI / "test" / "cat" / "0003.jpg")], "argument --top: -1 must be >= 1"),
])
def test_counts_on_the_command_line_must_be_positive(finished_run, capsys, script, argv, needle):
    module = __import__(f"job.{script}", fromlist=["main"])
    with pytest.raises(SystemExit) as e:
        module.main(["--run", str(finished_run[0]), *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and needle in err and "Traceback" not in err


def test_a_non_finite_loss_stops_the_run_with_the_step(tmp_path):
    """optim.lr=1e30 is finite, so the config accepts it; the loss is NaN from the third update.
    Today's behaviour was to finish and test the last weights."""
    proc = run([PYTHON, "job/train.py", *train_args(tmp_path / "out", tmp_path / "prep", "optim.lr=1e30")],
               check=False)
    assert_refused(proc, "the training loss became NaN or infinite at step", "(epoch 1)", "Lower optim.lr")
    assert not RunDir(tmp_path / "out").best.exists() and not RunDir(tmp_path / "out").summary_file.exists()
