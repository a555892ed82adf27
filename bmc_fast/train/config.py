"""Every option of the BMC trainer, validated, and its presets."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from .experts import resolve_parallel

__all__ = ["BMCConfig"]


@dataclass
class BMCConfig:
    """Every option of the trainer. ``BMCConfig.preset("paper" | "parity", **overrides)``."""

    n_experts: int = 4
    parallel: str = "auto"            # "auto" | "stacked" | "streams" | "sequential"
    stability: str = "feature"        # "feature" | "weight"
    stability_coef: float = 1.0
    stability_first_step: bool = False  # the first base model is untrained: nothing to keep
    task_coef: float = 1.0
    distill_coef: float = 1.0
    kd_coef: float = 0.0              # > 0 stores the experts' logits in the buffers
    kd_temperature: float = 2.0
    epochs: int = 20                  # expert epochs per task
    batch_size: int = 64
    lr: float = 0.01
    weight_decay: float = 0.01
    buffer_size: float = 10000        # samples per task (int) or a fraction of the task (< 1)
    public_buffer_count: bool = False  # a buffer keeps buffer_size + 1 samples of one drop_last pass (public code)
    buffer_dtype: str = "float32"     # "float32" | "float16" for stored features / logits
    store_logits: bool = False
    memory_size: int = 10000
    memory_policy: str = "keep"       # "keep": consolidate on the new buffers in full + the kept memory, then cut every
                                      # buffer to ceil(memory_size / J) + 1; "cap": every buffer cut to its quota first
    schedule: str = "groups"          # "groups": consecutive groups of K; "public": the public code's trigger
    consolidation_epochs: int = 100
    consolidation_lr: float = 0.005   # chosen on the suite's validation splits (docs/design.md)
    consolidation_batch_size: int = 64
    mixup_alpha: float = 0.0
    mixup: str = "beta"               # mixing weight ~ "beta": Beta(alpha, alpha); "uniform": U(1 - alpha, 1)
    consolidation_sampler: str = "balanced"  # "balanced": equal share per buffer in every minibatch;
                                             # "weighted": draws with replacement, 1/J per buffer, drop_last
    val_fraction: float = 0.0         # validation split carved from the memory (never test data)
    val_split: str = "buffers"        # "buffers": val_fraction of every buffer; "pooled": of all samples at once;
                                      # "public": the public code's fixed-seed split (Memory.split)
    lr_patience: int = 5              # ReduceLROnPlateau patience (epochs) when val_fraction > 0
    early_stopping: int = 0           # stop after this many epochs without improvement (0: never)
    consolidation_ce: str = "seen"    # CE over "seen": all classes seen so far; "task": each sample's task range;
                                      # "span": the batch's classes from its lowest task offset to its highest task end
    full_head: bool = False           # class-IL argmax over the whole head (as the authors' code)
    keep_expert_states: bool = False
    dropout: float = 0.3              # of the default ResMLP backbone
    backbone_inner: int | None = None  # the default ResMLP's width inside its residual blocks (None: 256, as outside)
    losses: str = "fused"             # "fused" | "reference"
    fused_backbone: bool = True       # the default ResMLP trains through the fused CPU kernels
    fused_optimizer: bool = True      # bmc_fast.optim.AdamW (CPU) / torch's fused (CUDA); False: default loop
    fused_step: bool = True           # with all three fused: a whole CPU training step in one C++ call
    base_feature_table_mb: float = 256  # base features of all samples precomputed up to this size (0: per step)
    device: str = "cpu"
    threads: object = "auto"          # "auto": torch's thread count or 1, whichever steps faster now; an int; None: torch's
    seed: int = 0
    progress: bool | None = None      # None: only on a terminal
    preset_name: str = "paper"

    def __post_init__(self):
        self.validate()

    def validate(self):
        def pos_int(name, minimum=1):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
                raise ValueError(f"BMCConfig.{name} must be an int >= {minimum}, got {v!r}")
        for name in ("n_experts", "epochs", "batch_size", "memory_size", "consolidation_batch_size"):
            pos_int(name)
        for name in ("consolidation_epochs", "lr_patience", "early_stopping"):
            pos_int(name, 0)
        for name in ("stability_coef", "task_coef", "distill_coef", "kd_coef", "lr", "weight_decay",
                     "consolidation_lr", "mixup_alpha", "dropout", "base_feature_table_mb"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
                raise ValueError(f"BMCConfig.{name} must be a finite number >= 0, got {v!r}")
        if not (isinstance(self.kd_temperature, (int, float)) and self.kd_temperature > 0):
            raise ValueError(f"BMCConfig.kd_temperature must be > 0, got {self.kd_temperature!r}")
        if not (0 <= self.val_fraction < 1):
            raise ValueError(f"BMCConfig.val_fraction must be in [0, 1), got {self.val_fraction!r}")
        if not (isinstance(self.buffer_size, (int, float)) and self.buffer_size > 0):
            raise ValueError(f"BMCConfig.buffer_size must be > 0 (a count, or a fraction < 1), got {self.buffer_size!r}")
        if self.stability not in ("feature", "weight"):
            raise ValueError(f"BMCConfig.stability must be 'feature' or 'weight', got {self.stability!r}")
        if self.buffer_dtype not in ("float32", "float16"):
            raise ValueError(f"BMCConfig.buffer_dtype must be 'float32' or 'float16', got {self.buffer_dtype!r}")
        choices_of = {"consolidation_ce": ("seen", "task", "span"), "memory_policy": ("cap", "keep"),
                      "schedule": ("groups", "public"), "mixup": ("beta", "uniform"),
                      "consolidation_sampler": ("balanced", "weighted"), "val_split": ("buffers", "pooled", "public")}
        for name, choices in choices_of.items():
            if getattr(self, name) not in choices:
                raise ValueError(f"BMCConfig.{name} must be one of {choices}, got {getattr(self, name)!r}")
        if self.mixup == "uniform" and self.mixup_alpha > 1:
            raise ValueError(f"BMCConfig.mixup_alpha must be <= 1 with mixup='uniform' (weight ~ U(1 - alpha, 1)), "
                             f"got {self.mixup_alpha!r}")
        b = self.backbone_inner
        if not (b is None or (isinstance(b, int) and not isinstance(b, bool) and b >= 1)):
            raise ValueError(f"BMCConfig.backbone_inner must be None or an int >= 1, got {b!r}")
        t = self.threads
        if not (t is None or t == "auto" or (isinstance(t, int) and not isinstance(t, bool) and t >= 1)):
            raise ValueError(f"BMCConfig.threads must be 'auto', an int >= 1 or None, got {t!r}")
        for name in ("fused_backbone", "fused_optimizer", "fused_step", "public_buffer_count"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"BMCConfig.{name} must be True or False, got {getattr(self, name)!r}")
        if self.mixup_alpha > 0 and (self.distill_coef > 0 or self.kd_coef > 0):
            raise ValueError("BMCConfig.mixup_alpha > 0 needs distill_coef = 0 and kd_coef = 0 (mixup mixes the inputs, "
                             "whose stored distillation and KD targets belong to the unmixed inputs)")
        if self.losses not in ("fused", "reference"):
            raise ValueError(f"BMCConfig.losses must be 'fused' or 'reference', got {self.losses!r}")
        try:
            torch.device(self.device)
        except RuntimeError as exc:
            raise ValueError(f"BMCConfig.device: {exc}") from exc
        resolve_parallel(self.parallel, self.device)

    @classmethod
    def preset(cls, name: str, **overrides) -> "BMCConfig":
        """``"paper"``: the method as described (both BMC terms live, parallel experts).

        ``"parity"``: what the BMC authors' public code (fostiropoulos/stream_benchmark) runs; its
        differences from ``"paper"``:

        * ``n_experts=1``: a consolidation after every task (the public default K).
        * ``schedule="public"``: groups {0}, {1..K}, {K+1..2K}, ...; trailing tasks never consolidated.
        * ``public_buffer_count=True``: buffer_size + 1 samples per buffer, from one drop_last pass.
        * ``stability_coef=distill_coef=kd_coef=0``: plain CE on the buffers' labels; experts only pick data.
        * ``mixup="uniform"``, ``mixup_alpha=0.4``: consolidation mixup, one weight per batch ~ U(0.6, 1).
        * ``consolidation_sampler="weighted"``: with replacement, each buffer 1/J, last batch dropped.
        * ``consolidation_ce="span"``: CE from the batch's lowest task offset to its highest task end.
        * ``val_fraction=0.2``, ``val_split="public"``: 20% of all consolidation samples held out, by
          one fixed permutation (seed 42) of the rows listed new buffers first: as many rows of
          each buffer at every consolidation of the same buffer sizes, for every seed.
        * ``lr_patience=10``: ReduceLROnPlateau on the validation loss (no early stopping in either).
        * ``full_head=True``: class-IL argmax over the whole head, unseen tasks' classes included.
        * ``backbone_inner=128``: the ResMLP's residual blocks are 128 wide inside (fc1 to 128,
          fc2 back to 256), as the public code's (on the fused kernels like ``paper``'s).
        * ``consolidation_lr=0.01``: the public code's learning rate on the memory (``paper``: 0.005).

        It also pins ``memory_policy="keep"`` (new buffers in full + kept memory, then
        ceil(memory_size / J) + 1 each), the public code's policy and the ``paper`` default.
        """
        if name == "paper":
            base = {}
        elif name == "parity":
            base = dict(n_experts=1, schedule="public", memory_policy="keep", public_buffer_count=True,
                        stability_coef=0.0, distill_coef=0.0, kd_coef=0.0, mixup="uniform", mixup_alpha=0.4,
                        consolidation_sampler="weighted", consolidation_ce="span", val_fraction=0.2,
                        val_split="public", lr_patience=10, full_head=True, backbone_inner=128,
                        consolidation_lr=0.01)
        else:
            raise ValueError(f"preset must be 'paper' or 'parity', got {name!r}")
        return cls(**{**base, **overrides, "preset_name": name})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
