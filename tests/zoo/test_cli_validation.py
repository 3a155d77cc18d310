"""Bad input to `diffaccel zoo sample|quality` is refused before any work, with one line that names the option
(regressions of issue 14, defects 1, 3, 6, 7 and 8)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from clirun import last_line, run_cli
from diffaccel import zoo
from PIL import Image
from tolerances import network_atol, uint8_atol


@pytest.mark.parametrize("argv,option", [
    (["zoo", "quality", "digits-dit", "-n", "2", "--steps", "-1"], "--steps"),  # ran 0 model calls, exit 0
    (["zoo", "sample", "digits-dit", "--steps", "-2"], "--steps"),  # wrote noise, exit 0
    (["zoo", "sample", "digits-dit", "--steps", "0"], "--steps"),  # ZeroDivisionError traceback
    (["zoo", "sample", "random-sd", "-n", "100000000"], "--num-images"),  # ran until killed
    (["zoo", "sample", "random-sd", "-n", "0"], "--num-images"),
    (["zoo", "sample", "random-sd", "--batch-size", "0"], "--batch-size"),
    (["zoo", "sample", "digits-dit", "--label", "-1"], "--label"),  # IndexError traceback
    (["zoo", "sample", "digits-dit", "--guidance", "nan"], "--guidance"),
    (["zoo", "sample", "digits-dit", "--seed", "-5"], "--seed"),
])
def test_invalid_numbers_exit_2_naming_the_option(argv, option, tmp_path):
    code, out, err = run_cli(*argv, "--out", str(tmp_path)) if argv[1] == "sample" else run_cli(*argv)
    assert code == 2 and option in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert out == "" and not list(tmp_path.iterdir())


@pytest.mark.parametrize("label", ["10", "11", "1000"])
def test_labels_outside_the_models_classes_are_refused(label, tmp_path):
    code, _, err = run_cli("zoo", "sample", "digits-dit", "--label", label, "-n", "1", "--steps", "1",
                           "--out", str(tmp_path))
    assert code == 2 and "--label must be in [0, 9]" in last_line(err) and not list(tmp_path.iterdir())


def test_label_for_an_unconditional_model_and_prompt_for_a_class_model(tmp_path):
    code, _, err = run_cli("zoo", "sample", "random-ddpm", "--label", "3", "--out", str(tmp_path))
    assert code == 2 and "--label" in last_line(err) and "unconditional" in err
    code, _, err = run_cli("zoo", "sample", "digits-dit", "--prompt", "a seven", "--out", str(tmp_path))
    assert code == 2 and "--prompt" in last_line(err)


@pytest.mark.parametrize("name", ["digits-features", "digits-vae", "digits-clip", "random-sd15-unet"])
def test_quality_of_a_non_pipeline_is_a_clear_error(name):
    code, _, err = run_cli("zoo", "quality", name, "-n", "2", "--steps", "1")
    assert code == 2 and "not a pipeline" in err and "Traceback" not in err


@pytest.mark.parametrize("name", ["digits-sd-onestep", "random-pixart"])
def test_quality_runs_on_every_pipeline_family(name):
    """digits-sd-onestep crashed (TypeError batch_size) and random-pixart said 'Invalid sample size'."""
    code, out, err = run_cli("zoo", "quality", name, "-n", "3", "--batch-size", "2", "--steps", "1", "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["n"] == 3 and 0.0 <= res["accuracy"] <= 1.0 and abs(sum(res["class_share"]) - 1) < 1e-3


def test_out_is_checked_before_sampling_and_never_overwritten(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code, _, err = run_cli("zoo", "sample", "digits-dit", "-n", "1", "--steps", "1", "--out", str(blocker))
    assert code == 2 and "--out" in err and "is a file" in err and blocker.read_text() == "not a folder"
    out = tmp_path / "out"
    out.mkdir()
    mine = out / "digits-dit-seed0.png"
    mine.write_bytes(b"my own file")
    code, _, err = run_cli("zoo", "sample", "digits-dit", "-n", "2", "--steps", "1", "--out", str(out))
    assert code == 2 and "--force" in err and mine.read_bytes() == b"my own file"
    assert sorted(p.name for p in out.iterdir()) == ["digits-dit-seed0.png"]  # nothing written, nothing lost
    code, res, err = run_cli("zoo", "sample", "digits-dit", "-n", "2", "--steps", "1", "--out", str(out),
                             "--force", "--json")
    assert code == 0, err
    assert mine.read_bytes()[:4] == b"\x89PNG" and len(json.loads(res)["files"]) == 2


def test_sampling_is_batched_with_progress_on_stderr(tmp_path):
    code, out, err = run_cli("zoo", "sample", "digits-dit", "-n", "5", "--batch-size", "2", "--steps", "2",
                             "--out", str(tmp_path), "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["batch_size"] == 2 and res["nfe"] == 3 * 2  # three pipeline calls of 2 steps
    assert "5/5" in err and len(list(tmp_path.glob("*.png"))) == 5
    # image i uses seed + i whatever the batching: the same PNGs as one batch of 5
    code, _, _ = run_cli("zoo", "sample", "digits-dit", "-n", "5", "--batch-size", "5", "--steps", "2",
                         "--out", str(tmp_path / "one"))
    pipe = zoo.load("digits-dit")
    # another batching: float round-off of two transformer calls and a decode may move a pixel across a level
    levels = uint8_atol(network_atol(pipe.transformer, calls=2) + network_atol(pipe.vae.decoder))
    for i in range(5):
        a = np.asarray(Image.open(tmp_path / f"digits-dit-seed{i}.png"), dtype=int)
        b = np.asarray(Image.open(tmp_path / "one" / f"digits-dit-seed{i}.png"), dtype=int)
        assert np.abs(a - b).max() <= levels


def test_sample_defaults_to_the_entrys_own_step_count(tmp_path):
    """Without --steps a one-step student is sampled with its one step (it was run with 25, the generic default)."""
    code, out, err = run_cli("zoo", "sample", "digits-flux-onestep", "-n", "2", "--out", str(tmp_path), "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["steps"] == 1 and res["nfe"] == 1
