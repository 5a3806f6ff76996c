"""train.mixed_precision on a CPU (job/distributed.py resolve_precision): bf16 only where the CPU
computes it natively (AVX512-BF16 / AMX-BF16), fp16 never (Accelerate autocasts fp16 on GPUs
only); a refusal is exit 2 before any data or model is touched, in training, evaluate.py and
predict.py alike. The capability probe is patched: the refusal is tested on any machine."""
from __future__ import annotations

import platform

import pytest
import torch

from helpers.runs import FOLDER_MINI, small_run
from job import distributed
from job.config import Config, ConfigError
from job.distributed import cpu_bf16_features, resolve_precision


def emulated_bf16(monkeypatch) -> None:
    """This CPU, as if it had neither AVX512-BF16 nor AMX-BF16."""
    monkeypatch.setattr(distributed, "cpu_bf16_features", lambda: ())


def test_bf16_on_a_cpu_without_native_bf16_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    from job.train import main

    emulated_bf16(monkeypatch)
    code = main(small_run(tmp_path / "out", tmp_path / "prep", "train.device=cpu", "train.mixed_precision=bf16"))
    err = capsys.readouterr().err
    assert code == 2, err
    for needle in ("error: train.mixed_precision=bf16 on CPU", "has no native bf16",
                   "lacks AVX512-BF16 and AMX-BF16", "set train.mixed_precision=no"):
        assert needle in err, (needle, err)
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # no store prepared, no output directory


def test_precision_on_cpu_native_bf16_accepted_fp16_refused_auto_fp32(monkeypatch):
    monkeypatch.setattr(distributed, "cpu_bf16_features", lambda: ("avx512_bf16",))
    assert resolve_precision("bf16", "cpu") == "bf16"
    assert resolve_precision("auto", "cpu") == "no"  # native or not: bf16 did not measure faster on CPU
    assert resolve_precision("no", "cpu") == "no"
    with pytest.raises(ConfigError, match=r"train.mixed_precision=fp16 on CPU: Accelerate autocasts and "
                                          r"loss-scales fp16 on GPUs only.*set train.mixed_precision=no"):
        resolve_precision("fp16", "cpu")
    emulated_bf16(monkeypatch)
    assert resolve_precision("auto", "cpu") == "no" and resolve_precision("no", "cpu") == "no"
    with pytest.raises(ConfigError, match="lacks AVX512-BF16 and AMX-BF16"):
        resolve_precision("bf16", "cpu")
    # GPUs are not the CPU probe's business
    assert resolve_precision("bf16", "cuda") == "bf16" and resolve_precision("fp16", "cuda") == "fp16"


def test_the_probe_reads_torch_or_else_the_kernels_flags(monkeypatch):
    flags = set()
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith(("flags", "Features")):
                flags.update(line.partition(":")[2].split())
    found = cpu_bf16_features()
    assert set(found) <= set(distributed.CPU_BF16_FEATURES)
    if platform.machine() in ("x86_64", "AMD64"):  # the kernel's flags are the independent witness
        assert bool(found) == bool({"avx512_bf16", "amx_bf16"} & flags), (found, sorted(flags))
    # A torch without get_capabilities (before 2.14): /proc/cpuinfo's spelling, x86 and ARM
    monkeypatch.delattr(torch.cpu, "get_capabilities")
    for cpuinfo, expected in [("flags\t\t: fpu avx2 avx512f avx512_vnni\n", ()),
                              ("flags\t\t: fpu avx512f avx512_bf16 amx_bf16 amx_tile\n", ("avx512_bf16", "amx_bf16")),
                              ("Features\t: fp asimd sve svebf16 bf16\n", ("bf16", "sve_bf16")),
                              ("", ())]:
        monkeypatch.setattr(distributed, "_cpuinfo", lambda text=cpuinfo: text)
        assert sorted(cpu_bf16_features()) == sorted(expected), cpuinfo


def test_evaluate_and_predict_refuse_a_bf16_run_on_such_a_cpu(tmp_path, capsys, monkeypatch):
    """They use the run's own precision (its config.yaml): refused before the model is read, so
    a folder holding only that file is enough."""
    from job.evaluate import main as evaluate_main
    from job.predict import main as predict_main

    emulated_bf16(monkeypatch)
    monkeypatch.setattr(distributed, "resolve_device", lambda choice: "cpu")  # also on a GPU machine
    run = tmp_path / "run"
    run.mkdir()
    cfg = Config()
    cfg.train.mixed_precision = "bf16"
    cfg.save(run / "config.yaml")
    assert evaluate_main(["--run", str(run)]) == 2
    err = capsys.readouterr().err
    assert "error: train.mixed_precision=bf16 on CPU" in err and "in its config.yaml" in err, err
    image = sorted((FOLDER_MINI / "test" / "cat").iterdir())[0]
    assert predict_main(["--run", str(run), "--device", "cpu", str(image)]) == 2
    err = capsys.readouterr().err
    assert f"error: {run / 'config.yaml'}: train.mixed_precision=bf16 on CPU" in err, err
    assert f"mixed_precision: no under train: in {run / 'config.yaml'}" in err
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml"]
