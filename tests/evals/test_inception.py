"""The FID Inception network: layer layout of the standard weight file, forward shapes, offline weight lookup."""

from __future__ import annotations

import socket

import pytest
import torch
from diffaccel.evals import FeatureExtractorWeightsNotFound, FIDInceptionV3, InceptionExtractor, load_fid_inception
from diffaccel.evals.errors import FeatureExtractorWeightsInvalid

# Every BasicConv2d of the TF `inception-2015-12-05` graph as "name out_channels in_channels kh kw", written from the
# published architecture (Szegedy et al. 2016, Table 1 and Figs. 5-7; 35x35 blocks with 32/64/64 pool features,
# 17x17 blocks with 128/160/160/192 channels in the factorized 7x7 branches), in torchvision's naming, which is the
# key layout of pt_inception-2015-12-05-6726825d.pth.
CONVS = """
Conv2d_1a_3x3 32 3 3 3
Conv2d_2a_3x3 32 32 3 3
Conv2d_2b_3x3 64 32 3 3
Conv2d_3b_1x1 80 64 1 1
Conv2d_4a_3x3 192 80 3 3
Mixed_5b.branch1x1 64 192 1 1
Mixed_5b.branch5x5_1 48 192 1 1
Mixed_5b.branch5x5_2 64 48 5 5
Mixed_5b.branch3x3dbl_1 64 192 1 1
Mixed_5b.branch3x3dbl_2 96 64 3 3
Mixed_5b.branch3x3dbl_3 96 96 3 3
Mixed_5b.branch_pool 32 192 1 1
Mixed_5c.branch1x1 64 256 1 1
Mixed_5c.branch5x5_1 48 256 1 1
Mixed_5c.branch5x5_2 64 48 5 5
Mixed_5c.branch3x3dbl_1 64 256 1 1
Mixed_5c.branch3x3dbl_2 96 64 3 3
Mixed_5c.branch3x3dbl_3 96 96 3 3
Mixed_5c.branch_pool 64 256 1 1
Mixed_5d.branch1x1 64 288 1 1
Mixed_5d.branch5x5_1 48 288 1 1
Mixed_5d.branch5x5_2 64 48 5 5
Mixed_5d.branch3x3dbl_1 64 288 1 1
Mixed_5d.branch3x3dbl_2 96 64 3 3
Mixed_5d.branch3x3dbl_3 96 96 3 3
Mixed_5d.branch_pool 64 288 1 1
Mixed_6a.branch3x3 384 288 3 3
Mixed_6a.branch3x3dbl_1 64 288 1 1
Mixed_6a.branch3x3dbl_2 96 64 3 3
Mixed_6a.branch3x3dbl_3 96 96 3 3
Mixed_6b.branch1x1 192 768 1 1
Mixed_6b.branch7x7_1 128 768 1 1
Mixed_6b.branch7x7_2 128 128 1 7
Mixed_6b.branch7x7_3 192 128 7 1
Mixed_6b.branch7x7dbl_1 128 768 1 1
Mixed_6b.branch7x7dbl_2 128 128 7 1
Mixed_6b.branch7x7dbl_3 128 128 1 7
Mixed_6b.branch7x7dbl_4 128 128 7 1
Mixed_6b.branch7x7dbl_5 192 128 1 7
Mixed_6b.branch_pool 192 768 1 1
Mixed_6c.branch1x1 192 768 1 1
Mixed_6c.branch7x7_1 160 768 1 1
Mixed_6c.branch7x7_2 160 160 1 7
Mixed_6c.branch7x7_3 192 160 7 1
Mixed_6c.branch7x7dbl_1 160 768 1 1
Mixed_6c.branch7x7dbl_2 160 160 7 1
Mixed_6c.branch7x7dbl_3 160 160 1 7
Mixed_6c.branch7x7dbl_4 160 160 7 1
Mixed_6c.branch7x7dbl_5 192 160 1 7
Mixed_6c.branch_pool 192 768 1 1
Mixed_6d.branch1x1 192 768 1 1
Mixed_6d.branch7x7_1 160 768 1 1
Mixed_6d.branch7x7_2 160 160 1 7
Mixed_6d.branch7x7_3 192 160 7 1
Mixed_6d.branch7x7dbl_1 160 768 1 1
Mixed_6d.branch7x7dbl_2 160 160 7 1
Mixed_6d.branch7x7dbl_3 160 160 1 7
Mixed_6d.branch7x7dbl_4 160 160 7 1
Mixed_6d.branch7x7dbl_5 192 160 1 7
Mixed_6d.branch_pool 192 768 1 1
Mixed_6e.branch1x1 192 768 1 1
Mixed_6e.branch7x7_1 192 768 1 1
Mixed_6e.branch7x7_2 192 192 1 7
Mixed_6e.branch7x7_3 192 192 7 1
Mixed_6e.branch7x7dbl_1 192 768 1 1
Mixed_6e.branch7x7dbl_2 192 192 7 1
Mixed_6e.branch7x7dbl_3 192 192 1 7
Mixed_6e.branch7x7dbl_4 192 192 7 1
Mixed_6e.branch7x7dbl_5 192 192 1 7
Mixed_6e.branch_pool 192 768 1 1
Mixed_7a.branch3x3_1 192 768 1 1
Mixed_7a.branch3x3_2 320 192 3 3
Mixed_7a.branch7x7x3_1 192 768 1 1
Mixed_7a.branch7x7x3_2 192 192 1 7
Mixed_7a.branch7x7x3_3 192 192 7 1
Mixed_7a.branch7x7x3_4 192 192 3 3
Mixed_7b.branch1x1 320 1280 1 1
Mixed_7b.branch3x3_1 384 1280 1 1
Mixed_7b.branch3x3_2a 384 384 1 3
Mixed_7b.branch3x3_2b 384 384 3 1
Mixed_7b.branch3x3dbl_1 448 1280 1 1
Mixed_7b.branch3x3dbl_2 384 448 3 3
Mixed_7b.branch3x3dbl_3a 384 384 1 3
Mixed_7b.branch3x3dbl_3b 384 384 3 1
Mixed_7b.branch_pool 192 1280 1 1
Mixed_7c.branch1x1 320 2048 1 1
Mixed_7c.branch3x3_1 384 2048 1 1
Mixed_7c.branch3x3_2a 384 384 1 3
Mixed_7c.branch3x3_2b 384 384 3 1
Mixed_7c.branch3x3dbl_1 448 2048 1 1
Mixed_7c.branch3x3dbl_2 384 448 3 3
Mixed_7c.branch3x3dbl_3a 384 384 1 3
Mixed_7c.branch3x3dbl_3b 384 384 3 1
Mixed_7c.branch_pool 192 2048 1 1
"""


def expected_state_dict_shapes() -> dict[str, tuple[int, ...]]:
    table: dict[str, tuple[int, ...]] = {}
    for line in CONVS.strip().splitlines():
        name, cout, cin, kh, kw = line.split()
        table[f"{name}.conv.weight"] = (int(cout), int(cin), int(kh), int(kw))
        for buf in ("weight", "bias", "running_mean", "running_var"):
            table[f"{name}.bn.{buf}"] = (int(cout),)
    table["fc.weight"] = (1008, 2048)
    table["fc.bias"] = (1008,)
    return table


@pytest.fixture(scope="module")
def net() -> FIDInceptionV3:
    torch.manual_seed(0)
    return FIDInceptionV3()


def test_state_dict_matches_the_standard_weight_file_layout(net):
    got = {k: tuple(v.shape) for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    expected = expected_state_dict_shapes()
    assert len(CONVS.strip().splitlines()) == 94
    assert got == expected
    assert not any("AuxLogits" in k for k in got)


def test_mixed_7c_pools_with_max_and_others_exclude_padding(net):
    assert net.Mixed_7c.max_pool and not net.Mixed_7b.max_pool
    # count_include_pad=False: a constant map stays constant at the border under the branch average pool
    from diffaccel.evals.inception import _avg_pool

    assert torch.equal(_avg_pool(torch.ones(1, 1, 5, 5)), torch.ones(1, 1, 5, 5))


def test_loads_a_weight_file_strictly(net, tmp_path):
    state = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(state, path)
    model, digest = load_fid_inception(path, check_digest=False)
    assert len(digest) == 64
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    with pytest.raises(FeatureExtractorWeightsInvalid, match="sha256"):
        load_fid_inception(path)  # random weights do not carry the 6726825d digest
    foreign = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    torch.save({"fc.weight": torch.zeros(1008, 2048), "AuxLogits.fc.weight": torch.zeros(1)}, foreign)
    with pytest.raises(FeatureExtractorWeightsInvalid, match="unexpected.*AuxLogits"):
        load_fid_inception(foreign, check_digest=False)


def test_random_weights_give_pool3_features_and_logits_from_small_uint8_images(net):
    ext = InceptionExtractor(resize="torch-aa", model=net)
    images = torch.randint(0, 256, (1, 1, 16, 16), dtype=torch.uint8)
    x = ext.prepare(images)
    assert x.shape == (1, 3, 299, 299)  # grey repeated to RGB, resized to the native size
    with torch.no_grad():
        feats, logits = ext.embed_with_logits(x)
    assert feats.shape == (1, 2048) and logits.shape == (1, 1008)
    torch.testing.assert_close(logits, feats @ net.fc.weight.T)  # "logits_unbiased": no fc bias
    assert torch.isfinite(feats).all() and (feats >= 0).all()  # global average of ReLU outputs
    assert ext.describe()["extractor"] == "inception-tf-2015-12-05:pool3" and ext.num_features == 2048
    ext.train()
    assert not ext.training and not net.training  # a metric network never trains


def test_missing_weights_error_is_offline_and_actionable(tmp_path, monkeypatch):
    monkeypatch.delenv("DIFFACCEL_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))

    def no_network(*args, **kwargs):
        raise AssertionError("a socket was opened")

    monkeypatch.setattr(socket, "socket", no_network)
    with pytest.raises(FeatureExtractorWeightsNotFound) as info:
        load_fid_inception()
    msg = str(info.value)
    for part in ("pt_inception-2015-12-05-6726825d.pth", "weights-inception-2015-12-05-6726825d.pth",
                 str(tmp_path / "torch" / "hub" / "checkpoints"), str(tmp_path / "cache" / "diffaccel"),
                 "DIFFACCEL_INCEPTION_WEIGHTS", "--inception-weights", "No download was attempted"):
        assert part in msg
    assert "\n" not in msg
