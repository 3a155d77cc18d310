import shutil
import subprocess
import sys

import pytest
import torch
from diffaccel import zoo
from diffaccel.zoo.registry import ZooError


def test_unknown_name_lists_valid_names():
    with pytest.raises(ZooError, match="valid names: digits-features") as ei:
        zoo.load("digits-gan")
    assert ei.value.exit_code == 2
    assert "random-pixart" in str(ei.value)


def test_missing_weights_name_folder_and_train_command(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFACCEL_ZOO_DIR", str(tmp_path))
    with pytest.raises(ZooError, match=r"diffaccel zoo train digits-vae") as ei:
        zoo.load("digits-vae")
    assert str(tmp_path / "digits-vae") in str(ei.value)
    assert ei.value.exit_code == 3


def test_corrupt_weight_file_is_named(tmp_path, monkeypatch):
    src = zoo.entry_path("digits-features")
    dst = tmp_path / "digits-features"
    shutil.copytree(src, dst)
    (weights,) = list(dst.glob("*.safetensors"))
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # truncated download / disk full
    monkeypatch.setenv("DIFFACCEL_ZOO_DIR", str(tmp_path))
    with pytest.raises(ZooError, match="corrupt") as ei:
        zoo.load("digits-features")
    assert weights.name in str(ei.value) and "zoo train digits-features" in str(ei.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised on a machine without CUDA")
def test_wrong_device_is_a_clear_error():
    with pytest.raises(ValueError, match="CUDA is not available"):
        zoo.load("digits-features", device="cuda")


@pytest.mark.parametrize(
    "name, cls",
    [("digits-sd", "StableDiffusionPipeline"), ("digits-dit", "DiTPipeline"), ("digits-ddpm", "DDPMPipeline"),
     ("digits-vae", "AutoencoderKL"), ("digits-clip", "CLIPModel"), ("digits-features", "DigitsClassifier")],
)
def test_load_returns_stock_classes(name, cls):
    obj = zoo.load(name)
    assert type(obj).__name__ == cls
    params = obj.parameters() if isinstance(obj, torch.nn.Module) else obj.components.values()
    if isinstance(obj, torch.nn.Module):
        assert next(iter(params)).dtype == torch.float32


def test_import_and_load_in_a_fresh_offline_process():
    code = "import diffaccel; p = diffaccel.zoo.load('digits-sd'); print(type(p).__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "StableDiffusionPipeline"


def test_every_trained_entry_has_a_card_with_command_and_machine():
    for name, entry in zoo.ENTRIES.items():
        if not entry.trained:
            continue
        card = zoo.card(name)
        assert card["command"].startswith((f"diffaccel zoo train {name}", "python -m diffaccel.distill.train"))
        assert card["train_seconds"] > 0 and "CPU" in card["machine"]


def test_shipped_configs_name_no_machine_path():
    for f in zoo.entry_path("digits-sd").parent.rglob("*.json"):
        assert "_name_or_path" not in f.read_text(), f
