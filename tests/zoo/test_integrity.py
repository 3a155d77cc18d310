"""Weight integrity (issue 14, defect 5): recorded SHA-256 digests, component checks, finite parameters, exit 3."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from clirun import last_line, run_cli
from diffaccel import zoo
from diffaccel.core import WeightsError
from diffaccel.core.weights import check_pipeline_folder, digest_folder
from diffaccel.zoo.registry import ENTRIES, ZooError, card_digests, entry_path, record_digests
from safetensors.torch import load_file, save_file


@pytest.mark.parametrize("name", [n for n, e in ENTRIES.items() if e.trained])
def test_every_card_records_every_file(name):
    path = entry_path(name)
    assert card_digests(path) == digest_folder(path) and len(card_digests(path)) >= 2


@pytest.fixture
def zoo_copy(tmp_path, monkeypatch):
    """A private copy of the zoo's digits-features and digits-dit (the test damages it)."""
    for name in ("digits-features", "digits-vae", "digits-dit"):
        shutil.copytree(entry_path(name), tmp_path / name)
    monkeypatch.setenv("DIFFACCEL_ZOO_DIR", str(tmp_path))
    return tmp_path


def _flip_middle(f):
    data = bytearray(f.read_bytes())
    mid = len(data) - 1000  # inside the tensor data, well past the header: same size, other bytes
    data[mid:mid + 8] = bytes(255 - b for b in data[mid:mid + 8])
    f.write_bytes(bytes(data))


def test_same_size_corruption_is_caught_before_loading(zoo_copy):
    """Was: NaN parameters and black images, exit 0."""
    weights = zoo_copy / "digits-dit" / "transformer" / "diffusion_pytorch_model.safetensors"
    size = weights.stat().st_size
    _flip_middle(weights)
    assert weights.stat().st_size == size
    with pytest.raises(ZooError, match=r"transformer/diffusion_pytorch_model.safetensors is corrupt") as ei:
        zoo.load("digits-dit")
    assert ei.value.exit_code == 3 and "diffaccel zoo train digits-dit" in str(ei.value)
    code, _, err = run_cli("zoo", "sample", "digits-dit", "-n", "1", "--steps", "1", "--out",
                           str(zoo_copy / "out"))
    assert code == 3 and "corrupt" in last_line(err) and "Traceback" not in err


def test_a_missing_file_is_named(zoo_copy):
    (zoo_copy / "digits-dit" / "vae" / "config.json").unlink()
    code, _, err = run_cli("zoo", "sample", "digits-dit", "-n", "1", "--steps", "1", "--out", str(zoo_copy / "o"))
    assert code == 3 and "vae/config.json is missing" in last_line(err) and "zoo train digits-dit" in err


def test_non_finite_parameters_after_loading_are_exit_3(zoo_copy):
    path = zoo_copy / "digits-features"
    f = path / "diffusion_pytorch_model.safetensors"
    state = load_file(str(f))
    key = sorted(state)[0]
    state[key][0] = float("nan")
    save_file(state, str(f))
    with pytest.raises(ZooError, match="corrupt"):  # the digest catches it first
        zoo.load("digits-features")
    record_digests(path)  # a card that vouches for the NaN file: the finite check is the last line of defence
    with pytest.raises(ZooError, match=f"{key} holds NaN or infinite values") as ei:
        zoo.load("digits-features")
    assert ei.value.exit_code == 3


@pytest.fixture(scope="module")
def saved_sd(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pipe") / "sd"
    zoo.load("random-sd").save_pretrained(folder)
    return folder


@pytest.mark.parametrize("damage,named", [
    ("model_index.json", "model_index.json is missing"),
    ("unet/config.json", "component 'unet' (UNet2DConditionModel): unet/config.json is missing"),
    ("unet/diffusion_pytorch_model.safetensors", "no .safetensors weight file in unet/"),
    ("text_encoder/model.safetensors", "no .safetensors weight file in text_encoder/"),
    ("scheduler/scheduler_config.json", "scheduler/scheduler_config.json is missing"),
    ("vae", "folder vae/ is missing"),
])
def test_local_pipeline_folders_are_checked_component_by_component(saved_sd, tmp_path, damage, named):
    folder = tmp_path / "sd"
    shutil.copytree(saved_sd, folder)
    target = folder / damage
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(WeightsError, match="re-save") as ei:
        check_pipeline_folder(folder, fix="re-save it")
    assert named in str(ei.value) and ei.value.exit_code == 3


def test_truncated_component_weights_are_named(saved_sd, tmp_path):
    folder = tmp_path / "sd"
    shutil.copytree(saved_sd, folder)
    f = folder / "vae" / "diffusion_pytorch_model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(WeightsError, match=r"component 'vae'.*diffusion_pytorch_model.safetensors is corrupt"):
        check_pipeline_folder(folder, fix="re-save it")
    assert {"unet", "vae", "text_encoder", "tokenizer", "scheduler"} <= set(check_pipeline_folder(saved_sd, fix=""))


@pytest.mark.parametrize("damage", ["unet/config.json", "nan"])
def test_distill_pairs_with_a_damaged_teacher_folder_is_exit_3(saved_sd, tmp_path, damage):
    folder = tmp_path / "teacher"
    shutil.copytree(saved_sd, folder)
    if damage == "nan":
        f = folder / "unet" / "diffusion_pytorch_model.safetensors"
        state = load_file(str(f))
        key = sorted(state)[0]
        state[key] = torch.full_like(state[key], float("inf"))
        save_file(state, str(f))
    else:
        (folder / damage).unlink()
    code, _, err = run_cli("distill", "pairs", "--pretrained_teacher_model", str(folder), "--teacher_steps", "1",
                           "--num_pairs", "2", "--pairs_dir", str(tmp_path / "pairs"))
    assert code == 3, err
    assert ("unet/config.json is missing" if damage != "nan" else "NaN or infinite") in last_line(err)
    assert "re-save the teacher" in err and not (tmp_path / "pairs").exists()


def test_rehash_command_rewrites_the_card(zoo_copy):
    card = json.loads((zoo_copy / "digits-features" / "card.json").read_text())
    card.pop("files")
    (zoo_copy / "digits-features" / "card.json").write_text(json.dumps(card))
    code, out, err = run_cli("zoo", "rehash", "digits-features", "--json")
    assert code == 0, err
    assert json.loads(out)["digits-features"] == digest_folder(zoo_copy / "digits-features")
    assert card_digests(zoo_copy / "digits-features")


def test_the_demo_refuses_damaged_zoo_weights_too(zoo_copy):
    """Was: black images in the app as well."""
    from diffaccel.app.runner import RunInputError, load_pipeline

    _flip_middle(zoo_copy / "digits-dit" / "transformer" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(RunInputError, match="corrupt"):
        load_pipeline("digits-dit")
