"""The context every training entry point (``BMC.fit``, each baseline) runs in."""
from __future__ import annotations

import contextlib

from . import seeding
from .threads import ThreadTuner

__all__ = ["training_run"]


@contextlib.contextmanager
def training_run(cfg):
    """The run's own random state (:func:`bmc_fast.train.seeding.private_rng`, seeded from
    ``cfg.seed``) and the thread count its steps choose (:class:`bmc_fast.train.threads.ThreadTuner`
    with ``cfg.threads``); the caller's random state and thread count are restored after."""
    with seeding.private_rng(seeding.derive(cfg.seed, "model_init"), cfg.device), ThreadTuner(cfg.threads):
        yield
