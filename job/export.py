"""Take a finished run's best model out of this project: one ONNX file, a timm folder or a
``torch.export`` program, each checked against the run's own PyTorch model before it appears.

    python -m job.export --run runs/demo --format onnx --out runs/demo/exports/model.onnx
    python -m job.export --run runs/finetune_lite0 --format timm --out exports/lite0-cifar10
    python -m job.export --run runs/demo --format torch [--out FILE] [--force] [--wandb]

``onnx`` and ``torch`` take raw images as the user has them, uint8 (N, H, W, 3) RGB at any size,
and return class probabilities (N, classes): the resize to the model's size (RESIZE_INTERPOLATION,
antialiased when shrinking, rounded to grey levels, as the job resizes decoded files) and the
normalization with the card's mean/std are inside the graph (ServingModel). ``timm`` is the
network alone (normalized input at the card's size, logits), loadable with
``timm.create_model("local-dir:PATH", pretrained=True)``; only a linear head fits timm's classifier.
Every refusal (a damaged run, no ``best/``, an existing ``--out`` without ``--force``, a format
the head cannot take, an export that disagrees with PyTorch) exits 2 and writes nothing: exports
are written under a temporary name, verified, then renamed. onnx/onnxruntime (the ``export``
extra) are imported only here, and only for ``--format onnx``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dali_pipelines.spec import RESIZE_INTERPOLATION
from job.atomic import ForeignDirectoryError, atomic_directory
from job.config import ConfigError
from job.card import ModelCard
from job.model import TransferModel, WeightsError
from job.run_dir import RunDir, load_trained

FORMATS = ("onnx", "timm", "torch")
DEFAULT_OUT = {"onnx": "exports/model.onnx", "timm": "exports/timm", "torch": "exports/model.pt2"}
# An fp32 export whose probabilities differ from PyTorch's by more than this on the check batches
# is refused (measured: 1e-8 to 8e-6 for the dynamo ONNX exporter, 0 for torch.export).
MAX_PROBABILITY_DIFFERENCE = 1e-4
_TIMM_INTERPOLATION = {"linear": "bilinear", "cubic": "bicubic"}
_EXTRA = "pip install 'cifar-transfer[export]' (or: pip install onnx onnxruntime onnxscript)"


class ExportError(RuntimeError):
    """This run cannot be exported as asked; the message says why and what to do instead."""


class ServingModel(nn.Module):
    """uint8 (N, H, W, 3) RGB images of any size -> class probabilities (N, classes): resize to
    the model's size as the job resizes a decoded file (linear, antialiased when shrinking, rounded
    to whole grey levels: DALI's uint8 resize), normalize with the card's mean/std, the trained
    network, softmax. Fed CIFAR's 32x32 arrays, it differs from training's float upscale (no
    rounding) by at most half a grey level per pixel."""

    def __init__(self, model: TransferModel, card: ModelCard):
        super().__init__()
        if RESIZE_INTERPOLATION != "linear":
            raise ExportError(f"the serving graph resizes linearly; the job resizes with {RESIZE_INTERPOLATION!r}")
        self.model = model
        self.image_size = card.image_size
        self.register_buffer("mean", torch.tensor(card.mean, dtype=torch.float32).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(card.std, dtype=torch.float32).view(1, 3, 1, 1) * 255)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).to(torch.float64)
        rows = resize_weights(x.shape[2], self.image_size)
        cols = resize_weights(x.shape[3], self.image_size)
        x = rows @ x @ cols.transpose(0, 1)  # (size, H) @ (N, 3, H, W) @ (W, size)
        x = x.round().clamp(0, 255).to(torch.float32)
        x = (x - self.mean) / self.std
        return self.model(x).softmax(dim=1)


def resize_weights(n_in, n_out: int) -> torch.Tensor:
    """(n_out, n_in) weights of a linear resize along one axis: half-pixel centres, a triangle
    filter as wide as the shrink when shrinking (antialiasing, as DALI's, PIL's and torch's
    ``antialias=True``), normalized over the pixels inside the image (the edges). As matrices in
    float64 rather than a Resize node: onnxruntime's float32 Resize differs from torch's by up to
    6e-3 grey levels, which the rounding to whole grey levels turns into one-level flips on up to
    2% of pixels (measured at 32 -> 48 px); in float64 both runtimes round alike."""
    taps = torch.arange(n_in, dtype=torch.float64)
    scale = torch.ones((), dtype=torch.float64) * n_in / n_out  # a tensor: n_in is symbolic under export
    centres = (torch.arange(n_out, dtype=torch.float64) + 0.5) * scale - 0.5  # in source pixels
    support = scale.clamp(min=1.0)
    weights = (1 - (taps.view(1, -1) - centres.view(-1, 1)).abs() / support).clamp(min=0)
    return weights / weights.sum(dim=1, keepdim=True)


@dataclass(frozen=True)
class Source:
    """The run an export comes from, with what its metadata says about it."""

    run: RunDir
    model: TransferModel
    card: ModelCard

    def provenance(self) -> dict:
        """Where the weights come from: every format carries it (timm's in config.json)."""
        card = self.card
        facts = {"model": card.model, "head_hidden": card.head_hidden, "weights": card.weights,
                 "source_run": str(self.run.path.resolve()), "source_best_epoch": card.epoch,
                 "source_test_accuracy": None, "job_version": job_version()}
        if self.run.summary_file.is_file():
            with contextlib.suppress(ConfigError):
                facts["source_test_accuracy"] = self.run.summary().test_accuracy
        return facts

    def metadata(self) -> dict[str, str]:
        """The serving graph's metadata, strings only (ONNX metadata_props, the .pt2's metadata.json):
        what goes in and out, the classes, the preprocessing inside, the provenance."""
        card = self.card
        meta = {"classes": card.classes, "image_size": card.image_size, "mean": card.mean, "std": card.std,
                "interpolation": f"{RESIZE_INTERPOLATION} (antialiased when shrinking)",
                "input": "uint8 (N, H, W, 3) RGB, any H and W", "output": "float32 (N, classes) probabilities",
                **self.provenance()}
        return {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}


def job_version() -> str:
    """The installed project's version and, in a git checkout, its commit."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        text = version("cifar-transfer")
    except PackageNotFoundError:
        text = "unknown"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{text}+g{commit}" if commit else text


def check_batches(image_size: int) -> list[torch.Tensor]:
    """Seeded uint8 batches the export is verified on: the model's size, CIFAR's 32x32, and a
    larger non-square size (the antialiased shrink); one has a single image (batch size 1)."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(3, image_size, image_size), (2, 32, 32), (1, image_size * 2 + 3, image_size + image_size // 2 + 1)]
    return [torch.randint(0, 256, (n, h, w, 3), dtype=torch.uint8, generator=gen) for n, h, w in shapes]


def _max_difference(pairs) -> float:
    return max(float((torch.as_tensor(a) - torch.as_tensor(b)).abs().max()) for a, b in pairs)


def _refuse_if_different(what: str, difference: float) -> None:
    if not difference <= MAX_PROBABILITY_DIFFERENCE:  # NaN too
        raise ExportError(f"{what} differs from the run's PyTorch model by {difference:.3g} in probability "
                          f"(more than {MAX_PROBABILITY_DIFFERENCE:g} for float32): not written")


def _dynamic_shapes():
    batch = torch.export.Dim("batch", min=1)
    height, width = torch.export.Dim("height", min=2), torch.export.Dim("width", min=2)
    return {"images": {0: batch, 1: height, 2: width}}


# ------------------------------------------------------------------------------ onnx
def export_onnx(serving: ServingModel, source: Source, tmp: Path, say) -> dict:
    """The ONNX file at ``tmp``: the dynamo exporter, else the TorchScript one; metadata,
    onnx.checker, then onnxruntime against PyTorch on the check batches."""
    try:
        import onnx
        import onnxruntime
    except ImportError as e:
        raise ExportError(f"--format onnx needs onnx and onnxruntime ({e}): {_EXTRA}") from None
    example = (check_batches(source.card.image_size)[0],)
    errors = []
    exporter = None
    for dynamo in (True, False):
        try:
            with contextlib.redirect_stdout(sys.stderr):  # the exporter's progress lines: stdout stays ours
                if dynamo:
                    torch.onnx.export(serving, example, str(tmp), dynamo=True, external_data=False,
                                      input_names=["images"], output_names=["probabilities"],
                                      dynamic_shapes=_dynamic_shapes())
                else:
                    torch.onnx.export(serving, example, str(tmp), dynamo=False, opset_version=18,
                                      input_names=["images"], output_names=["probabilities"],
                                      dynamic_axes={"images": {0: "batch", 1: "height", 2: "width"},
                                                    "probabilities": {0: "batch"}})
            exporter = "dynamo" if dynamo else "torchscript"
            break
        except Exception as e:  # noqa: BLE001 - the exporters raise many types
            errors.append(f"{'dynamo' if dynamo else 'torchscript'} exporter: {type(e).__name__}: {str(e)[:300]}")
            tmp.unlink(missing_ok=True)
            if dynamo:
                say(f"the dynamo ONNX exporter failed ({errors[-1]}); trying the TorchScript exporter")
    if exporter is None:
        raise ExportError(f"{source.card.model} could not be exported to ONNX: {'; '.join(errors)}; "
                          "try --format torch")
    proto = onnx.load(str(tmp))
    meta = {**source.metadata(), "exporter": exporter}
    del proto.metadata_props[:]
    for key, value in meta.items():
        proto.metadata_props.add(key=key, value=value)
    proto.doc_string = (f"{source.card.model} fine-tuned by cifar-transfer: uint8 (N, H, W, 3) RGB images of any "
                        f"size -> probabilities over {len(source.card.classes)} classes (resize and normalization "
                        "inside)")
    onnx.save(proto, str(tmp))
    onnx.checker.check_model(str(tmp), full_check=True)
    session = onnxruntime.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
    pairs = []
    with torch.no_grad():
        for batch in check_batches(source.card.image_size):
            pairs.append((session.run(None, {"images": batch.numpy()})[0], serving(batch)))
    difference = _max_difference(pairs)
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    say(f"onnx: {exporter} exporter, opset {opset}; onnxruntime vs PyTorch on {_describe(pairs)}: "
        f"max probability difference {difference:.2g}")
    _refuse_if_different("the ONNX model under onnxruntime", difference)
    return {"exporter": exporter, "opset": opset, "max_probability_difference": difference}


def load_onnx(path: str | Path):
    """An exported ONNX file for predict.py: (onnxruntime session, class names); ExportError if
    it is not a file this module wrote."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: no such file")
    try:
        import onnxruntime
    except ImportError as e:
        raise ExportError(f"--onnx needs onnxruntime ({e}): {_EXTRA}") from None
    try:
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        classes = json.loads(session.get_modelmeta().custom_metadata_map["classes"])
    except KeyError:
        raise ExportError(f"{path} has no class names in its metadata: not an export of `python -m job.export`; "
                          "export the run again") from None
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types for unreadable files
        raise ExportError(f"{path} is not a readable ONNX model ({type(e).__name__}: {str(e)[:200]}); "
                          "export the run again") from None
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise ExportError(f"{path}: its 'classes' metadata is not a list of names; export the run again")
    return session, classes


# ------------------------------------------------------------------------------ torch
def export_torch(serving: ServingModel, source: Source, tmp: Path, say) -> dict:
    """``torch.export`` of the whole serving graph as a .pt2 (torch.export.load runs it without
    this project); the metadata in the archive's extra file ``metadata.json``."""
    batches = check_batches(source.card.image_size)
    try:
        with torch.no_grad():
            program = torch.export.export(serving, (batches[0],), dynamic_shapes=_dynamic_shapes())
    except Exception as e:  # noqa: BLE001 - torch.export raises many types
        raise ExportError(f"torch.export could not trace {source.card.model}: {type(e).__name__}: "
                          f"{str(e)[:300]}; try --format onnx") from None
    torch.export.save(program, str(tmp), extra_files={"metadata.json": json.dumps(source.metadata())})
    loaded = torch.export.load(str(tmp)).module()
    with torch.no_grad():
        pairs = [(loaded(batch), serving(batch)) for batch in batches]
    difference = _max_difference(pairs)
    say(f"torch: torch.export.load vs PyTorch on {_describe(pairs)}: max probability difference {difference:.2g}")
    _refuse_if_different("the torch.export program", difference)
    return {"max_probability_difference": difference}


# ------------------------------------------------------------------------------ timm
def timm_model(source: Source) -> nn.Module:
    """The run's network as timm's own model with ``num_classes`` classes: the backbone's
    weights and the linear head as timm's classifier. Refused when the head is more than the
    linear layer timm has, or when timm's head does not compute what ours does (pooling)."""
    import timm

    card, model = source.card, source.model
    if card.head_hidden:
        raise ExportError(f"{source.run.card_file}: the head has hidden layers {card.head_hidden} (dense -> batch "
                          f"norm -> {card.head_activation} -> dropout blocks), which timm's classifier (one linear "
                          "layer) cannot express; use --format onnx or --format torch")
    net = timm.create_model(card.model, pretrained=False, num_classes=card.num_classes)
    classifier = net.get_classifier()
    prefix = next((name for name, module in net.named_modules() if module is classifier), None)
    ours = model.head[-1]
    if not isinstance(classifier, nn.Linear) or classifier.weight.shape != ours.weight.shape or prefix is None:
        raise ExportError(f"timm's {card.model} has a classifier of another kind ({type(classifier).__name__}) "
                          "than the run's linear head; use --format onnx or --format torch")
    state = {**model.backbone.state_dict(), f"{prefix}.weight": ours.weight, f"{prefix}.bias": ours.bias}
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ExportError(f"timm's {card.model} with {card.num_classes} classes has other tensors than the run's "
                          f"model (missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}); "
                          "use --format onnx or --format torch")
    net.eval()
    x = _normalized_batch(card)
    with torch.no_grad():
        difference = _max_difference([(net(x).softmax(dim=1), model(x).softmax(dim=1))])
    if not difference <= MAX_PROBABILITY_DIFFERENCE:
        raise ExportError(f"timm's own head of {card.model} (its pooling and classifier) does not compute the run's "
                          f"head (global average pooling, one linear layer): probabilities differ by "
                          f"{difference:.3g}; use --format onnx or --format torch")
    return net


def _normalized_batch(card: ModelCard) -> torch.Tensor:
    return torch.randn(4, 3, card.image_size, card.image_size, generator=torch.Generator().manual_seed(0))


def export_timm(source: Source, tmp: Path, say) -> dict:
    """timm's ``save_for_hf`` layout in ``tmp``: config.json (architecture, num_classes,
    label_names, pretrained_cfg with the run's input size, mean, std, interpolation) and
    model.safetensors; loaded back through ``local-dir:`` and compared with the run's model."""
    import timm
    from timm.models import save_for_hf

    card = source.card
    net = timm_model(source)
    data_config = {"input_size": (3, card.image_size, card.image_size), "mean": tuple(card.mean),
                   "std": tuple(card.std), "interpolation": _TIMM_INTERPOLATION[RESIZE_INTERPOLATION], "crop_pct": 1.0,
                   "crop_mode": "center"}
    save_for_hf(net, str(tmp), model_config={"label_names": list(card.classes), "cifar_transfer": source.provenance()},
                safe_serialization=True, data_config=data_config)
    loaded = timm.create_model(f"local-dir:{tmp}", pretrained=True).eval()
    x = _normalized_batch(card)
    with torch.no_grad():
        difference = _max_difference([(loaded(x).softmax(dim=1), source.model(x).softmax(dim=1))])
    cfg = loaded.pretrained_cfg
    say(f"timm: timm.create_model('local-dir:...') vs PyTorch on {x.shape[0]} normalized {card.image_size}x"
        f"{card.image_size} images: max probability difference {difference:.2g}; input_size {cfg['input_size']}, "
        f"interpolation {cfg['interpolation']}")
    _refuse_if_different("the timm model loaded back", difference)
    return {"max_probability_difference": difference}


def _describe(pairs) -> str:
    shapes = [tuple(torch.as_tensor(b).shape) for b in (p[1] for p in pairs)]
    images = sum(s[0] for s in shapes)
    return f"{images} images in {len(pairs)} batches"


# ------------------------------------------------------------------------------ writing
def _is_our_timm_export(path: Path) -> bool:
    try:
        return "cifar_transfer" in json.loads((path / "config.json").read_text())
    except (OSError, ValueError, TypeError):
        return False


def check_out(out: Path, fmt: str, force: bool) -> None:
    """Refuse before any work: an existing --out without --force, or one that is not replaceable."""
    if out.is_symlink() or out.exists():
        occupied = not out.is_dir() or any(out.iterdir())
        if occupied and not force:
            raise ExportError(f"--out {out} exists: pass --force to replace it, or choose another --out")
        if fmt == "timm" and out.exists() and (not out.is_dir() or occupied and not _is_our_timm_export(out)):
            raise ExportError(f"--out {out} exists and is not a timm export of this job: it is never replaced; "
                              "choose another --out")
        if fmt != "timm" and out.is_dir():
            raise ExportError(f"--out {out} is a directory; --format {fmt} writes one file: choose a file name")
    if fmt == "torch" and out.suffix != ".pt2":
        raise ExportError(f"--out {out}: --format torch writes a .pt2 archive, and torch.export.load reads only "
                          "names ending in .pt2; choose one")


def write_file(out: Path, fill) -> dict:
    """``fill(tmp)`` writes and verifies the export at a sibling temporary name, then it replaces
    ``out``; on any error the temporary is removed and ``out`` is untouched."""
    created = [p for p in (out.parent, *out.parent.parents) if not p.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    # the real suffix last: torch.export.save wants a name ending in .pt2
    tmp = out.parent / f".tmp-{socket.gethostname()}-{os.getpid()}-{out.name}"
    try:
        result = fill(tmp)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        for folder in created:  # the folders made for it, innermost first, when still empty
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    return result


def write_directory(out: Path, fill) -> dict:
    created = [p for p in (out.parent, *out.parent.parents) if not p.exists()]
    result = {}
    try:
        with atomic_directory(out, is_ours=_is_our_timm_export) as tmp:
            result = fill(tmp)
            for path in tmp.iterdir():  # safetensors writes 0600: an export is meant to be shared
                path.chmod(0o644)
    except BaseException:
        for folder in created:
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    return result


def export(run_path: str | Path, fmt: str, out: Path, *, force: bool = False, say=print) -> dict:
    """Export ``run_path``'s best model as ``fmt`` to ``out``; the JSON-able result."""
    out = Path(out)
    check_out(out, fmt, force)
    run = RunDir(run_path)
    if not run.path.is_dir():
        raise ExportError(f"--run {run.path}: no such directory (the train.output_dir of a finished run)")
    model, card = load_trained(run)
    source = Source(run, model, card)
    if fmt == "timm":
        timm_model(source)  # the head's refusal before anything is written
        result = write_directory(out, lambda tmp: export_timm(source, tmp, say))
    else:
        serving = ServingModel(model, card).eval()
        exporter = export_onnx if fmt == "onnx" else export_torch
        result = write_file(out, lambda tmp: exporter(serving, source, tmp, say))
    size = sum(p.stat().st_size for p in out.rglob("*")) if out.is_dir() else out.stat().st_size
    return {"run": str(run.path), "format": fmt, "out": str(out), "bytes": size, "weights": card.weights, **result}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True, help="output_dir of a finished training run")
    parser.add_argument("--format", choices=FORMATS, default="onnx")
    parser.add_argument("--out", help="where to write (default: RUN/" + ", RUN/".join(DEFAULT_OUT.values()) + ")")
    parser.add_argument("--force", action="store_true", help="replace an existing --out")
    parser.add_argument("--wandb", action="store_true",
                        help="also log the export to the run's W&B run, beside its model artifact")
    args = parser.parse_args(argv)
    out = Path(args.out) if args.out else Path(args.run) / DEFAULT_OUT[args.format]
    say = lambda line: print(line, file=sys.stderr)  # noqa: E731 - stdout carries the one JSON result
    refusals: tuple[type[Exception], ...] = (ExportError, ConfigError, WeightsError, ForeignDirectoryError)
    try:
        target = None
        if args.wandb:
            from job.tracking import TrackingError, export_target, log_export

            refusals += (TrackingError,)
            target = export_target(RunDir(args.run))  # refused before anything is written
        result = export(args.run, args.format, out, force=args.force, say=say)
        if target is not None:
            result["wandb_artifact"] = log_export(target, out, args.format, result, say=say)
    except refusals as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
