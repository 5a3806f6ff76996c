"""PNG plots in the output directory, so a run can be read at a glance without W&B."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: pods and CI have no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

CURVES_SIZE = (15, 4)  # inches at 100 dpi -> 1500 x 400 px
CONFUSION_SIZE = (8, 7)  # -> 800 x 700 px
DPI = 100


def plot_curves(history: list[dict], path: Path) -> None:
    """Loss, accuracy and learning rate per epoch."""
    fig, (loss_ax, acc_ax, lr_ax) = plt.subplots(1, 3, figsize=CURVES_SIZE, dpi=DPI)
    epochs = [h["epoch"] + 1 for h in history]
    loss_ax.plot(epochs, [h["train_loss"] for h in history], "o-", label="train (label-smoothed)")
    loss_ax.plot(epochs, [h["val_loss"] for h in history], "o-", label="val")
    acc_ax.plot(epochs, [h["train_accuracy"] for h in history], "o-", label="train (augmented)")
    acc_ax.plot(epochs, [h["val_accuracy"] for h in history], "o-", label="val")
    lr_ax.plot(epochs, [h["lr"] for h in history], "o-")
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
