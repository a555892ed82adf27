import pytest

import bmc_fast
from bmc_fast import reference
import shapes
from _harness import run_case
from _masked_inputs import masked_inputs

CONFIGS = [(n, c, dt, m) for (n, c) in shapes.MASKED for dt in shapes.DTYPES for m in shapes.MODES]


@pytest.mark.parametrize("n,c,dtype,mode", CONFIGS)
def bench_task_masked_cross_entropy(benchmark, machine, n, c, dtype, mode):
    dt, inputs, nbytes = masked_inputs(n, c, dtype)
    run_case(benchmark, machine, "task_masked_cross_entropy", {"N": n, "C": c}, dt, mode,
               bmc_fast.task_masked_cross_entropy, reference.task_masked_cross_entropy, inputs, [0], nbytes[mode])
