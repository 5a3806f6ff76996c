"""The shipped presets' settings on 2 real processes, to the end (the end is where channels_last
used to crash), and a mid-epoch checkpoint resumed on another world size."""
from __future__ import annotations

import json

import pytest

from helpers.runs import FOLDER_MINI, PYTHON, accelerate_launch, run, small_run, train_until_sigterm
from job.run_dir import RunDir

pytestmark = pytest.mark.slow


def test_presets_settings_on_two_processes_run_to_the_end(tmp_path):
    """finetune.yaml / demo.yaml settings: channels_last, a batch-norm head, accumulation, and
    torch.compile (the inductor runs on CPU). 450 training images over 2 ranks x 32 leave a tail
    of 2: one sample per rank, which a training-mode batch norm refuses, so it is folded into
    the previous batch (33 + 33); the compiled graph is dynamic in the batch, so the larger
    last batch does not recompile."""
    out = tmp_path / "presets"
    args = small_run(out, tmp_path / "prep", "train.channels_last=true", "model.head_hidden=[32,16]",
                     "train.grad_accum_steps=2", "train.compile=true", "train.epochs=1", "data.synthetic_train=500",
                     # and the GPU recipe's switches (finetune.yaml) on 2 processes, under compile
                     "ema.epochs=0.5", "mix.mixup_alpha=0.2", "optim.layer_decay=0.9",
                     "data.auto_augment=rand_augment", "tta.test=flip")
    proc = run(accelerate_launch(2, "job/train.py", *args), env={"TORCH_LOGS": "recompiles"}, timeout=900)
    output = proc.stdout + proc.stderr
    m = RunDir(out).summary()
    assert m.replicas_identical is True and "replicas identical" in output
    assert m.world_size == 2 and m.test_samples == 200
    assert RunDir(out).epochs()[0].train_samples == 450
    assert m.global_steps == 4  # 7 micro-batches per rank (6 of 32, then 33), 2 per update
    assert RunDir(out).epochs()[0].val_accuracy_ema is not None and m.test_accuracy_tta is not None
    assert "acc (dominant label)" in output
    assert "Recompiling function" not in output, output[-4000:]
    from safetensors.torch import load_file

    keys = load_file(str(RunDir(out).weights_file)).keys()
    assert keys and not any("_orig_mod" in k or k.startswith("module.") for k in keys)
    result = json.loads(run([PYTHON, "job/evaluate.py", "--run", str(out)]).stdout.splitlines()[-1])
    assert result["samples"] == 200 and result["accuracy"] == m.test_accuracy
    image = sorted((FOLDER_MINI / "test" / "ship").iterdir())[0]
    top = json.loads(run([PYTHON, "job/predict.py", "--run", str(out), str(image)]).stdout.splitlines()[-1])
    assert len(top["top"]) == 5


@pytest.mark.parametrize("before,after", [(2, 1), (1, 2)])
def test_a_mid_epoch_checkpoint_resumes_on_another_world_size(tmp_path, before, after):
    """A spot cluster may come back with fewer or more GPUs: the checkpoint records its position
    in samples, so the interrupted epoch continues at the first unseen sample and counts every
    training sample exactly once (sampling.EpochPlan; the property test covers every size)."""
    out = tmp_path / "run"
    # with the recipe's stateful switches (EMA, seeded Mixup/CutMix) and auto-augmentation on
    args = small_run(out, tmp_path / "prep", "train.epochs=2", "data.batch_size=16", "ema.epochs=0.5",
                     "mix.mixup_alpha=0.2", "mix.cutmix_alpha=1.0", "data.auto_augment=trivial_augment")
    # 540 training images; step 5 is mid epoch 1 on either world size
    code, _ = train_until_sigterm(accelerate_launch(before, "job/train.py", *args), at_line="step 5:")
    assert code == 143 or code != 0
    assert not RunDir(out).summary_file.exists()
    resumed = run(accelerate_launch(after, "job/train.py", *args)).stdout
    position = int(resumed.split("resumed from ")[1].split("sample ")[1].split(")")[0])
    assert position > 0 and position % (16 * before) == 0, resumed  # whole global batches of the first run
    history = RunDir(out).epochs()
    assert [h.epoch for h in history] == [0, 1]
    assert all(h.train_samples == 540 for h in history), history  # exact across the change
    assert RunDir(out).summary().world_size == after and RunDir(out).summary().test_samples == 200
