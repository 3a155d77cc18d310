import pytest
import torch
from diffaccel import zoo
from safetensors.torch import load_file


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("name, attr", [("digits-sd", "unet"), ("digits-dit", "transformer"),
                                        ("digits-ddpm", "unet")])
def test_loaded_weights_equal_the_shipped_file(name, attr):
    pipe = zoo.load(name)
    module = getattr(pipe, attr)
    shipped = load_file(str(next((zoo.entry_path(name) / attr).glob("*.safetensors"))))
    state = module.state_dict()
    assert set(shipped) == set(state)
    for k, v in shipped.items():
        assert torch.equal(state[k], v.to(torch.float32)), k


def test_save_and_reload_is_exact(tmp_path):
    pipe = zoo.load("digits-dit")
    pipe.transformer.save_pretrained(tmp_path / "t")
    from diffusers import DiTTransformer2DModel

    again = DiTTransformer2DModel.from_pretrained(str(tmp_path / "t"))
    a, b = _state(pipe.transformer), _state(again)
    assert all(torch.equal(a[k], b[k]) for k in a)
    feats = zoo.load("digits-features")
    feats.save_pretrained(tmp_path / "f")
    from diffaccel.zoo.features import DigitsClassifier

    f2 = DigitsClassifier.from_pretrained(str(tmp_path / "f"))
    x = torch.randint(0, 256, (3, 1, 32, 32), dtype=torch.uint8)
    assert torch.equal(feats(x), f2(x))
