"""Every script in examples/ runs, at tiny sizes (--tiny), as a user runs it."""
import importlib.util
import os
import subprocess
import sys

import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
SCRIPTS = sorted(f for f in os.listdir(EXAMPLES) if f.endswith(".py"))
NEEDS = {"lightning_module.py": "lightning", "avalanche_bmc.py": "avalanche"}  # optional dependencies of some examples


def test_every_example_is_listed():
    assert SCRIPTS == ["avalanche_bmc.py", "consolidation.py", "lightning_module.py", "plain_pytorch.py",
                       "stacked_experts.py"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_example_runs(script):
    package = NEEDS.get(script)
    if package and importlib.util.find_spec(package) is None:
        pytest.skip(f"{script} needs {package} (pip install {package}, or the [avalanche] extra)")
    with open(os.path.join(EXAMPLES, script)) as f:
        source = f.read()
    assert source.startswith('"""') and len(source.splitlines()) <= 80  # says what it shows; short
    # One thread: the 2-core machines these tests run on are shared, and OpenMP threads that
    # wait for a busy core make a small model's step 10x slower.
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, os.path.join(EXAMPLES, script), "--tiny"], capture_output=True, text=True,
                       env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "Traceback" not in p.stderr
    assert "accuracy" in p.stdout, p.stdout
