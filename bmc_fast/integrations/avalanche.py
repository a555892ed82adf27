"""bmc_fast and Avalanche (avalanche-lib 0.6, the ``[avalanche]`` extra): streams as Avalanche
benchmarks, bmc_fast's backbone as an Avalanche model, and Avalanche's own strategies run on a
:class:`~bmc_fast.data.TaskStream` with a :class:`~bmc_fast.BMCConfig`'s recipe, scored with the
same accuracy matrices as bmc_fast's methods.

* :func:`benchmark_from_stream`: a ``TaskStream`` as an Avalanche benchmark (one experience per
  task, the stream's global class ids, task label 0: class-incremental).
* :class:`LogitsModel`: a ``(logits, features)`` model as Avalanche's strategies expect it
  (``forward`` returns the logits; the features of the last forward are kept in ``.features``).
* :func:`fit_strategy`: Avalanche's Naive, Replay, DER, LwF or GDumb (their classes, their
  training loop) on a stream, evaluated after every task: a :class:`bmc_fast.Result`.
* :class:`BMCStrategy`: BMC as an Avalanche strategy (``train(experiences)``, ``eval(stream)``,
  Avalanche's plugins, evaluator and loggers), training through :meth:`bmc_fast.BMC.fit_step`.
* :class:`StabilityPlugin`, :class:`BatchedDistillationPlugin`, :class:`TaskMaskedCrossEntropy`:
  bmc_fast's fused losses in any Avalanche strategy (Naive, Replay, ...).

Importing this module imports Avalanche; ``import bmc_fast`` never does.
"""
from __future__ import annotations

import json
import time
import warnings

import torch
from torch import nn

try:
    with warnings.catch_warnings():  # qpsolvers (a dependency of Avalanche) warns at import when no QP solver
        warnings.filterwarnings("ignore", message="no QP solver found", category=UserWarning)
        import avalanche
        from avalanche.benchmarks import tensors_benchmark
        from avalanche.core import SupervisedPlugin
        from avalanche.training.plugins import EvaluationPlugin
        from avalanche.training.templates import SupervisedTemplate
        from avalanche.training.utils import trigger_plugins
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("bmc_fast.integrations.avalanche needs Avalanche: pip install \"bmc_fast[avalanche]\" "
                      f"(avalanche-lib and a torchvision that matches your torch): {exc}") from exc

from ..train.metrics import Result, evaluate_rows
from ..train.run import training_run

__all__ = ["benchmark_from_stream", "LogitsModel", "STRATEGIES", "fit_strategy", "AVALANCHE_VERSION", "BMCStrategy",
           "initial_model", "StabilityPlugin", "BatchedDistillationPlugin", "TaskMaskedCrossEntropy"]

AVALANCHE_VERSION = avalanche.__version__
# Avalanche's strategies in the accuracy suite, with the arguments each takes beyond the shared
# recipe: their published defaults (DER: alpha 0.1, beta 0.5; LwF: the plugin's alpha 1,
# temperature 2).
STRATEGIES = ("naive", "replay", "der", "lwf", "gdumb")


def benchmark_from_stream(stream):
    """The Avalanche benchmark of a :class:`~bmc_fast.data.TaskStream`: ``train_stream`` and
    ``test_stream`` with one experience per task, in order; inputs as float32, labels the
    stream's global class ids (task t's local label c becomes ``stream.offsets[t] + c``), task
    label 0 everywhere (class-incremental: Avalanche's metrics report them as Task000)."""
    from ..data import TaskStream

    if not isinstance(stream, TaskStream):
        raise TypeError(f"stream must be a bmc_fast.data.TaskStream, got {type(stream).__name__}")
    train = [(t.x_train.float(), t.y_train.long() + o) for t, o in zip(stream, stream.offsets)]
    test = [(t.x_test.float(), t.y_test.long() + o) for t, o in zip(stream, stream.offsets)]
    return tensors_benchmark(train_tensors=train, test_tensors=test, task_labels=[0] * len(stream))


class LogitsModel(nn.Module):
    """A model returning ``(logits, features)`` (bmc_fast's :class:`~bmc_fast.ResMLP`, any
    ``model_fn``'s) as Avalanche's strategies and metrics expect it: ``forward(x)`` returns the
    logits; ``features`` holds the features of the last forward (for loss plugins). ``module``
    is the wrapped model, whose ``state_dict`` keys are this one's under ``module.``."""

    def __init__(self, module: nn.Module):
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
        self.module = module
        self.features: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.module(x)
        if not (isinstance(out, tuple) and len(out) == 2):
            raise ValueError("LogitsModel: the wrapped model must return (logits [N, C], features [N, D])")
        logits, self.features = out
        return logits

    def __deepcopy__(self, memo):  # Avalanche copies models (LwF, GDumb): not the last batch's features
        import copy

        new = LogitsModel(copy.deepcopy(self.module, memo))
        new.train(self.training)
        return new


def _quiet_evaluator():
    """An evaluator with no metric and no logger: the suite scores with bmc_fast's matrices."""
    with warnings.catch_warnings():  # Avalanche warns that an evaluator without loggers logs nothing
        warnings.filterwarnings("ignore", message="No loggers specified", category=UserWarning)
        return EvaluationPlugin(loggers=[])


def _strategy(name: str, model: nn.Module, cfg, plugins, evaluator):
    from avalanche.training import DER, GDumb, LwF, Naive, Replay

    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    common = dict(model=model, optimizer=optimizer, criterion=nn.CrossEntropyLoss(), train_mb_size=cfg.batch_size,
                  train_epochs=cfg.epochs, eval_mb_size=1024, device=cfg.device, plugins=list(plugins),
                  evaluator=evaluator)
    if name == "naive":
        return Naive(**common)
    if name == "replay":
        return Replay(mem_size=cfg.memory_size, **common)
    if name == "der":
        return DER(mem_size=cfg.memory_size, alpha=0.1, beta=0.5, **common)
    if name == "lwf":
        return LwF(alpha=1.0, temperature=2.0, **common)
    # GDumb trains only on its memory, as bmc_fast's gdumb: with the consolidation recipe
    common.update(train_epochs=cfg.consolidation_epochs, train_mb_size=cfg.consolidation_batch_size)
    common["optimizer"] = torch.optim.AdamW(model.parameters(), lr=cfg.consolidation_lr, weight_decay=cfg.weight_decay)
    return GDumb(mem_size=cfg.memory_size, **common)


def fit_strategy(name: str, stream, cfg, model_fn=None, plugins=(), evaluator=None) -> Result:
    """Avalanche's strategy ``name`` (:data:`STRATEGIES`: its ``Naive``, ``Replay``, ``DER``,
    ``LwF`` or ``GDumb`` class and training loop) on ``stream`` with ``cfg``'s recipe: the
    model ``model_fn(input_dim, num_classes)`` (default: the trainer's ResMLP) with the initial
    weights every bmc_fast method gets with ``cfg.seed``, AdamW (``cfg.lr``, ``cfg.weight_decay``),
    ``cfg.epochs`` epochs of ``cfg.batch_size`` rows per experience, a memory of
    ``cfg.memory_size`` samples (Replay, DER, GDumb); GDumb trains on its memory with the
    consolidation recipe (``consolidation_epochs``, ``consolidation_lr``,
    ``consolidation_batch_size``), as bmc_fast's ``gdumb``. Avalanche's randomness is seeded
    with ``cfg.seed`` (its ``RNGManager``) inside the run's private random state; the caller's
    global random state is left as it was.

    After every experience the model is evaluated by :func:`bmc_fast.train.metrics.evaluate_rows`
    (the matrices of every bmc_fast method: class-IL over the classes seen so far, task-IL in each
    task's range). ``plugins`` are added to the strategy's; ``evaluator`` (default: no metrics,
    no loggers) is Avalanche's ``EvaluationPlugin``."""
    from ..train.loop import BMC

    if name not in STRATEGIES:
        raise ValueError(f"name must be one of {', '.join(STRATEGIES)}, got {name!r}")
    bench = benchmark_from_stream(stream)
    model_fn = model_fn or BMC(cfg).model_fn
    t_start = time.perf_counter()
    with training_run(cfg):
        from avalanche.training.determinism.rng_manager import RNGManager

        RNGManager.set_random_seeds(cfg.seed)
        model = LogitsModel(model_fn(stream.input_dim, stream.num_classes).to(cfg.device))
        strategy = _strategy(name, model, cfg, plugins, evaluator or _quiet_evaluator())
        result = Result.empty([t.name for t in stream], step_starts=list(range(len(stream))), method=f"avalanche-{name}",
                              config={**cfg.to_dict(), "avalanche": {"strategy": name, "version": AVALANCHE_VERSION}})
        train_s = eval_s = 0.0
        for t, experience in enumerate(bench.train_stream):
            t0 = time.perf_counter()
            strategy.train(experience)
            t1 = time.perf_counter()
            trained = strategy.model.module  # GDumb trains a fresh copy every experience
            cil, til = evaluate_rows(trained, stream, [t], cfg.device, cfg.full_head)[t]
            result.cil_matrix[t, : t + 1], result.til_matrix[t, : t + 1] = cil, til
            train_s, eval_s = train_s + t1 - t0, eval_s + time.perf_counter() - t1
    result.timings = {"train_s": train_s, "evaluation_s": eval_s, "total_s": time.perf_counter() - t_start}
    return result


# -- BMC as an Avalanche strategy -----------------------------------------------------------------

def initial_model(config, input_dim: int, num_classes: int) -> nn.Module:
    """The model :meth:`bmc_fast.BMC.fit` starts from with ``config`` (its backbone and seed):
    hand it to :class:`BMCStrategy` to train what ``fit`` trains."""
    from ..train.loop import BMC

    with training_run(config):
        return BMC(config).model_fn(input_dim, num_classes).to(config.device)


def _no_transform(groups) -> bool:
    """Whether Avalanche transform groups change nothing in their current group."""
    if groups is None:
        return True
    t = groups.transform_groups.get(groups.current_group)
    return t is None or (type(t).__name__ == "TupleTransform" and all(f is None for f in t.transforms))


def _plain_inputs(data, rows: torch.Tensor | None):
    """The inputs of ``rows`` (None: all, not copied) of an Avalanche dataset layer, read straight
    from the tensors under it, or None where a layer transforms, concatenates or is not made of
    tensors (the caller then reads item by item)."""
    if isinstance(data, torch.utils.data.TensorDataset):
        x = data.tensors[0]
        return x if rows is None else x[rows]
    flat = getattr(data, "_flat_data", data)
    inner = getattr(flat, "_datasets", None)
    if inner is None or len(inner) != 1 or not (_no_transform(getattr(flat, "_transform_groups", None))
                                                and _no_transform(getattr(flat, "_frozen_transform_groups", None))):
        return None
    indices = getattr(flat, "_indices", None)
    if indices is not None:
        indices = torch.as_tensor(list(indices), dtype=torch.long)
        rows = indices if rows is None else indices[rows]
    return _plain_inputs(inner[0], rows)


def _experience_tensors(experience) -> tuple[torch.Tensor, torch.Tensor]:
    """All (x, y) of an experience's dataset, in its order, as the dataset serves them. The
    inputs straight from its tensors where the dataset is a plain view of them (a benchmark made
    from tensors, with no transform) and the labels from its ``targets`` (the class ids as the
    benchmark serves them: ``class_ids_from_zero_from_first_exp`` remaps them above the tensors);
    else both item by item through a DataLoader."""
    ds = experience.dataset
    try:
        x = _plain_inputs(ds, None)
        y = torch.as_tensor(list(ds.targets), dtype=torch.long) if x is not None else None
    except (AttributeError, TypeError, IndexError, ValueError):
        x = y = None
    if x is not None and x.shape[0] == len(ds) and y.shape == (len(ds),):
        return x, y
    loader = torch.utils.data.DataLoader(experience.dataset, batch_size=4096, shuffle=False)
    xs, ys = [], []
    for batch in loader:
        xs.append(batch[0])
        ys.append(torch.as_tensor(batch[1]))
    return torch.cat(xs), torch.cat(ys).long()


def _classes(experience, seen: int, where: str) -> tuple[int, int]:
    """(offset, count) of an experience whose classes are the next contiguous range from ``seen``,
    or a one-line error."""
    classes = sorted(int(c) for c in experience.classes_in_this_experience)
    if classes != list(range(seen, seen + len(classes))) or len(classes) < 2:
        raise ValueError(f"{where}: experience {experience.current_experience} has classes {classes}, not the "
                         f"next contiguous range of two or more from {seen}: BMC gives every task the next range "
                         "of one head (build the benchmark with class ids in order of appearance, e.g. "
                         "nc_benchmark(..., class_ids_from_zero_from_first_exp=True))")
    return seen, len(classes)


def _placeholder(name: str, num_classes: int, shape):
    """A learned task kept as its class range: one zero row of the stream's input shape."""
    from ..data import Task

    one = torch.zeros((1,) + tuple(shape))
    return Task(name, one, torch.zeros(1, dtype=torch.long), one[:0], torch.zeros(0, dtype=torch.long), num_classes)


class BMCStrategy(SupervisedTemplate):
    """Batch Model Consolidation as an Avalanche strategy.

    Keyword arguments only, as Avalanche's strategies. ``model`` returns ``(logits, features)`` (or is a :class:`LogitsModel`; e.g.
    :func:`initial_model`); its head covers every class of the benchmark. ``config`` is a
    :class:`bmc_fast.BMCConfig` (default: the ``paper`` preset): ``n_experts`` (K), epochs,
    memory and the rest; training runs through the same stacked experts, one-call step and
    consolidation as :meth:`bmc_fast.BMC.fit` (:meth:`bmc_fast.BMC.fit_step`), with its own
    optimizers (AdamW as the config says), so no ``optimizer`` is taken.

    ``train(experiences)`` learns the experiences in incremental steps of K, in order, each
    ending with a consolidation; the last step of a call may hold fewer. So
    ``train(benchmark.train_stream)`` is ``BMC.fit`` (the same model, bit for bit, from the same
    initial model), and ``for e in train_stream: train(e)`` is BMC with K = 1; pass K
    experiences a call to keep K experts. Experiences carry global class ids, each experience
    the next contiguous range (a clear error otherwise). ``eval(stream)``, ``plugins``,
    ``evaluator`` (metrics and loggers) work as in every Avalanche strategy; training fires
    ``before/after_training`` and ``before/after_training_exp`` (no iteration or epoch
    callbacks: the steps run inside the trainer, so training-phase metrics such as
    ``accuracy_metrics(epoch=True)`` stay empty; evaluation metrics are complete). An
    experience that cannot be learned (classes out of order, one already learned, a head too
    small, a model not returning ``(logits, features)``) is refused with a one-line error before
    anything changes. Checkpoints: :meth:`save` / :meth:`load`
    (weights-only files); Avalanche's ``save_checkpoint`` pickles the whole strategy with dill,
    and loading that runs code."""

    def __init__(self, *, model: nn.Module, config=None, eval_mb_size: int = 1024, plugins=None, evaluator=None,
                 **base_kwargs):
        from .. import BMCConfig
        from ..train.loop import BMC

        taken = {"optimizer": "BMC builds its own AdamW optimizers (BMCConfig.lr, weight_decay)",
                 "criterion": "BMC's losses are set by BMCConfig", "train_epochs": "set BMCConfig.epochs",
                 "train_mb_size": "set BMCConfig.batch_size", "device": "set BMCConfig.device"}
        for key in base_kwargs:
            if key in taken:
                raise TypeError(f"BMCStrategy takes no {key!r}: {taken[key]}")
        config = BMCConfig.preset("paper") if config is None else config
        if not isinstance(config, BMCConfig):
            raise TypeError(f"config must be a bmc_fast.BMCConfig, got {type(config).__name__}")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module returning (logits, features), got {type(model).__name__}")
        wrapped = model if isinstance(model, LogitsModel) else LogitsModel(model)
        placeholder = torch.optim.SGD(wrapped.parameters(), lr=0.0)  # BMC makes its own AdamW optimizers
        super().__init__(model=wrapped, optimizer=placeholder, train_mb_size=config.batch_size,
                         train_epochs=config.epochs, eval_mb_size=eval_mb_size, device=config.device,
                         plugins=plugins, evaluator=evaluator or _quiet_evaluator(), **base_kwargs)
        self.bmc = BMC(config)
        self.bmc.model = wrapped.module
        self._tasks: list = []
        self.timings: dict = {}

    @property
    def config(self):
        return self.bmc.config

    def _check_group(self, group: list) -> None:
        """One-line errors for experiences this strategy cannot learn, before anything changes."""
        seen = self._tasks[-1][1] + self._tasks[-1][2].num_classes if self._tasks else 0
        done = {e for e, _, _ in self._tasks}
        for experience in group:
            if not hasattr(experience, "dataset") or not hasattr(experience, "classes_in_this_experience"):
                raise TypeError(f"BMCStrategy.train takes Avalanche experiences (with a dataset and "
                                f"classes_in_this_experience), got {type(experience).__name__}")
            if experience.current_experience in done:
                raise ValueError(f"BMCStrategy.train: experience {experience.current_experience} was already "
                                 "learned; experiences come once each, in order")
            seen += _classes(experience, seen, "BMCStrategy.train")[1]
            done.add(experience.current_experience)
        ds = group[0].dataset
        x = torch.stack([torch.as_tensor(ds[i][0]) for i in range(min(2, len(ds)))]).float().to(self.config.device)
        model = self.bmc.model
        was = model.training
        with torch.no_grad():
            out = model.eval()(x)
        model.train(was)
        if not (isinstance(out, tuple) and len(out) == 2 and all(isinstance(o, torch.Tensor) for o in out)
                and out[0].dim() == 2 and out[0].shape[0] == len(x)):
            got = type(out).__name__ if not isinstance(out, tuple) else f"a tuple of {len(out)}"
            raise ValueError(f"BMCStrategy: the model must return (logits [N, C], features [N, D]), got {got}")
        if out[0].shape[1] < seen:
            raise ValueError(f"BMCStrategy: the model's head has {out[0].shape[1]} classes, the experiences so far "
                             f"{seen}: build the model for every class of the benchmark")
        self._head = out[0].shape[1]

    def _add_task(self, experience) -> None:
        from ..data import Task

        seen = self._tasks[-1][1] + self._tasks[-1][2].num_classes if self._tasks else 0
        offset, count = _classes(experience, seen, "BMCStrategy.train")
        x, y = _experience_tensors(experience)
        name = f"experience-{experience.current_experience}"
        while any(t.name == name for _, _, t in self._tasks):
            name += "'"
        self._tasks.append((experience.current_experience, offset, Task(name, x, y - offset, x[:0], y[:0], count)))

    def _forget_data(self, shape) -> None:
        """Keeps the tasks learned as their class ranges only (the memory holds what BMC keeps of
        their samples): one-row placeholders hold the stream's offsets for the steps to come."""
        self._tasks = [(e, o, _placeholder(t.name, t.num_classes, shape)) for e, o, t in self._tasks]

    def train(self, experiences, eval_streams=None, **kwargs):
        """Learns ``experiences`` (one, or a sequence) in steps of ``n_experts``; returns the
        evaluator's last metrics. ``eval_streams`` is accepted as in Avalanche's strategies and
        not used: BMC evaluates when :meth:`eval` is called."""
        from ..data import TaskStream

        group = [experiences] if hasattr(experiences, "dataset") else list(experiences)
        if not group:
            raise ValueError("BMCStrategy.train: no experience to train on")
        self._check_group(group)
        self.is_training = True
        try:
            self._before_training(**kwargs)
            k = self.config.n_experts
            for start in range(0, len(group), k):
                step = group[start:start + k]
                first = len(self._tasks)
                for experience in step:
                    self._add_task(experience)
                stream = TaskStream([t for _, _, t in self._tasks])
                for self.experience in step:
                    trigger_plugins(self, "before_training_exp", **kwargs)
                times = self.bmc.fit_step(stream, list(range(first, len(self._tasks))), num_classes=self._head)
                for key, v in times.items():
                    self.timings[key] = self.timings.get(key, 0.0) + v
                self.model.module = self.bmc.model
                self._forget_data(stream[first].input_shape)
                for self.experience in step:
                    trigger_plugins(self, "after_training_exp", **kwargs)
            self._after_training(**kwargs)
        finally:
            self._train_cleanup()
            self.is_training = False
        return self.evaluator.get_last_metrics()

    def save(self, path: str) -> None:
        """Writes the model, memory and the place in the stream, atomically, to a weights-only
        file (:meth:`load` continues where it stopped: the experiences seen are kept only as
        their classes, the memory holds what BMC keeps)."""
        from ..train.checkpoint import save_checkpoint

        tasks = [(e, o, t.num_classes, t.name) for e, o, t in self._tasks]
        save_checkpoint({"model": {n: v.detach().cpu() for n, v in self.bmc.model.state_dict().items()},
                         "memory": self.bmc.memory.state_dict(), "next_step": self.bmc._next_step,
                         "tasks": json.dumps(tasks), "config": json.dumps(self.config.to_dict())}, path)

    def load(self, path: str) -> None:
        """Restores what :meth:`save` wrote (``torch.load(weights_only=True)``: no code runs)."""
        from ..train.checkpoint import load_checkpoint
        from ..train.memory import Memory

        state = load_checkpoint(path)
        if json.loads(state["config"]) != json.loads(json.dumps(self.config.to_dict())):
            raise ValueError(f"checkpoint {path} was made with a different BMCConfig")
        self.bmc.model.load_state_dict(state["model"])
        self.bmc.memory = Memory.from_state_dict(state["memory"])
        self.bmc._next_step = int(state["next_step"])
        shape = tuple(self.bmc.memory.buffers[0].x.shape[1:]) if self.bmc.memory.buffers else (1,)
        self._tasks = [(e, o, _placeholder(name, n, shape)) for e, o, n, name in json.loads(state["tasks"])]
        self.bmc._next_task = len(self._tasks)


# -- bmc_fast's losses as Avalanche plugins ---------------------------------------------------------

def _features(strategy) -> torch.Tensor:
    feats = getattr(strategy.model, "features", None)
    if feats is None:
        raise ValueError("bmc_fast's loss plugins need the model's features: wrap a model returning "
                         "(logits, features) in bmc_fast.integrations.avalanche.LogitsModel")
    return feats


def _frozen(model: nn.Module) -> nn.Module:
    import copy

    frozen = copy.deepcopy(model).eval()
    for p in frozen.parameters():
        p.requires_grad_(False)
    return frozen


def _check_coef(name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
        raise ValueError(f"{name} must be a number >= 0, got {v!r}")
    return float(v)


class StabilityPlugin(SupervisedPlugin):
    """BMC's stability loss in any Avalanche strategy: from the second experience on, every
    training step adds ``coef * bmc_fast.stability_loss(features, base_features)``, the mean
    squared distance of the model's features on the step's rows (replayed rows included) to
    those of a frozen copy of the model taken before the experience (in eval mode). The model
    is a :class:`LogitsModel`."""

    def __init__(self, coef: float = 1.0):
        super().__init__()
        self.coef = _check_coef("coef", coef)
        self.base: nn.Module | None = None
        self._experiences = 0

    def before_training_exp(self, strategy, **kwargs):
        self.base = _frozen(strategy.model) if self._experiences else None
        self._experiences += 1

    def before_backward(self, strategy, **kwargs):
        if self.base is None or not self.coef:
            return
        import bmc_fast

        feats = _features(strategy)
        with torch.no_grad():
            self.base(strategy.mb_x)
        strategy.loss = strategy.loss + self.coef * bmc_fast.stability_loss(feats[None], self.base.features[None])

    def after_training_exp(self, strategy, **kwargs):
        self.base = None


class BatchedDistillationPlugin(SupervisedPlugin):
    """BMC's batched distillation in any Avalanche strategy. After each experience a buffer of
    its rows is kept with the features the model gives them then (eval mode): ``mem_size``
    samples in all, an even share per experience (:class:`bmc_fast.train.baselines.TaskEndBuffer`).
    From the second experience on, every training step draws ``batch_size_mem`` (default: the
    strategy's minibatch) stored rows, runs the model on them and adds ``coef *
    bmc_fast.batched_distillation_loss(features, stored features, experience ids)`` (one mean
    squared error per experience, summed), as BMC's consolidation does over its buffers."""

    def __init__(self, coef: float = 1.0, mem_size: int = 200, batch_size_mem: int | None = None, seed: int = 0):
        super().__init__()
        from ..train.baselines import TaskEndBuffer

        self.coef = _check_coef("coef", coef)
        if batch_size_mem is not None and (isinstance(batch_size_mem, bool) or not isinstance(batch_size_mem, int)
                                           or batch_size_mem < 1):
            raise ValueError(f"batch_size_mem must be None or an int >= 1, got {batch_size_mem!r}")
        self.batch_size_mem = batch_size_mem
        self.generator = torch.Generator().manual_seed(seed)
        self.buffer = TaskEndBuffer(mem_size, "task", torch.Generator().manual_seed(seed + 1))
        self._experiences = 0

    def before_backward(self, strategy, **kwargs):
        if not len(self.buffer) or not self.coef:
            return
        import bmc_fast

        n = self.batch_size_mem or strategy.train_mb_size
        j = self.buffer.sample(n, self.generator)
        device = strategy.device
        x, ids, target = self.buffer.x[j].float().to(device), self.buffer.y[j].to(device), self.buffer.logits[j]
        batch_features = _features(strategy)
        strategy.model(x)
        feats = _features(strategy)
        strategy.model.features = batch_features  # the minibatch's, for the plugins after this one
        loss = bmc_fast.batched_distillation_loss(feats, target.to(device, feats.dtype), ids, self._experiences)
        strategy.loss = strategy.loss + self.coef * loss

    def after_training_exp(self, strategy, **kwargs):
        x, _ = _experience_tensors(strategy.experience)
        model = strategy.model
        was = model.training
        model.eval()
        feats = []
        with torch.no_grad():
            for xs in x.split(2048):
                model(xs.to(strategy.device))
                feats.append(_features(strategy).float().cpu())
        model.train(was)
        feats = torch.cat(feats)
        self.buffer.add_task(self._experiences, x, torch.full((len(x),), self._experiences), feats)
        self._experiences += 1


class TaskMaskedCrossEntropy(SupervisedPlugin):
    """bmc_fast's fused ``task_masked_cross_entropy`` as an Avalanche criterion (pass it as the
    strategy's ``criterion``; it is a plugin too, and follows the experiences). ``classes="seen"``:
    the CE over the classes ``[0, highest class id met in training + 1)`` (class-incremental, the
    default; with class ids in order of appearance, exactly the classes met); ``"task"``:
    over the range of the experience each row's label belongs to (experiences must carry
    contiguous class ranges). Labels are the benchmark's global class ids."""

    def __init__(self, classes: str = "seen"):
        super().__init__()
        if classes not in ("seen", "task"):
            raise ValueError(f"classes must be 'seen' or 'task', got {classes!r}")
        self.classes = classes
        self.seen = 0
        self.starts: list[int] = []  # the first class id of every experience range, in order

    def before_training_exp(self, strategy, **kwargs):
        classes = sorted(int(c) for c in strategy.experience.classes_in_this_experience)
        if self.classes == "task":
            if classes != list(range(classes[0], classes[0] + len(classes))):
                raise ValueError(f"TaskMaskedCrossEntropy(classes='task'): experience "
                                 f"{strategy.experience.current_experience} has classes {classes}, not a contiguous range")
            if classes[0] not in self.starts:
                self.starts.append(classes[0])
                self.starts.sort()
        self.seen = max(self.seen, classes[-1] + 1)

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        import bmc_fast

        labels = labels.long()
        if self.classes == "seen" or not self.starts:
            seen = self.seen or logits.shape[1]
            return bmc_fast.task_masked_cross_entropy(logits, labels, 0, seen)
        starts = torch.tensor(self.starts + [max(self.seen, self.starts[-1] + 1)], device=labels.device)
        i = torch.bucketize(labels, starts, right=True) - 1
        offset = starts[i.clamp(0, len(self.starts) - 1)]
        length = starts[(i + 1).clamp(1, len(self.starts))] - offset
        return bmc_fast.task_masked_cross_entropy(logits, labels, offset, length)
