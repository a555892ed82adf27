import os

import pytest
import torch

os.environ.setdefault("BMC_FAST_REQUIRE_EXTENSION", "1")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]

# Tolerances of fused op vs the float32-upcast reference cast to the output dtype. Start from
# assert_close's defaults; float32 is widened because the fused ops accumulate long sums in a
# different order (chunked, then double) than torch's reductions; float16/bfloat16 because the
# fused gradient is rounded once in the forward and again when scaled by grad_output.
TOL = {
    torch.float64: dict(rtol=1e-7, atol=1e-7),
    torch.float32: dict(rtol=2e-5, atol=2e-6),
    torch.float16: dict(rtol=2e-3, atol=2e-5),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-4),
}


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture
def two_threads():
    """torch on two threads for the test (the thread split and the thread tuner need two)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip)
