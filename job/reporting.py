"""What a person looks at after a run: PNG plots in the output directory (readable without W&B)
and the sample-prediction grid's data."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: pods and CI have no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from dali_pipelines.loader import image_loader  # noqa: E402
from dali_pipelines.sampling import Shard  # noqa: E402
from dali_pipelines.spec import LoaderSpec  # noqa: E402
from job.records import EpochRecord, shown_epoch  # noqa: E402
from job.run_dir import RunDir  # noqa: E402

CURVES_SIZE = (15, 4)  # inches at 100 dpi -> 1500 x 400 px
CONFUSION_SIZE = (8, 7)  # -> 800 x 700 px
DPI = 100


def plot_curves(history: list[EpochRecord], path: Path) -> None:
    """Loss, accuracy and learning rate per epoch."""
    fig, (loss_ax, acc_ax, lr_ax) = plt.subplots(1, 3, figsize=CURVES_SIZE, dpi=DPI)
    epochs = [shown_epoch(h.epoch) for h in history]
    loss_ax.plot(epochs, [h.train_loss for h in history], "o-", label="train (as optimized)")
    loss_ax.plot(epochs, [h.val_loss for h in history], "o-", label="val")
    acc_ax.plot(epochs, [h.train_accuracy for h in history], "o-", label="train")
    acc_ax.plot(epochs, [h.val_accuracy for h in history], "o-", label="val")
    lr_ax.plot(epochs, [h.lr for h in history], "o-")
    for ax, title in ((loss_ax, "loss"), (acc_ax, "accuracy"), (lr_ax, "learning rate (end of epoch)")):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    loss_ax.legend()
    acc_ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def plot_confusion_matrix(confusion: list[list[int]], classes: list[str], path: Path) -> None:
    counts = np.asarray(confusion)
    fig, ax = plt.subplots(figsize=CONFUSION_SIZE, dpi=DPI)
    ax.imshow(counts, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"test confusion matrix ({int(counts.sum())} images)")
    if len(classes) <= 20:
        for (t, p), n in np.ndenumerate(counts):
            ax.text(p, t, str(n), ha="center", va="center", fontsize=8,
                    color="white" if n > counts.max() / 2 else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def plot_samples(samples: list[dict], path: Path, columns: int = 8) -> None:
    """A grid of test images with predicted and true labels (wrong ones in red)."""
    rows = -(-len(samples) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(2 * columns, 2.3 * rows), dpi=DPI, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, s in zip(axes.flat, samples):
        ax.imshow(s["image"])
        ax.set_title(f"{s['pred']}\n(true: {s['true']})", fontsize=8,
                     color="black" if s["pred"] == s["true"] else "red")
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


@torch.inference_mode()  # no autograd graph (about 3 GB for IRv2 at 299 px) and no version counters
def sample_predictions(model, store, spec: LoaderSpec, device, count: int = 16) -> list[dict]:
    """The first ``count`` test images with the model's prediction (for the W&B / PNG grid)."""
    from PIL import Image

    split = store.split("test")
    k = min(count, len(split))
    images = None if split.images is None else split.images[:k]
    files = None if split.files is None else split.files[:k]
    loader = image_loader(spec, labels=split.labels[:k], images=images, files=files, train=False,
                          shard=Shard(batch_size=k))
    was_training = model.training
    model.eval()
    # float(): under mixed precision the loader emits bf16/fp16 images, the weights are float32
    preds = torch.cat([model(x.to(device).float()).argmax(1).cpu() for x, _ in loader]).tolist()
    model.train(was_training)
    pixels = (split.images[:k] if split.images is not None
              else [np.asarray(Image.open(f).convert("RGB")) for f in split.files[:k]])
    return [{"image": np.asarray(pixels[i]), "pred": store.classes[preds[i]], "true": store.classes[split.labels[i]]}
            for i in range(k)]


def compare_runs(runs: list[Path]) -> str:
    """A small table of finished runs' test accuracy (``python -m job.reporting compare A B``)."""
    rows = ["run                     backbone                         test accuracy",
            "----------------------  -------------------------------  -------------"]
    for run in runs:
        summary = RunDir(run).summary()
        model = RunDir(run).config().model
        backbone = f"{model.name} ({'ImageNet' if model.pretrained else 'random'})"
        rows.append(f"{str(run):22}  {backbone:31}  {summary.test_accuracy:.3f} on {summary.test_samples}")
    return "\n".join(rows)


if __name__ == "__main__":
    import sys

    if len(sys.argv) < 3 or sys.argv[1] != "compare":
        sys.exit("usage: python -m job.reporting compare RUN_DIR [RUN_DIR ...]")
    from job.config import ConfigError

    try:
        print(compare_runs([Path(p) for p in sys.argv[2:]]))
    except ConfigError as e:  # a run that has not finished, or a damaged metrics.json / config.yaml
        sys.exit(f"error: {e}")
