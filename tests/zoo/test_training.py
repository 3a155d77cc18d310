import json

import torch
from diffaccel.cli import main
from diffaccel.zoo.features import DigitsClassifier


def test_zoo_train_is_seeded_and_writes_a_loadable_entry(tmp_path):
    for out in ("a", "b"):
        assert main(["zoo", "train", "digits-features", "--iterations", "3", "--out", str(tmp_path / out)]) == 0
    card = json.loads((tmp_path / "a" / "digits-features" / "card.json").read_text())
    assert card["command"] == "diffaccel zoo train digits-features --iterations 3"
    assert card["settings"]["iterations"] == 3
    a = DigitsClassifier.from_pretrained(str(tmp_path / "a" / "digits-features")).state_dict()
    b = DigitsClassifier.from_pretrained(str(tmp_path / "b" / "digits-features")).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not list((tmp_path / "a").glob(".digits-features-*")), "temporary folder left behind"


def test_unknown_trainable_entry(capsys):
    assert main(["zoo", "train", "random-sd"]) == 2
    assert "trainable" in capsys.readouterr().err


def test_every_pipeline_entry_assembles_and_loads(tmp_path):
    """Two training iterations per generator, then the written folder loads as the stock pipeline and samples."""
    from diffaccel.zoo.registry import load_from

    for name, cls in [("digits-sd", "StableDiffusionPipeline"), ("digits-dit", "DiTPipeline"),
                      ("digits-ddpm", "DDPMPipeline"), ("digits-flux", "FluxPipeline")]:
        assert main(["zoo", "train", name, "--iterations", "2", "--out", str(tmp_path), "--quality-samples", "0"]) == 0
        pipe = load_from(name, tmp_path / name, torch.device("cpu"), torch.float32)
        assert type(pipe).__name__ == cls
        assert (tmp_path / name / "README.md").read_text().startswith(f"# {name}")
