"""Training and validation batches: which items of a map-style dataset each process reads,
in which order, and where the stream stands (so a resumed run reads exactly what an
uninterrupted one would have).

    train_batches = Batches(dataset, batch_size, seed, env, collate_fn=...)   # endless, resumable
    x, y = next(train_batches)                                              # one micro-batch
    val = eval_batches(val_dataset, batch_size, max_batches, env)           # the same every time

Under DDP each process takes its slice of every global batch, so N processes see exactly
what one process with an N times larger batch sees.
"""
import contextlib
import signal

import numpy as np
import torch

from corpus import DataError


def epoch_batches(n_items, batch_size, seed, epoch, rank, world_size):
    """This rank's micro-batches for one epoch: an array (n_batches, batch_size) of item
    indices. The seeded order is cut into global batches of batch_size * world_size and each
    rank takes its slice, so N processes see exactly what one process with an N times
    larger batch sees. The last incomplete global batch is dropped."""
    global_batch = batch_size * world_size
    n_global = n_items // global_batch
    if n_global == 0:
        raise DataError(f"{n_items} training items are fewer than one global batch of {global_batch}")
    order = np.random.default_rng([seed, epoch]).permutation(n_items)
    return order[:n_global * global_batch].reshape(n_global, world_size, batch_size)[:, rank]


class Batches:
    """An endless, resumable stream of this rank's training micro-batches over a map-style
    dataset. The position (epoch, batches taken) is the whole state: resuming replays the
    same order from that point. make_epoch(epoch) may replace the default shuffled order
    (e.g. length-grouped batches): it returns this rank's batches of item indices (a list of
    lists or a 2-D array) and must be deterministic in epoch."""

    def __init__(self, dataset, batch_size, seed, env, collate_fn=None, num_workers=0, make_epoch=None):
        self.dataset, self.collate_fn, self.num_workers = dataset, collate_fn, num_workers
        self.pin_memory = env.device.type == "cuda"  # lets the host-to-GPU copies run asynchronously
        self.make_epoch = make_epoch or (lambda epoch: epoch_batches(
            len(dataset), batch_size, seed, epoch, env.rank, env.world_size))
        self.batches_per_epoch = len(self.make_epoch(0))
        self.epoch, self.taken = 0, 0
        self._it = None

    def state_dict(self):
        return {"epoch": self.epoch, "taken": self.taken}

    def load_state_dict(self, state):
        self.epoch, self.taken = int(state["epoch"]), int(state["taken"])
        self._it = None

    def _start_epoch(self):
        remaining = self.make_epoch(self.epoch)[self.taken:]
        # Its own generator: a DataLoader otherwise draws worker seeds from the global RNG,
        # which would shift dropout noise after a resume.
        loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=remaining, collate_fn=self.collate_fn,
                                             num_workers=self.num_workers, pin_memory=self.pin_memory,
                                             generator=torch.Generator().manual_seed(self.epoch))
        self._it = iter(loader)

    def __iter__(self):
        return self

    def __next__(self):
        if self._it is None:
            self._start_epoch()
        try:
            batch = self._next_from_loader()
        except StopIteration:
            self.epoch, self.taken = self.epoch + 1, 0
            self._start_epoch()
            batch = self._next_from_loader()
        self.taken += 1
        return batch

    def _next_from_loader(self):
        with naming_worker_deaths(self):
            return next(self._it)

    def stop_workers(self):
        """End the DataLoader's worker processes now (and torch's watch over them)."""
        it, self._it = self._it, None
        try:
            getattr(it, "_shutdown_workers", lambda: None)()
        except RuntimeError:  # torch reports a dead worker again while it stops the others
            pass


@contextlib.contextmanager
def naming_worker_deaths(batches):
    """A DataLoader worker that dies (the kernel kills the largest process when memory runs
    out) makes torch raise RuntimeError in the main process, in next() or, from its SIGCHLD
    handler, wherever the main process is: turn it into one line naming the data."""
    try:
        yield
    except (RuntimeError, ConnectionError, EOFError) as e:  # "DataLoader worker (pid N) is killed by signal: Killed."
        if not batches.num_workers or (isinstance(e, RuntimeError) and "DataLoader worker" not in str(e)):
            raise  # or a broken pipe from the dead worker's queue
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
        try:
            batches.stop_workers()  # afterwards torch's handler no longer watches the dead worker
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
        where = getattr(batches.dataset, "path", "the training data")
        raise DataError(f"{where}: a DataLoader worker died while reading it (most likely killed for lack of "
                        f"memory): run again with fewer --num-workers (0: read in the main process)") from None


def eval_batches(dataset, batch_size, max_batches, env, collate_fn=None):
    """This rank's share of a fixed validation subset (the first max_batches * batch_size *
    world_size items), the same at every evaluation; evaluate() weights by tokens, so the
    result does not depend on how the subset is split over ranks."""
    n = min(len(dataset), max_batches * batch_size * env.world_size)
    mine = list(range(env.rank, n, env.world_size))
    collate = collate_fn or torch.utils.data.default_collate
    for start in range(0, len(mine), batch_size):
        yield collate([dataset[i] for i in mine[start:start + batch_size]])

