"""Quality floors of the shipped zoo, on fewer samples than the model cards (500) and with a margin."""

import pytest
import torch
import torch.nn.functional as F
from diffaccel import zoo
from diffaccel.zoo.quality import measure_quality


def test_classifier_test_accuracy(classifier):
    test = zoo.load_split("test")
    with torch.no_grad():
        acc = (classifier.logits_from_normalized(test.images).argmax(1) == test.labels).float().mean()
    assert acc >= 0.97


def test_classifier_is_a_torchmetrics_style_extractor(classifier):
    x = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8)
    f = classifier(x)
    assert f.shape == (4, classifier.num_features) and f.dtype == torch.float32
    classifier.train()
    assert not classifier.training
    with pytest.raises(ValueError, match="expected images of shape"):
        classifier(torch.zeros(2, 2, 32, 32, dtype=torch.uint8))


def test_vae_reconstructions_are_recognised(classifier):
    vae = zoo.load("digits-vae")
    test = zoo.load_split("test")
    with torch.no_grad():
        rec = vae.decode(vae.encode(test.images).latent_dist.mean).sample.clamp(-1, 1)
        acc = (classifier.logits_from_normalized(rec).argmax(1) == test.labels).float().mean()
    assert acc >= 0.95
    assert F.mse_loss(rec, test.images) < 0.05


@pytest.mark.slow
@pytest.mark.parametrize("name", ["digits-sd", "digits-dit"])
def test_conditional_pipelines_draw_the_requested_digit(name):
    res = measure_quality(name, n=100, steps=25, seed=1234, progress=False)
    assert res["accuracy"] >= 0.80, res  # card floor: >= 0.85 on 500 samples


@pytest.mark.slow
def test_ddpm_is_confident_and_covers_all_classes():
    res = measure_quality("digits-ddpm", n=200, steps=25, seed=1234, progress=False)
    assert res["mean_top_prob"] >= 0.80, res  # card floor: >= 0.85 on 500 samples
    assert res["min_class_share"] >= 0.02, res  # card floor: no class under 5% on 500 samples
