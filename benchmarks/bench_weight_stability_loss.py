import pytest
import torch

import bmc_fast
from bmc_fast import reference
import shapes
from _harness import run_case

CONFIGS = [(k, p, dt, m) for (k, p) in shapes.WEIGHT_STABILITY for dt in shapes.DTYPES for m in shapes.MODES]


def setup(k, p, dtype):
    dtype = getattr(torch, dtype)
    expert = torch.randn(k, p).to(dtype)
    base = torch.randn(p).to(dtype)
    importance = torch.rand(p).to(dtype)
    esz = expert.element_size()
    read = (k + 2) * p * esz
    return dtype, (expert, base, importance), {"fwd": read, "fwd+bwd": read + k * p * esz}


@pytest.mark.parametrize("k,p,dtype,mode", CONFIGS)
def bench_weight_stability_loss(benchmark, machine, k, p, dtype, mode):
    dt, inputs, nbytes = setup(k, p, dtype)
    run_case(benchmark, machine, "weight_stability_loss", {"K": k, "P": p}, dt, mode,
               bmc_fast.weight_stability_loss, reference.weight_stability_loss, inputs, [0], nbytes[mode])
