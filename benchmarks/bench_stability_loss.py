import pytest
import torch

import bmc_fast
from bmc_fast import reference
import shapes
from _harness import run_case

CONFIGS = [(k, b, d, dt, m) for (k, b, d) in shapes.STABILITY for dt in shapes.DTYPES for m in shapes.MODES]


def setup(k, b, d, dtype):
    dtype = getattr(torch, dtype)
    expert = torch.randn(k, b, d).to(dtype)
    base = torch.randn(k, b, d).to(dtype)
    esz = expert.element_size()
    return dtype, (expert, base), {"fwd": 2 * expert.numel() * esz, "fwd+bwd": 3 * expert.numel() * esz}


@pytest.mark.parametrize("k,b,d,dtype,mode", CONFIGS)
def bench_stability_loss(benchmark, machine, k, b, d, dtype, mode):
    dt, inputs, nbytes = setup(k, b, d, dtype)
    run_case(benchmark, machine, "stability_loss", {"K": k, "B": b, "D": d}, dt, mode,
               bmc_fast.stability_loss, reference.stability_loss, inputs, [0], nbytes[mode])
