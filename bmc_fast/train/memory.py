"""Expert buffers and the consolidation memory, stored as contiguous tensors.

A :class:`Buffer` is what one expert hands back: a random subset of its task (inputs, global
labels, the task's class range) with the expert's own targets (features, optionally its logits
over the task's range). :class:`Memory` concatenates buffers into single tensors and draws
consolidation minibatches from them. Old samples keep the targets of the experts that made them.

Two memory policies (``BMCConfig.memory_policy``):

* ``"cap"``: before a consolidation, the new buffers join and every buffer is resampled to its
  exact even quota of ``memory_size`` (:meth:`Memory.add`); the consolidation trains on exactly
  that memory, which is also what is kept.
* ``"keep"`` (the public code's): the consolidation trains on the kept memory plus the new
  buffers in full (:meth:`Memory.with_buffers`); afterwards every buffer is cut to
  :func:`keep_quota` = ceil(memory_size / J) + 1 samples (:meth:`Memory.cut`), so
  ``memory_size`` (+ J) bounds what is kept between steps, not what a consolidation sees.

Never imports the compiled extension.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["Buffer", "Memory", "even_quotas", "keep_quota", "buffer_count"]


@dataclass
class Buffer:
    x: torch.Tensor          # [n, ...] inputs, in the stream's dtype (converted per minibatch)
    y: torch.Tensor          # [n] global labels (int64)
    offset: int              # the task's class range [offset, offset + length)
    length: int
    features: torch.Tensor   # [n, F] the expert's features (the distillation targets)
    logits: torch.Tensor | None = None  # [n, length] the expert's logits over the task range
    task: int = 0            # index of the task in the stream

    def __post_init__(self):
        n = self.x.shape[0]
        if self.y.shape != (n,) or self.features.shape[0] != n:
            raise ValueError(f"buffer of task {self.task}: x, y and features must have the same number of rows")
        if self.logits is not None and self.logits.shape != (n, self.length):
            raise ValueError(f"buffer of task {self.task}: logits must have shape [{n}, {self.length}], "
                             f"got {list(self.logits.shape)}")

    def __len__(self):
        return self.x.shape[0]

    def subset(self, idx: torch.Tensor) -> "Buffer":
        return Buffer(self.x[idx], self.y[idx], self.offset, self.length, self.features[idx],
                      None if self.logits is None else self.logits[idx], self.task)

    def nbytes(self) -> int:
        ts = [self.x, self.y, self.features] + ([self.logits] if self.logits is not None else [])
        return sum(t.numel() * t.element_size() for t in ts)


def even_quotas(sizes: list[int], cap: int) -> list[int]:
    """Exact even split of ``cap`` slots over buffers of the given sizes: every buffer gets the
    same quota (the first ``cap % J`` one more); a buffer smaller than its quota keeps all its
    samples and its unused slots are shared among the others (water-filling)."""
    quotas = [0] * len(sizes)
    open_ = [j for j, n in enumerate(sizes) if n > 0]
    left = min(cap, sum(sizes))
    while left > 0 and open_:
        share, extra = divmod(left, len(open_))
        nxt = []
        for r, j in enumerate(open_):
            want = share + (1 if r < extra else 0)
            take = min(want, sizes[j] - quotas[j])
            quotas[j] += take
            left -= take
            if quotas[j] < sizes[j]:
                nxt.append(j)
        if nxt == open_ and share == 0 and extra == 0:
            break
        open_ = nxt
    return quotas


def keep_quota(n_buffers: int, cap: int) -> int:
    """The samples every buffer keeps after a consolidation with ``memory_policy="keep"``:
    ceil(cap / J) + 1, as the public code (the + 1 included: J buffers keep up to cap + J)."""
    return math.ceil(cap / n_buffers) + 1


def buffer_count(n: int, buffer_size: float, batch_size: int, public: bool = False) -> int:
    """How many of a task's ``n`` training samples its buffer keeps: ``buffer_size`` (a count, or
    a fraction of the task when < 1), at most ``n``. ``public`` (``public_buffer_count``): as the
    public code, which fills a buffer from one pass of the task's shuffled drop_last loader and
    stops once it holds more than ``buffer_size``: one more sample, and at most the
    ``floor(n / batch_size) * batch_size`` samples of that pass (a task smaller than one batch,
    which the public code could not buffer, keeps all ``n``)."""
    size = int(round(buffer_size * n)) if isinstance(buffer_size, float) and buffer_size < 1 else int(buffer_size)
    if not public:
        return min(n, size)
    seen = n - n % batch_size if n >= batch_size else n
    return min(seen, size + 1)


class Memory:
    """The consolidation memory: all buffers concatenated into contiguous tensors.

    ``buffer_id[i]`` is the index (0..J-1) of the buffer row i came from; it is the expert id of
    the batched distillation loss.
    """

    def __init__(self, buffers: list[Buffer] | None = None, new: int = 0):
        self.buffers: list[Buffer] = []
        self._pack()
        for b in buffers or []:
            self.buffers.append(b)
        if buffers:
            self._pack()
        if isinstance(new, bool) or not isinstance(new, int) or not 0 <= new <= len(self.buffers):
            raise ValueError(f"Memory: new must be an int in [0, {len(self.buffers)}] (the buffers), got {new!r}")
        # the last ``new`` buffers are the step's new ones (the public code lists them first); set
        # by with_buffers and add for the consolidation that follows, 0 once the memory is cut
        self.new = new

    # -- building -------------------------------------------------------------------------------
    def add(self, new: list[Buffer], cap: int, generator: torch.Generator) -> None:
        """Adds new buffers, then resamples every buffer to its even quota of ``cap``."""
        buffers = self.buffers + list(new)
        quotas = even_quotas([len(b) for b in buffers], cap)
        self.buffers = [b if q == len(b) else b.subset(torch.randperm(len(b), generator=generator)[:q].sort().values)
                        for b, q in zip(buffers, quotas)]
        self.new = len(new)
        self._pack()

    def with_buffers(self, new: list[Buffer]) -> "Memory":
        """A memory of this memory's buffers and ``new`` ones, nothing resampled (``"keep"``)."""
        return Memory(self.buffers + list(new), new=len(new))

    def cut(self, quota: int, generator: torch.Generator) -> None:
        """Every buffer larger than ``quota`` becomes a random subset of ``quota`` of its samples
        (so a buffer cut again keeps a subset of what it kept before)."""
        self.buffers = [b if len(b) <= quota else
                        b.subset(torch.randperm(len(b), generator=generator)[:quota].sort().values)
                        for b in self.buffers]
        self.new = 0
        self._pack()

    def _pack(self) -> None:
        bs = self.buffers
        if not bs:
            self.x = self.y = self.offset = self.length = self.features = self.buffer_id = None
            self.logits = None
            self.starts = [0]
            return
        self.x = torch.cat([b.x for b in bs])
        self.y = torch.cat([b.y for b in bs])
        self.features = torch.cat([b.features for b in bs])
        n = [len(b) for b in bs]
        self.offset = torch.repeat_interleave(torch.tensor([b.offset for b in bs]), torch.tensor(n))
        self.length = torch.repeat_interleave(torch.tensor([b.length for b in bs]), torch.tensor(n))
        self.buffer_id = torch.repeat_interleave(torch.arange(len(bs)), torch.tensor(n))
        self.starts = [0] + torch.tensor(n).cumsum(0).tolist()
        if all(b.logits is not None for b in bs):
            width = max(b.length for b in bs)
            dtype = bs[0].logits.dtype
            self.logits = torch.zeros(len(self.y), width, dtype=dtype)  # compact: [M, max task length]
            for b, s in zip(bs, self.starts):
                self.logits[s:s + len(b), :b.length] = b.logits
        else:
            self.logits = None
        # Each buffer's rows become views of the packed tensors (same values and dtypes), so that
        # its own copy is freed: the memory holds its samples once, not twice.
        for b, s in zip(bs, self.starts):
            rows = slice(s, s + len(b))
            for name, packed in (("x", self.x), ("y", self.y), ("features", self.features)):
                if getattr(b, name).dtype == packed.dtype:
                    setattr(b, name, packed[rows])

    def __len__(self):
        return 0 if self.y is None else len(self.y)

    @property
    def num_buffers(self) -> int:
        return len(self.buffers)

    def nbytes(self) -> int:
        return sum(b.nbytes() for b in self.buffers)

    # -- splitting and sampling -----------------------------------------------------------------
    def split(self, fraction: float, generator: torch.Generator,
              how: str = "buffers") -> tuple["Memory", "Memory", torch.Tensor]:
        """(train, validation, order). ``how``:

        * ``"buffers"``: round(``fraction`` x its size) of every buffer, drawn with ``generator``;
          ``order`` is shuffled, so that validation batches mix the buffers.
        * ``"pooled"``: ceil(``fraction`` x all samples) drawn from all buffers at once with
          ``generator`` (a buffer's share of the validation set varies).
        * ``"public"``: as the public code's ``random_split``: the rows listed as it lists them
          (the step's new buffers first, then the rest; each buffer's rows in a random order
          drawn with ``generator``, as its buffers hold them), one permutation from a generator
          seeded 42 (the same at every consolidation and for every seed), its last
          ceil(``fraction`` x all samples) positions held out. How many rows of each buffer are
          held out is therefore fixed for a given list of buffer sizes; which rows, random.

        ``order`` is the validation memory's row indices in the order they were drawn (the
        public code's validation loader reads them in that order). A buffer left with no sample
        on one side of the split is not on that side.
        """
        n, none = len(self), torch.empty(0, dtype=torch.long)
        if how == "buffers":
            drawn = torch.cat([s + torch.randperm(len(b), generator=generator)[:int(round(len(b) * fraction))]
                               for b, s in zip(self.buffers, self.starts)] + [none])
            drawn = drawn[torch.randperm(len(drawn), generator=generator)]
        elif how == "pooled":
            drawn = torch.randperm(n, generator=generator)[:math.ceil(fraction * n)]
        elif how == "public":
            rows = [s + torch.randperm(len(b), generator=generator) for b, s in zip(self.buffers, self.starts)]
            first_new = len(self.buffers) - self.new
            listed = torch.cat(rows[first_new:] + rows[:first_new] + [none])
            drawn = listed[torch.randperm(n, generator=torch.Generator().manual_seed(42))[n - math.ceil(fraction * n):]]
        else:
            raise ValueError(f"Memory.split: how must be 'buffers', 'pooled' or 'public', got {how!r}")
        held = torch.zeros(n, dtype=torch.bool)
        held[drawn] = True
        train, val = [], []
        for b, s in zip(self.buffers, self.starts):
            m = held[s:s + len(b)]
            val.append(b.subset(m.nonzero().squeeze(1)))
            train.append(b.subset((~m).nonzero().squeeze(1)))
        # the validation memory holds the drawn rows in ascending order: a drawn row's index there
        # is its rank among them
        order = torch.searchsorted(drawn.sort().values, drawn)
        return Memory([b for b in train if len(b)]), Memory([b for b in val if len(b)]), order

    def weighted_indices(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """One epoch of minibatch indices [S, B], S = floor(len / B), as the public code's sampler:
        every index drawn independently, with replacement, with probability inverse to the size
        of its buffer (so each buffer has probability 1/J, whatever its size); the ragged last
        batch is dropped."""
        steps = len(self) // batch_size
        if steps == 0:
            return torch.empty(0, batch_size, dtype=torch.long)
        sizes = torch.tensor([len(b) for b in self.buffers], dtype=torch.float64)
        weights = torch.index_select(1.0 / sizes, 0, self.buffer_id)
        return torch.multinomial(weights, steps * batch_size, replacement=True, generator=generator).view(steps,
                                                                                                          batch_size)

    def balanced_indices(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """One epoch of minibatch indices [S, B], S = ceil(len / B): every minibatch takes an equal
        share from each buffer (the remainder rotating over buffers), each buffer cycling through
        its own random permutations."""
        j = self.num_buffers
        if j == 0 or len(self) == 0:
            return torch.empty(0, batch_size, dtype=torch.long)
        steps = -(-len(self) // batch_size)
        share, extra = divmod(batch_size, j)
        rows = []
        for r, b in enumerate(self.buffers):
            need = []
            for s in range(steps):  # which buffers get one extra sample rotates with the step
                need.append(share + (1 if (r - s * extra) % j < extra else 0))
            total = sum(need)
            n = len(b)
            reps = -(-total // n)
            perm = torch.cat([torch.randperm(n, generator=generator) for _ in range(reps)])[:total] + self.starts[r]
            rows.append((need, perm))
        out = torch.empty(steps, batch_size, dtype=torch.long)
        for s in range(steps):
            cols = []
            for need, perm in rows:
                k = need[s]
                cols.append(perm[:k])
            idx = torch.cat(cols)
            out[s] = idx
            rows = [(need, perm[need[s]:]) for need, perm in rows]
        return out

    def batch(self, idx: torch.Tensor, num_classes: int, device) -> dict:
        """The minibatch of rows ``idx`` on ``device``; ``teacher_logits`` are laid out over the
        full head (zeros outside each row's range, which the masked KD loss never reads)."""
        # index_select, not t[idx]: advanced indexing costs ~3x more at minibatch sizes
        idx = idx.reshape(-1)
        off, ln = torch.index_select(self.offset, 0, idx), torch.index_select(self.length, 0, idx)
        out = {
            "x": torch.index_select(self.x, 0, idx).to(device, non_blocking=True).float(),
            "y": torch.index_select(self.y, 0, idx).to(device),
            "offset": off.to(device),
            "length": ln.to(device),
            "features": torch.index_select(self.features, 0, idx).to(device).float(),
            "buffer_id": torch.index_select(self.buffer_id, 0, idx).to(device),
        }
        if self.logits is not None:
            compact = torch.index_select(self.logits, 0, idx).float()
            full = torch.zeros(len(idx), num_classes)
            cols = off[:, None] + torch.arange(compact.shape[1])[None]
            mask = torch.arange(compact.shape[1])[None] < ln[:, None]
            rows = torch.arange(len(idx))[:, None].expand_as(cols)
            full[rows[mask], cols[mask]] = compact[mask]
            out["teacher_logits"] = full.to(device)
        return out

    # -- checkpoints ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"buffers": [{"x": b.x, "y": b.y, "offset": b.offset, "length": b.length, "features": b.features,
                             "logits": b.logits, "task": b.task} for b in self.buffers]}

    @classmethod
    def from_state_dict(cls, state: dict) -> "Memory":
        return cls([Buffer(**b) for b in state["buffers"]])
