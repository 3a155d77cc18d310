import pytest
import torch
from diffaccel.core import make_generators, measure, resolve_device, resolve_dtype, seed_everything


def test_generators_give_per_image_noise_independent_of_batch():
    a = [torch.randn(3, generator=g) for g in make_generators(5, 4)]
    b = [torch.randn(3, generator=g) for g in make_generators(7, 2)]  # seeds 7, 8 = images 2, 3 above
    assert torch.equal(a[2], b[0]) and torch.equal(a[3], b[1])
    assert not torch.equal(a[0], a[1])


def test_seed_everything_repeats():
    seed_everything(3)
    x = torch.rand(4)
    seed_everything(3)
    assert torch.equal(x, torch.rand(4))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised on a machine without CUDA")
def test_cuda_requested_without_cuda_is_a_clear_error():
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device("cuda")


def test_unknown_device_and_dtype():
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("tpu9")
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("fp8x")
    with pytest.raises(ValueError, match="float16 is not supported on CPU"):
        resolve_dtype("fp16", "cpu")
    assert resolve_device("auto").type in ("cpu", "cuda")
    assert resolve_dtype("bf16") == torch.bfloat16


def test_measure_counts_warmup_and_repeats():
    calls = []
    res = measure(lambda: calls.append(1) or len(calls), warmup=2, repeats=3)
    assert len(calls) == 5 and len(res.times) == 3 and res.result == 5
    assert res.median >= 0 and res.min <= res.median
    with pytest.raises(ValueError):
        measure(lambda: None, repeats=0)
