"""The BMC trainer: configuration, parallel experts, buffers and memory, consolidation, the step
loop, checkpoints, metrics, baselines and distribution."""
from .config import BMCConfig
from .loop import BMC
from .metrics import Result

__all__ = ["BMC", "BMCConfig", "Result"]
