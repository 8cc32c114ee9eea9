"""Compact checkpoints: packing, round trips (timm, plain PyTorch), sizes, corrupted files, Hub-id loading."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from tests.conftest import make_batches, make_tiny_cnn, randomize_batchnorms
from hf_adaquant import AdaQuantConfig, load_quantized, quantize, save_quantized
from hf_adaquant.nn import QModuleMixin
from hf_adaquant.serialization import WEIGHTS_NAME, CheckpointError, pack_codes, packed_nbytes, unpack_codes
from hf_adaquant.serialization import save as checkpoint_save
from hf_adaquant.utils.files import TEMP_MARKER

LIGHT = dict(pipeline="light", progress=False, seed=0)


def _max_diff(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((a(x) - b(x)).abs().max())


def _codes(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: m.weight_quantizer.int_codes(m.weight) for n, m in model.named_modules() if isinstance(m, QModuleMixin)}


# ------------------------------------------------------------------------------------------------------- packing
@pytest.mark.parametrize("bits,expected_bytes", [(2, 251), (3, 501), (4, 501), (5, 1001), (8, 1001)])
def test_pack_unpack_exact_and_byte_counts(bits: int, expected_bytes: int) -> None:
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (1001,), generator=g)
    codes[:2] = torch.tensor([0, 2**bits - 1])  # both ends of the grid
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == expected_bytes == packed_nbytes(1001, bits)
    assert torch.equal(unpack_codes(packed, bits, 1001), codes)


def test_pack_rejects_codes_off_the_grid() -> None:
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        pack_codes(torch.tensor([0, 16]), 4)
    with pytest.raises(ValueError, match="need 2 bytes"):
        unpack_codes(torch.zeros(3, dtype=torch.uint8), 4, 4)


# ------------------------------------------------------------------------------------------------ plain modules
def test_plain_module_round_trip_needs_and_uses_skeleton(tmp_path: Path) -> None:
    batches = make_batches(2, 8)
    model = make_tiny_cnn(0, batches)
    qmodel = quantize(model, batches, AdaQuantConfig(weight_bits=4, activation_bits=4, iterations=5, batch_size=8,
                                                     bias_tuning_steps=2, progress=False, seed=0))
    save_quantized(qmodel, tmp_path / "ck")
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["adaquant_model.safetensors", "config.json"]
    layout = json.loads((tmp_path / "ck" / "config.json").read_text())["quantization_config"]["checkpoint_layout"]
    assert layout["folded_batchnorms"] == {"bn1": "conv1", "bn2": "conv2", "bn3": "dw", "bn4": "pw"}
    assert layout["layers"]["conv1"]["output_activation"] == "relu"
    assert layout["layers"]["dw"]["output_activation"] == "relu6"
    with pytest.raises(CheckpointError, match="pass a float skeleton"):
        load_quantized(tmp_path / "ck")
    skeleton = make_tiny_cnn(5)  # other weights: everything must come from the checkpoint
    loaded = load_quantized(tmp_path / "ck", model=skeleton)
    assert isinstance(skeleton.bn1, nn.BatchNorm2d)  # the caller's skeleton is not modified
    assert _max_diff(loaded, qmodel, batches[0]) <= 1e-6
    original, reloaded = _codes(qmodel), _codes(loaded)
    assert original.keys() == reloaded.keys()
    for name in original:
        assert torch.equal(original[name], reloaded[name]), name
    # a reloaded model saves again to the same tensors
    save_quantized(loaded, tmp_path / "again")
    first, second = load_file(str(tmp_path / "ck" / WEIGHTS_NAME)), load_file(str(tmp_path / "again" / WEIGHTS_NAME))
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_wrong_skeleton_is_a_clear_error(tmp_path: Path) -> None:
    batches = make_batches(1, 8)
    qmodel = quantize(make_tiny_cnn(0, batches), batches, AdaQuantConfig(**LIGHT))
    save_quantized(qmodel, tmp_path / "ck")
    with pytest.raises(CheckpointError, match="not in the model"):
        load_quantized(tmp_path / "ck", model=nn.Sequential(nn.Linear(3, 3)))


class MLP(nn.Module):
    def __init__(self, width: int = 256, depth: int = 4) -> None:
        super().__init__()
        self.layers = nn.Sequential(*[m for _ in range(depth) for m in (nn.Linear(width, width), nn.ReLU())])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


@pytest.mark.parametrize("weight_bits,max_ratio", [(4, 0.16), (2, 0.10), (8, 0.27)])
def test_checkpoint_size_against_fp32_safetensors(tmp_path: Path, weight_bits: int, max_ratio: float) -> None:
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = MLP().eval()
    batches = [torch.randn(16, 256) for _ in range(2)]
    qmodel = quantize(model, batches, AdaQuantConfig(weight_bits=weight_bits, first_last_bits=None, **LIGHT))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "fp32.safetensors"))
    save_quantized(qmodel, tmp_path / "q")
    fp32 = (tmp_path / "fp32.safetensors").stat().st_size
    ratio = (tmp_path / "q" / WEIGHTS_NAME).stat().st_size / fp32
    assert ratio <= max_ratio, f"W{weight_bits} checkpoint is {ratio:.3f}x the FP32 file"
    assert ratio >= weight_bits / 32  # the codes themselves cannot be smaller than that
    assert _max_diff(load_quantized(tmp_path / "q", model=MLP()), qmodel, batches[0]) <= 1e-6


def test_mixed_bit_widths_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = MLP(width=33, depth=4).eval()  # odd sizes: padding in the packed bytes
    batches = [torch.randn(16, 33) for _ in range(2)]
    bits = {"layers.0": (2, 8), "layers.2": (3, 4), "layers.4": (5, None), "layers.6": (8, 6)}
    qmodel = quantize(model, batches, AdaQuantConfig(layer_bits=bits, weight_symmetric=True, **LIGHT))
    save_quantized(qmodel, tmp_path / "q")
    loaded = load_quantized(tmp_path / "q", model=MLP(width=33, depth=4))
    assert {n: (m.weight_bits, m.activation_bits) for n, m in loaded.named_modules()
            if isinstance(m, QModuleMixin)} == bits
    assert any(m.weight_quantizer.signed for m in loaded.modules() if isinstance(m, QModuleMixin))
    assert _max_diff(loaded, qmodel, batches[1]) <= 1e-6


# ---------------------------------------------------------------------------------------------------------- timm
@pytest.fixture(scope="module")
def timm_quantized(tmp_path_factory: pytest.TempPathFactory):
    import timm

    torch.manual_seed(0)
    model = randomize_batchnorms(timm.create_model("test_resnet", pretrained=False), seed=3)
    batches = [torch.randn(4, 3, 64, 64) for _ in range(2)]
    qmodel = quantize(model, batches, AdaQuantConfig(weight_bits=4, activation_bits=8, **LIGHT))
    directory = tmp_path_factory.mktemp("timm") / "test_resnet-w4a8"
    save_quantized(qmodel, directory)
    return qmodel, batches, directory


def test_timm_round_trip_with_timm_config(timm_quantized) -> None:
    qmodel, batches, directory = timm_quantized
    config = json.loads((directory / "config.json").read_text())
    assert config["architecture"] == "test_resnet" and "pretrained_cfg" in config and "model_args" in config
    qconfig = config["quantization_config"]
    assert qconfig["quant_method"] == "adaquant" and qconfig["checkpoint_layout"]["version"] == 1
    assert len(qconfig["checkpoint_layout"]["folded_batchnorms"]) >= 10  # every conv's BN was folded
    loaded = load_quantized(directory)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in loaded.modules())
    assert _max_diff(loaded, qmodel, batches[0]) <= 1e-6
    assert all(torch.equal(a, b) for a, b in zip(_codes(qmodel).values(), _codes(loaded).values()))


def test_timm_without_our_loader_fails_loudly(timm_quantized) -> None:
    import timm

    _, _, directory = timm_quantized
    with pytest.raises(RuntimeError, match="Missing key"):
        timm.create_model(f"local-dir:{directory}", pretrained=True)


def test_load_by_hub_id_from_cache(timm_quantized, tmp_path: Path) -> None:
    """A Hub id resolves through huggingface_hub (here an offline cache laid out like the Hub's)."""
    qmodel, batches, directory = timm_quantized
    cache = tmp_path / "hub"
    repo = cache / "models--someone--test_resnet-w4a8"
    snapshot = repo / "snapshots" / ("a" * 40)
    shutil.copytree(directory, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    loaded = load_quantized("someone/test_resnet-w4a8", cache_dir=str(cache), local_files_only=True)
    assert _max_diff(loaded, qmodel, batches[1]) <= 1e-6


# ------------------------------------------------------------------------------------------- broken checkpoints
@pytest.fixture
def saved_tiny(tmp_path: Path) -> Path:
    batches = make_batches(1, 8)
    save_quantized(quantize(make_tiny_cnn(0, batches), batches, AdaQuantConfig(**LIGHT)), tmp_path / "ck")
    return tmp_path / "ck"


def test_truncated_weights_name_the_file(saved_tiny: Path) -> None:
    path = saved_tiny / WEIGHTS_NAME
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"{path}.*corrupted or truncated"):
        load_quantized(saved_tiny, model=make_tiny_cnn())


def test_flipped_byte_is_detected(saved_tiny: Path) -> None:
    path = saved_tiny / WEIGHTS_NAME
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # inside the tensor data: safetensors alone would not notice
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{path}: corrupted"):
        load_quantized(saved_tiny, model=make_tiny_cnn())


def test_garbage_or_missing_files(saved_tiny: Path) -> None:
    (saved_tiny / WEIGHTS_NAME).write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match=WEIGHTS_NAME):
        load_quantized(saved_tiny, model=make_tiny_cnn())
    (saved_tiny / WEIGHTS_NAME).unlink()
    with pytest.raises(CheckpointError, match="weights file not found"):
        load_quantized(saved_tiny, model=make_tiny_cnn())
    (saved_tiny / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json: missing"):
        load_quantized(saved_tiny, model=make_tiny_cnn())


@pytest.mark.parametrize("change,message", [
    (lambda q: q["checkpoint_layout"].update(version=99), "layout version 99 is not supported"),
    (lambda q: q.pop("checkpoint_layout"), "no checkpoint_layout"),
    (lambda q: q.update(quant_method="gptq"), "expected 'adaquant'"),
])
def test_bad_config_names_the_file(saved_tiny: Path, change, message: str) -> None:
    path = saved_tiny / "config.json"
    config = json.loads(path.read_text())
    change(config["quantization_config"])
    path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=message) as info:
        load_quantized(saved_tiny, model=make_tiny_cnn())
    assert str(path) in str(info.value)


def _snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory`` (relative name -> bytes)."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _temporaries(*directories: Path) -> list[Path]:
    return [p for d in directories if d.is_dir() for p in d.rglob("*") if TEMP_MARKER in p.name]


def _second_model(seed: int = 1) -> tuple[nn.Module, list[torch.Tensor]]:
    batches = make_batches(1, 8)
    return quantize(make_tiny_cnn(seed, batches), batches, AdaQuantConfig(**LIGHT)), batches


def test_save_is_atomic_and_keeps_other_files(saved_tiny: Path) -> None:
    (saved_tiny / "tokenizer.json").write_text("{}")
    (saved_tiny / "README.md").write_text("my notes\n")
    (saved_tiny / "extra").mkdir()
    (saved_tiny / "extra" / "eval.json").write_text("[1]")
    second, batches = _second_model()
    save_quantized(second, saved_tiny)
    assert (saved_tiny / "tokenizer.json").read_text() == "{}" and (saved_tiny / "README.md").read_text() == "my notes\n"
    assert (saved_tiny / "extra" / "eval.json").read_text() == "[1]"
    assert not _temporaries(saved_tiny.parent)  # no staging folder, no old copy left
    assert not [p for p in saved_tiny.parent.iterdir() if p.name.startswith(".ck")]
    assert _max_diff(load_quantized(saved_tiny, model=make_tiny_cnn()), second, batches[0]) <= 1e-6  # the new model


# ------------------------------------------------------------------------ item 5: another model's weights are kept
@pytest.mark.parametrize("names", [["model.safetensors"], ["pytorch_model.bin"],
                                   ["model.safetensors.index.json", "model-00001-of-00002.safetensors"]])
def test_save_refuses_a_folder_holding_float_weights(saved_tiny: Path, names: list[str]) -> None:
    for name in names:
        (saved_tiny / name).write_bytes(b"another model's float weights")
    before = _snapshot(saved_tiny)
    with pytest.raises(CheckpointError, match="holds another model's float weights") as info:
        save_quantized(_second_model()[0], saved_tiny)
    assert all(name in str(info.value) for name in names) and "empty folder" in str(info.value)
    assert _snapshot(saved_tiny) == before  # nothing deleted, nothing written
    assert not _temporaries(saved_tiny.parent)


# ------------------------------------------------------------------ item 3: atomic saves, hybrids, killed saves
def test_failed_save_leaves_the_previous_checkpoint_whole(saved_tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (saved_tiny / "tokenizer.json").write_text("{}")
    before = _snapshot(saved_tiny)
    written = []

    def fail_after_weights(qmodel, kind, qconfig, directory, base_model_config):
        written.append(sorted(p.name for p in directory.iterdir()))
        raise RuntimeError("simulated failure after the weights")

    monkeypatch.setattr(checkpoint_save, "_write_config", fail_after_weights)
    with pytest.raises(RuntimeError, match="simulated failure"):
        save_quantized(_second_model()[0], saved_tiny)
    assert WEIGHTS_NAME in written[0]  # the failure came after the new weights were written
    assert _snapshot(saved_tiny) == before and not _temporaries(saved_tiny.parent)
    load_quantized(saved_tiny, model=make_tiny_cnn())


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_temporaries_of_killed_saves_are_removed(saved_tiny: Path) -> None:
    pid = _dead_pid()
    staging = saved_tiny.parent / f".ck{TEMP_MARKER}{pid}-0badf00d"  # a save killed before its swap
    staging.mkdir()
    (staging / WEIGHTS_NAME).write_bytes(b"x" * 1000)
    in_place = saved_tiny / f".checkpoint{TEMP_MARKER}{pid}-0badf00d"  # an in-place save killed mid-way
    in_place.mkdir()
    (in_place / WEIGHTS_NAME).write_bytes(b"x" * 1000)
    live = saved_tiny.parent / f".ck{TEMP_MARKER}{os.getpid()}-feedf00d"  # a running writer's: not touched
    live.mkdir()
    save_quantized(_second_model()[0], saved_tiny)
    assert not staging.exists() and not in_place.exists() and live.exists()
    shutil.rmtree(live)


def _edit_config(directory: Path, change) -> Path:
    path = directory / "config.json"
    config = json.loads(path.read_text())
    change(config["quantization_config"]["checkpoint_layout"])
    path.write_text(json.dumps(config))
    return path


def test_config_and_weights_of_different_saves_are_refused(saved_tiny: Path, tmp_path: Path) -> None:
    save_quantized(_second_model()[0], tmp_path / "other")
    # the hybrid an interrupted file-by-file save left: new weights, old config.json (same layers and bits)
    shutil.copy(tmp_path / "other" / WEIGHTS_NAME, saved_tiny / WEIGHTS_NAME)
    with pytest.raises(CheckpointError, match="saved by different runs, or edited") as info:
        load_quantized(saved_tiny, model=make_tiny_cnn())
    assert f"{saved_tiny / 'config.json'} does not belong to {saved_tiny / WEIGHTS_NAME}" in str(info.value)
    # a config.json without the binding next to weights that have one
    shutil.copy(tmp_path / "other" / "config.json", saved_tiny / "config.json")
    load_quantized(saved_tiny, model=make_tiny_cnn())  # the matching pair loads
    _edit_config(saved_tiny, lambda layout: layout.pop("weights_sha256"))
    with pytest.raises(CheckpointError, match="only one of them records"):
        load_quantized(saved_tiny, model=make_tiny_cnn())


# ------------------------------------------------------------ item 4: mount points, read-only parents, EXDEV
def _assert_saved_in_place(directory: Path, second: nn.Module, batches: list[torch.Tensor]) -> None:
    assert (directory / "tokenizer.json").read_text() == "{}"
    assert not _temporaries(directory.parent)
    assert _max_diff(load_quantized(directory, model=make_tiny_cnn()), second, batches[0]) <= 1e-6


def test_save_into_a_folder_whose_parent_is_read_only(saved_tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (saved_tiny / "tokenizer.json").write_text("{}")
    second, batches = _second_model()
    real_access, real_mkdir = os.access, os.mkdir
    # root ignores the mode bits: make os.access and mkdir in the parent behave as they do for a normal user
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: False if Path(path) == saved_tiny.parent
                        else real_access(path, mode, **kw))

    def mkdir(path, *args, **kwargs):
        if Path(path).parent == saved_tiny.parent:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)
    saved_tiny.parent.chmod(0o555)
    try:
        save_quantized(second, saved_tiny)
        with pytest.raises(PermissionError) as info:  # a new folder cannot be made there: the error names it
            save_quantized(second, saved_tiny.parent / "new")
    finally:
        saved_tiny.parent.chmod(0o755)
    assert str(saved_tiny.parent / "new") in str(info.value) and TEMP_MARKER not in str(info.value)
    _assert_saved_in_place(saved_tiny, second, batches)


@pytest.mark.parametrize("failure", ["mount point", "EXDEV", "EBUSY"])
def test_save_where_the_folder_cannot_be_swapped(saved_tiny: Path, monkeypatch: pytest.MonkeyPatch,
                                                 failure: str) -> None:
    (saved_tiny / "tokenizer.json").write_text("{}")
    second, batches = _second_model()
    if failure == "mount point":
        real_ismount = os.path.ismount
        monkeypatch.setattr(os.path, "ismount", lambda p: Path(p) == saved_tiny or real_ismount(p))
    else:
        code = getattr(errno, failure)

        def cannot_rename(staging, target):
            raise OSError(code, os.strerror(code), str(staging), None, str(target))

        monkeypatch.setattr(checkpoint_save, "replace_directory", cannot_rename)
    save_quantized(second, saved_tiny)
    _assert_saved_in_place(saved_tiny, second, batches)


def test_save_errors_name_the_target_not_a_temporary(saved_tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = _snapshot(saved_tiny)
    monkeypatch.setattr(os.path, "ismount", lambda p: Path(p) == saved_tiny)

    def disk_full(tensors, path, layout=None):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(checkpoint_save, "write_weights", disk_full)
    with pytest.raises(OSError, match="No space left") as info:
        save_quantized(_second_model()[0], saved_tiny)
    assert str(saved_tiny) in str(info.value) and TEMP_MARKER not in str(info.value)
    assert info.value.errno == errno.ENOSPC
    assert _snapshot(saved_tiny) == before and not _temporaries(saved_tiny.parent)


def test_interrupted_in_place_save_is_a_clear_error_not_a_hybrid(saved_tiny: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os.path, "ismount", lambda p: Path(p) == saved_tiny)
    real_replace = os.replace

    def killed_before_config(src, dst):
        if Path(dst).name == "config.json":
            raise KeyboardInterrupt  # the save stops between the weights and config.json (the commit point)
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", killed_before_config)
    with pytest.raises(KeyboardInterrupt):
        save_quantized(_second_model()[0], saved_tiny)
    monkeypatch.setattr(os, "replace", real_replace)
    assert not _temporaries(saved_tiny.parent)
    with pytest.raises(CheckpointError, match="does not belong to"):
        load_quantized(saved_tiny, model=make_tiny_cnn())


# ------------------------------------------------------------------------ item 10: edited configs, bad tensors
@pytest.mark.parametrize("change,message", [
    (lambda layout: layout["layers"]["conv1"].update(activation_bits=2), "saved by different runs, or edited"),
    (lambda layout: layout["layers"]["conv2"].update(weight_bits=8), "saved by different runs, or edited"),
    (lambda layout: layout["layers"]["conv1"].update(weight_bits=9), r"layers\['conv1'\]: weight_bits must be"),
    (lambda layout: layout["layers"]["fc"].update(weight_shape=[10, "16"]), r"layers\['fc'\]: weight_shape"),
])
def test_edited_layer_bits_are_a_checkpoint_error(saved_tiny: Path, change, message: str) -> None:
    path = _edit_config(saved_tiny, change)
    with pytest.raises(CheckpointError, match=message) as info:
        load_quantized(saved_tiny, model=make_tiny_cnn())
    assert str(path) in str(info.value)


def _strip_binding(directory: Path) -> None:
    """Make ``directory`` look like a checkpoint saved before config and weights were bound to each other."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    _edit_config(directory, lambda layout: layout.pop("weights_sha256"))
    path = directory / WEIGHTS_NAME
    with safe_open(str(path), framework="pt") as f:
        metadata = {k: v for k, v in f.metadata().items() if k != "hf_adaquant_layout_sha256"}
    save_file(load_file(str(path)), str(path), metadata=metadata)


@pytest.mark.parametrize("change,message", [
    (lambda layout: layout["layers"]["conv1"].update(activation_bits=2),
     r"layer 'conv1': input zero-point 1\d\d is far outside the 2-bit grid"),
    (lambda layout: layout["layers"]["conv1"].update(activation_symmetric=True),
     "layer 'conv1': input zero-point must be 0 on a symmetric grid"),
    (lambda layout: layout["layers"]["conv2"].update(weight_bits=8), r"layer 'conv2': tensor 'weight_packed' is"),
])
def test_checkpoints_without_binding_still_load_and_are_checked(saved_tiny: Path, change, message: str) -> None:
    batches = make_batches(1, 8)
    _strip_binding(saved_tiny)
    reference = load_quantized(saved_tiny, model=make_tiny_cnn())  # older checkpoints stay loadable
    assert _max_diff(reference, quantize(make_tiny_cnn(0, batches), batches, AdaQuantConfig(**LIGHT)),
                     batches[0]) <= 1e-6
    _edit_config(saved_tiny, change)
    with pytest.raises(CheckpointError, match=message) as info:
        load_quantized(saved_tiny, model=make_tiny_cnn())
    assert str(saved_tiny / WEIGHTS_NAME) in str(info.value)


def test_bad_weights_file_name_and_missing_local_path(saved_tiny: Path, tmp_path: Path) -> None:
    path = saved_tiny / "config.json"
    config = json.loads(path.read_text())
    config["quantization_config"]["checkpoint_layout"]["weights_file"] = "../elsewhere.safetensors"
    path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="weights_file must be a .safetensors file name"):
        load_quantized(saved_tiny, model=make_tiny_cnn())
    with pytest.raises(CheckpointError, match="checkpoint folder not found"):
        load_quantized(tmp_path / "no_such_dir", model=make_tiny_cnn())


def test_unquantized_model_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="hf_adaquant_report"):
        save_quantized(make_tiny_cnn(), tmp_path / "x")


# ------------------------------------------------------------- residual output quantizers (residual_output_bits)
@pytest.fixture(scope="module")
def residual_quantized(tmp_path_factory: pytest.TempPathFactory):
    from tests.conftest import make_residual_cnn

    batches = make_batches(2, 8)
    qmodel = quantize(make_residual_cnn(0, batches), batches,
                      AdaQuantConfig(weight_bits=8, activation_bits=8, weight_symmetric=True, residual_output_bits=8,
                                     **LIGHT))
    directory = tmp_path_factory.mktemp("residual") / "ck"
    save_quantized(qmodel, directory)
    return qmodel, batches, directory


def _output_grids(model: nn.Module) -> dict[str, tuple]:
    return {n: (m.output_quantizer.bits, m.output_quantizer.signed, m.output_quantizer.scale.clone(),
                m.output_quantizer.zero_point.clone()) for n, m in model.named_modules()
            if isinstance(m, QModuleMixin) and m.output_quantizer is not None}


@pytest.mark.parametrize("packed", [False, True])
def test_residual_output_quantizers_round_trip_bitwise(residual_quantized, packed: bool, tmp_path: Path) -> None:
    from tests.conftest import RESIDUAL_CNN_RESIDUAL_LAYERS, make_residual_cnn

    qmodel, batches, directory = residual_quantized
    config = json.loads((directory / "config.json").read_text())["quantization_config"]
    layout = config["checkpoint_layout"]
    assert config["residual_output_bits"] == 8 and layout["version"] == 3  # older readers refuse, not drop, them
    assert [n for n, d in layout["layers"].items() if "output_bits" in d] == RESIDUAL_CNN_RESIDUAL_LAYERS
    assert layout["layers"]["block2.conv2"]["output_bits"] == 8
    assert layout["layers"]["block2.conv2"]["output_symmetric"] is False
    stored = load_file(str(directory / WEIGHTS_NAME))
    assert sorted(k for k in stored if ".output_" in k) == sorted(
        f"{n}.output_{t}" for n in RESIDUAL_CNN_RESIDUAL_LAYERS for t in ("scale", "zero_point", "signed"))
    loaded = load_quantized(directory, model=make_residual_cnn(7), packed=packed)
    original, reloaded = _output_grids(qmodel), _output_grids(loaded)
    assert list(original) == list(reloaded) == RESIDUAL_CNN_RESIDUAL_LAYERS
    for name in original:
        bits, signed, scale, zero_point = reloaded[name]
        assert (bits, signed) == original[name][:2] and bool(loaded.get_submodule(name).output_quantizer.initialized)
        assert torch.equal(scale, original[name][2]) and torch.equal(zero_point, original[name][3])
    with torch.no_grad():
        for batch in batches:
            assert torch.equal(loaded(batch), qmodel(batch))
    save_quantized(loaded, tmp_path / "again")  # a reloaded model saves the same tensors
    again = load_file(str(tmp_path / "again" / WEIGHTS_NAME))
    assert again.keys() == stored.keys() and all(torch.equal(again[k], stored[k]) for k in stored)


@pytest.mark.parametrize("change,message", [
    (lambda d: d.pop("output_symmetric"), r"layers\['block1.conv2'\]: has \['output_bits'\] without "
                                          r"\['output_symmetric'\]"),
    (lambda d: d.update(output_bits=9), r"layers\['block1.conv2'\]: output_bits must be an integer in 2..8"),
    (lambda d: d.update(output_symmetric="no"), r"output_symmetric must be true or false"),
])
def test_edited_output_quantizer_descriptions_are_refused(residual_quantized, tmp_path: Path, change,
                                                          message: str) -> None:
    from tests.conftest import make_residual_cnn

    directory = tmp_path / "ck"
    shutil.copytree(residual_quantized[2], directory)
    _edit_config(directory, lambda layout: change(layout["layers"]["block1.conv2"]))
    with pytest.raises(CheckpointError, match=message):
        load_quantized(directory, model=make_residual_cnn())


def test_output_tensors_without_their_description_are_refused(residual_quantized, tmp_path: Path) -> None:
    """A layout that lost a layer's output description (edited, binding stripped) leaves its stored output tensors
    unknown: refused, never a model silently without the output grid."""
    from tests.conftest import make_residual_cnn

    directory = tmp_path / "ck"
    shutil.copytree(residual_quantized[2], directory)
    _strip_binding(directory)
    _edit_config(directory, lambda layout: [layout["layers"]["block1.conv2"].pop(k)
                                            for k in ("output_bits", "output_symmetric")])
    with pytest.raises(CheckpointError, match=r"layer 'block1.conv2' has unknown tensors \['output_scale', "):
        load_quantized(directory, model=make_residual_cnn())


def test_transformers_reload_keeps_output_quantizers(tmp_path: Path) -> None:
    """Plain torch.fx does not trace a transformers BERT (so quantize gives it none); output quantizers added by
    hand still travel through save_pretrained / from_pretrained (and the packed reload) bitwise."""
    from tests.integrations.test_transformers import TINY, _batches
    from transformers import AutoModelForQuestionAnswering, BertConfig, BertForQuestionAnswering

    torch.manual_seed(0)
    qmodel = quantize(BertForQuestionAnswering(BertConfig(**TINY)).eval(), _batches(),
                      AdaQuantConfig(weight_bits=8, activation_bits=8, **LIGHT))
    names = ["bert.encoder.layer.0.attention.output.dense", "bert.encoder.layer.1.output.dense"]
    for name in names:
        layer = qmodel.get_submodule(name)
        q = layer.add_output_quantizer(8)
        q.set_range(torch.tensor([-0.7]), torch.tensor([0.9]))
    qmodel.save_pretrained(tmp_path / "bert")
    assert json.loads((tmp_path / "bert" / "config.json").read_text())[
        "quantization_config"]["checkpoint_layout"]["version"] == 3
    batch = _batches(1, seed=5)[0]
    with torch.no_grad():
        reference = qmodel(**batch).start_logits
        for loaded in (AutoModelForQuestionAnswering.from_pretrained(tmp_path / "bert"),
                       load_quantized(tmp_path / "bert", packed=True)):
            assert [n for n, m in loaded.named_modules()
                    if isinstance(m, QModuleMixin) and m.output_quantizer is not None] == names
            assert torch.equal(loaded(**batch).start_logits, reference)
