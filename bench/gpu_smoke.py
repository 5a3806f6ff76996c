"""The GPU smoke test: one prepared run for a GPU machine (one GPU, no internet, < 6 minutes).

    bench/gpu_smoke.sh               # on the GPU machine; output also in $OUT/gpu_smoke.log (or ./)
    bench/gpu_smoke.sh --dry-run     # the same steps on CPU with tiny sizes (what CI runs)

1. environment: driver, CUDA, native bf16, DALI; says loudly what is missing;
2. DALI GPU pipelines vs the CPU ones on the same real images: raw and encoded, train and eval,
   CHW and HWC, float32 / float16 / bfloat16, within stated tolerances;
3. DALI output lifetime: GPU batches read behind a queue of heavy kernels keep their pixels
   (each batch's checksum equals the CPU pipeline's);
4. job/train.py for a few steps with DALI if present, and with data.loader=torch in any case:
   mixed decode + two_stage + fp16 + clipping + accumulation; bf16 + channels_last + compile,
   then evaluate.py and predict.py; SIGTERM, then resume;
5. throughput at 299 px bf16: the model's training step alone over per-GPU batch sizes (MFU,
   peak memory, the fastest batch), and end to end (steady-state images/s) with each loader.
Runs from a plain checkout with a system Python (torch, timm, accelerate; DALI and wandb
optional). A compact table of the figures closes the output; then every step that could not
run (no GPU, no DALI) is named on the last line. The exit code is non-zero when a step that ran
failed.
"""
from __future__ import annotations

if not __package__:  # run as a script: the repository root on sys.path (works from a plain checkout)
    import _repo  # noqa: F401

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.harness import REPO, run_job

SAMPLES = REPO / "data" / "samples"
skipped: list[str] = []
failed: list[str] = []
startups = [0]  # Python processes started (each imports torch: seconds on any machine)
figures: list[tuple[str, str]] = []  # (what, value): the closing table


def say(line: str = "") -> None:
    print(line, flush=True)


def step(name: str):
    def wrap(fn):
        def run(*args, **kwargs):
            say(f"\n== {name}")
            start = time.perf_counter()
            try:
                fn(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - report and go on to the next step
                failed.append(name)
                say(f"FAILED: {name}: {type(e).__name__}: {e}")
            say(f"   ({time.perf_counter() - start:.1f}s)")
        return run
    return wrap


def have_dali() -> bool:
    try:
        import nvidia.dali  # noqa: F401
        return True
    except ImportError:
        return False


@step("environment")
def environment(gpu: bool) -> None:
    import torch

    smi = shutil.which("nvidia-smi")
    say(subprocess.run([smi, "-L"], capture_output=True, text=True).stdout.strip() if smi else "nvidia-smi: MISSING")
    say(f"torch {torch.__version__} (CUDA {torch.version.cuda}); cuda available: {torch.cuda.is_available()}")
    if torch.cuda.is_available():
        say(f"device {torch.cuda.get_device_name()} capability {torch.cuda.get_device_capability()}, "
            f"native bf16: {torch.cuda.is_bf16_supported(including_emulation=False)}")
    elif gpu:
        say("MISSING: CUDA is not usable; the CUDA 13 wheels need driver R580+")
        raise RuntimeError("no usable GPU")
    if have_dali():
        import nvidia.dali

        say(f"DALI {nvidia.dali.__version__}")
    else:
        say("MISSING: nvidia.dali (pip install nvidia-dali-cuda130): pipeline and training steps are skipped")


@step("DALI GPU pipelines vs CPU pipelines")
def parity(gpu: bool) -> None:
    import torch

    from dali_pipelines.loader import DaliLoader
    from dali_pipelines.sampling import Shard
    from dali_pipelines.spec import LoaderSpec, Preprocessing
    from job.config import DataConfig
    from job.data import prepare

    work = Path(tempfile.mkdtemp())
    raw, _ = prepare(DataConfig(source="cifar10", root=str(SAMPLES / "cifar10-mini.tar.gz")), work / "raw")
    encoded, _ = prepare(DataConfig(source="folder", root=str(SAMPLES / "cifar10-folder-mini")), work / "encoded")
    prep = Preprocessing(299 if gpu else 64, (0.5,) * 3, (0.5,) * 3)
    # raw: the same resize in two implementations, within rounding; encoded: nvJPEG vs libjpeg-turbo
    tolerance = {"raw": (0.02, 0.002), "encoded": (0.2, 0.01)}  # (max, mean) abs difference, normalized units
    say(f"{'source':8} {'loader':5} {'layout':6} {'dtype':9} {'max diff':>9} {'mean diff':>9}")
    for source, store in (("raw", raw), ("encoded", encoded)):
        data = store.split("test")
        for train in (False, True):
            for layout in ("CHW", "HWC"):
                for dtype in ("float32", "float16", "bfloat16"):
                    outputs = []
                    for device_id in (None, 0 if gpu else None):
                        spec = LoaderSpec(prep, num_threads=2, dtype=dtype, channels_last=layout == "HWC",
                                          device_id=device_id)
                        images = None if data.images is None else data.images[:64]
                        files = None if data.files is None else data.files[:64]
                        loader = DaliLoader(labels=data.labels[:64], images=images, files=files, spec=spec,
                                            train=train, shard=Shard(batch_size=32, seed=1))
                        outputs.append(torch.cat([x.float().cpu() for x, _ in loader]))
                    diff = (outputs[0] - outputs[1]).abs()
                    worst, mean = float(diff.max()), float(diff.mean())
                    limit = tolerance[source][0] + (0.02 if dtype != "float32" else 0.0)
                    ok = worst <= limit and mean <= tolerance[source][1] + (0.005 if dtype != "float32" else 0)
                    say(f"{source:8} {'train' if train else 'eval':5} {layout:6} {dtype:9} {worst:9.4f} {mean:9.5f}"
                        f"{'' if ok else '  OUT OF TOLERANCE'}")
                    if not ok:
                        raise AssertionError(f"{source} {layout} {dtype}: GPU and CPU pipelines differ")
    if not gpu:
        say("(dry run: CPU against CPU; the comparison code path ran)")


@step("DALI output lifetime under queued GPU work")
def lifetime() -> None:
    """Each batch's checksum is computed by a kernel queued behind heavy matmuls, long after the
    loop moved on: a buffer DALI reused too early would show another batch's pixels."""
    import torch

    from dali_pipelines.loader import DaliLoader
    from dali_pipelines.sampling import Shard
    from dali_pipelines.spec import LoaderSpec, Preprocessing
    from job.config import DataConfig
    from job.data import prepare

    store, _ = prepare(DataConfig(source="cifar10", root=str(SAMPLES / "cifar10-mini.tar.gz")),
                       Path(tempfile.mkdtemp()) / "raw")
    data = store.split("train")
    sums = {}
    for device_id in (None, 0):
        spec = LoaderSpec(Preprocessing(299, (0.5,) * 3, (0.5,) * 3), num_threads=4, device_id=device_id)
        loader = DaliLoader(labels=data.labels[:1024], images=data.images[:1024], spec=spec, train=True,
                            shard=Shard(batch_size=64, seed=2))
        heavy = torch.randn(4096, 4096, device="cuda")
        sums[device_id] = []
        for images, _ in loader:
            if device_id == 0:
                for _ in range(8):  # ~10 ms of queued work before the checksum reads the batch
                    heavy = (heavy @ heavy).tanh_()
            sums[device_id].append(images.double().sum().reshape(1))
        sums[device_id] = torch.cat(sums[device_id]).cpu()
    worst = float(((sums[0] - sums[None]).abs() / sums[None].abs().clamp(min=1)).max())
    say(f"{len(sums[0])} batches, worst relative checksum difference GPU vs CPU: {worst:.2e}")
    figures.append(("DALI lifetime: worst checksum diff", f"{worst:.1e}"))
    if worst > 1e-3:
        raise AssertionError("a GPU batch changed under queued work: DALI reused its buffer too early")


def train_args(out: Path, prep: Path, gpu: bool, *extra: str) -> list[str]:
    """A short from-scratch run on generated data; ``extra`` overrides pick the path under test."""
    size, train, test = ("128", "2000", "500") if gpu else ("32", "300", "100")
    return ["--config", "job/configs/demo.yaml", f"train.output_dir={out}", f"data.prepared_dir={prep}",
            "data.source=synthetic", "data.root=null", f"data.synthetic_train={train}",
            f"data.synthetic_test={test}", f"data.image_size={size}", "data.batch_size=32", "data.num_threads=4",
            f"model.name={'resnet18' if gpu else 'test_resnet'}", "model.pretrained=false", "model.weights=null",
            "model.head_hidden=[64]", "train.strategy=finetune", "train.channels_last=false", "train.epochs=2",
            "train.log_every=5",
            "train.signal_check_every=1", "optim.name=sgd", "optim.lr=0.05", "schedule.name=cosine",
            "tracking.wandb=disabled", *extra]


def job(args: list[str], timeout: int = 300) -> str:
    """The command's stdout; its exit code and last lines go to the log (a failure fails the step
    and the script goes on to the next one)."""
    startups[0] += 1
    done = run_job([sys.executable, *args], log=None, label=args[0], timeout=timeout, check=False)
    tail = "\n".join(done.output.strip().splitlines()[-4:])
    say(f"$ {' '.join(args[:1])} ... -> exit {done.returncode}\n{tail}")
    if done.returncode != 0:
        raise RuntimeError(f"{args[0]} exited {done.returncode}")
    return done.stdout


def loaders() -> list[str]:
    """The data loaders this machine can run: DALI where it imports, PyTorch's everywhere."""
    return ["dali", "torch"] if have_dali() else ["torch"]


@step("training paths")
def training(gpu: bool, work: Path, loader: str, full: bool = True) -> None:
    """``full``: every path; else (the second loader on a GPU) the channels_last bf16 run and
    evaluate.py: compiling the same model again, or predict.py again, would repeat the first
    loader's minutes without checking anything new about the loader."""
    both = ("data.loader=" + loader,)
    if gpu and full:  # the dry run leaves out what the CPU test suite already runs end to end
        job(["job/train.py", *train_args(work / f"mixed-{loader}", work / "prep", gpu, "data.source=folder",
                                         f"data.root={SAMPLES / 'cifar10-folder-mini'}", "data.val_fraction=0.5",
                                         "train.strategy=two_stage", "train.head_epochs=1",
                                         "train.mixed_precision=fp16", "train.grad_clip=1.0",
                                         "train.grad_accum_steps=2", *both)])
    elif full:
        skipped.append("mixed decode + two_stage + fp16 (dry run; tests/test_train_e2e.py runs its CPU parts)")
    compiled = work / f"compiled-{loader}"
    job(["job/train.py", *train_args(compiled, work / "prep", gpu, "train.channels_last=true",
                                     f"train.mixed_precision={'bf16' if gpu else 'no'}",
                                     f"train.compile={'true' if gpu and full else 'false'}", *both)], timeout=600)
    if not gpu:
        skipped.append("train.compile (dry run; tests/test_presets_e2e.py compiles on CPU)")
    result = json.loads(job(["job/evaluate.py", "--run", str(compiled)]).splitlines()[-1])
    say(f"evaluate.py: accuracy {result['accuracy']:.4f} on {result['samples']} images")
    if full:
        image = sorted((SAMPLES / "cifar10-folder-mini" / "test" / "ship").iterdir())[0]
        job(["job/predict.py", "--run", str(compiled), str(image)])
    if not gpu or not full:
        skipped.append("SIGTERM and resume (dry run; tests/test_train_e2e.py)" if not gpu else
                       f"SIGTERM and resume with {loader} (ran with {loaders()[0]})")
        return
    args = train_args(work / f"preempted-{loader}", work / "prep", gpu, "train.log_every=1", *both)
    startups[0] += 1
    proc = subprocess.Popen([sys.executable, "job/train.py", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in proc.stdout:
        if line.startswith("step 6:"):
            proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=300)
    say(f"SIGTERM at step 6 -> exit {code}")
    if code != 143:
        raise RuntimeError(f"expected exit 143 after SIGTERM, got {code}")
    out = job(["job/train.py", *args])
    if "resumed from" not in out:
        raise RuntimeError("the second run did not resume")


@step("model throughput at 299 px bf16 over per-GPU batch sizes")
def model_throughput(gpu: bool) -> None:
    model = "inception_resnet_v2" if gpu else "test_resnet"
    # 16 and 32 per GPU: finetune.yaml's batch on 16 and 8 GPUs (docs/SCALING.md, host time per step)
    size, batches, steps = ("299", ["16", "32", "64", "128", "256"], "20") if gpu else ("32", ["8", "16"], "3")
    out = job(["bench/model_throughput.py", "--model", model, "--size", size, "--batch-size", *batches,
               "--precision", "bf16" if gpu else "no", "--channels-last", "--steps", steps])
    for line in out.splitlines():
        if line.startswith("batch "):
            figures.append((f"{model} step alone, {line.split(':')[0]}", line.split(": ", 1)[1]))
        elif line.startswith("fastest batch"):
            figures.append(("fastest per-GPU batch", line.split("= ", 1)[1]))
        elif line.startswith("MFU denominators: "):  # MFU above is "of peak" (datasheet) and "of measured matmul"
            figures.append(("MFU denominators", line.split(": ", 1)[1]))


@step("end-to-end throughput")
def end_to_end(gpu: bool, work: Path, loader: str) -> None:
    if not gpu:
        skipped.append(f"end-to-end images/s with {loader} (needs a GPU)")
        return
    from job.run_dir import RunDir

    run_dir = work / f"e2e-{loader}"
    job(["job/train.py", *train_args(run_dir, work / "prep", gpu, "model.name=inception_resnet_v2",
                                     "data.image_size=299", "data.batch_size=64", "train.mixed_precision=bf16",
                                     "train.channels_last=true", "train.epochs=1", f"data.loader={loader}")],
        timeout=600)
    m = RunDir(run_dir).summary()
    figures.append((f"end to end with {loader}, batch 64",
                    f"{m.train_images_per_second_steady or m.train_images_per_second:.1f} images/s steady, "
                    f"data wait {m.data_wait_fraction:.1%}"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: check the script itself (CI)")
    args = parser.parse_args()
    import torch

    began = time.perf_counter()
    gpu = not args.dry_run
    if gpu and not torch.cuda.is_available():
        from job.distributed import DRIVER_HINT, visible_gpus

        if gpus := visible_gpus():
            # The machine has GPUs that CUDA cannot use: the failure this script exists to catch.
            say(f"MISSING: CUDA cannot use the GPU(s) this machine lists ({'; '.join(gpus)}): {DRIVER_HINT}")
            say("failed: environment (no usable GPU)")
            return 1
        say("no GPU on this machine: running the dry run instead (--dry-run)")
        gpu = False
    work = Path(tempfile.mkdtemp(prefix="gpu-smoke-"))
    environment(gpu)
    if have_dali():
        parity(gpu)
        if gpu:
            lifetime()
        else:
            skipped.append("DALI output lifetime (needs a GPU)")
    else:
        skipped.extend(["DALI GPU/CPU parity", "DALI output lifetime", "training with DALI (not installed)"])
    # The dry run checks the script on one loader (the suite runs it with and without DALI).
    for i, loader in enumerate(loaders() if gpu else loaders()[:1]):
        training(gpu, work, loader, full=i == 0)
    model_throughput(gpu)
    for loader in loaders():
        end_to_end(gpu, work, loader)
    if not gpu:
        skipped.append("every GPU measurement (no GPU: dry run on CPU)")
    figures.append(("Python start-ups, minutes in all", f"{startups[0] + 1}, {(time.perf_counter() - began) / 60:.1f}"))
    say("")
    say("== figures")
    for what, value in figures:
        say(f"{what:44} {value}")
    say(f"failed: {', '.join(failed) if failed else 'none'}")
    say(f"skipped: {'; '.join(dict.fromkeys(skipped)) if skipped else 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
