"""The generation engine: continuous batching, many requests decoded together, each joining
and leaving a running batch at any step. Everything that generates goes through it: serve.py
runs one BatchEngine on its own thread for all of its clients, eval.py submits all of its
questions and drives the engine with step(), chat.py streams each answer through it.

Why batch at all: a decode step feeds one token per row, and on a CPU or GPU the step costs
nearly the same for 16 rows as for one (every weight is read once per step either way, and
reading the weights is most of the work). Rows that share a step share that cost, so tokens
per second in all grow almost with the number of rows.

Why *continuous*: a fixed batch starts its rows together and runs until its last row ends,
so a request that arrives a moment later waits for the whole batch, and rows that ended
early ride along doing nothing. Continuous batching (Orca's "iteration-level scheduling")
decides who is in the batch at every step instead:
  - a request that arrives is prefilled (its prompt runs through the model once and fills
    its keys and values) and joins the running batch at the next step;
  - a row that ends (eos, its token limit, the context's end, or its client gone) leaves at
    once, and its place goes to a waiting request.

This file is the queue and the schedule: requests wait here, join the batch when a slot is
free (prefilled a few at a time, grouped by length so that little padding is needed), and a
thread runs the steps. batch.py holds the rows being decoded: the KV cache whose slots give
each row its own length, and what one step does to them. A row decodes exactly as it would
alone: each has its own positions from 0, masks hide other rows' padding and excess length,
and each request samples with its own settings and its own seeded generator.
"""
import sys
import threading
import traceback
from collections import deque
from dataclasses import replace

import torch

from batch import DecodeBatch, Request, prefill_groups
from sampling import Sampling


class BatchEngine:
    """Decodes every submitted request with continuous batching (see the module docstring).
    Drive it with step() (eval.py, chat.py, tests) or run it on its own thread with start()
    (serve.py)."""

    def __init__(self, model, eos_id, pad_id, max_batch=16):
        self.args, self.max_batch = model.args, max_batch
        self.stats = {"tokens_generated": 0, "peak_batch": 0, "finished": 0, "cancelled": 0, "errors": 0}
        self.batch = DecodeBatch(model, eos_id, pad_id, max_batch, self.stats)
        self.waiting = deque()
        self.wakeup = threading.Condition()
        self.thread, self.closing = None, False

    # --------------------------------------------------------------- the public side
    def submit(self, prompt_ids, max_new_tokens, sampling, deliver):
        """Queue a request; returns it (call .cancel() to stop it). Its answer is cut to fit
        the context: at most max_seq_len - len(prompt_ids) tokens."""
        sampling.check()
        room = self.args.max_seq_len - len(prompt_ids)
        if not prompt_ids or room < 1:
            raise ValueError(f"prompt of {len(prompt_ids)} tokens: need 1 to {self.args.max_seq_len - 1} "
                             f"(max_seq_len {self.args.max_seq_len} must hold the prompt and one new token)")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens {max_new_tokens} must be >= 1")
        request = Request(prompt_ids, min(max_new_tokens, room), sampling, deliver)
        with self.wakeup:
            self.waiting.append(request)
            self.wakeup.notify()
        return request

    def load(self):
        """(rows decoding, requests waiting)."""
        return len(self.batch), len(self.waiting)

    def cancel_all(self):
        """Cancel every request, running or waiting (a server shutting down)."""
        with self.wakeup:
            for request in self.batch.requests + list(self.waiting):
                request.cancel()

    def end_all(self):
        """End every request at once as "cancelled", also after a step was interrupted
        half-way (chat.py's Ctrl-C): the rows are dropped and the slots are free again."""
        with self.wakeup:
            waiting, self.waiting = list(self.waiting), deque()
        for request in waiting:
            request.finish("cancelled", self.stats)
        self.batch.drop("cancelled")

    def start(self):
        self.thread = threading.Thread(target=self._run, name="batch-engine", daemon=True)
        self.thread.start()

    def close(self):
        """Stop the thread; requests still running or waiting end as "cancelled"."""
        with self.wakeup:
            self.closing = True
            self.wakeup.notify()
        if self.thread is not None:
            self.thread.join()
        self.end_all()

    # --------------------------------------------------------------- one iteration
    @torch.inference_mode()
    def step(self):
        """Admit waiting requests, then one step of the batch (batch.DecodeBatch.step: pick
        and hand out every row's token, let ended rows leave, one forward for the rest).
        False when idle."""
        self._admit()
        if not self.batch.requests:
            return False
        self.batch.step()
        return True

    def _admit(self):
        """Prefill waiting requests into the free slots, a few groups of similar lengths."""
        with self.wakeup:
            joining = []
            while self.waiting and len(self.batch) + len(joining) < self.max_batch:
                request = self.waiting.popleft()
                if request.cancelled:
                    request.finish("cancelled", self.stats)
                else:
                    joining.append(request)
        try:
            for group in prefill_groups(joining):
                self.batch.prefill(group)
        except Exception:
            for request in joining:
                if request.finish_reason is None and not any(request is r for r in self.batch.requests):
                    request.finish("error", self.stats)
            raise
        self.stats["peak_batch"] = max(self.stats["peak_batch"], len(self.batch))

    # --------------------------------------------------------------- the thread
    def _run(self):
        while True:
            with self.wakeup:
                while not self.closing and not self.waiting and not self.batch.requests:
                    self.wakeup.wait()
                if self.closing:
                    return
            try:
                self.step()
            except Exception:  # end the step's rows with "error" and go on serving
                traceback.print_exc(file=sys.stderr)
                self.stats["errors"] += 1
                self.batch.drop("error")


# ----------------------------------------------------------------------------- driven to the end

def answer_all(engine, prompts, max_new_tokens, sampling=Sampling(), on_answer=None):
    """Every prompt's generated ids (without the eos), in input order, from an engine driven
    with step() until idle. Prompts are submitted shortest first, so that the groups admitted
    together need little padding; a seeded sampling gives prompt i the seed + i. on_answer()
    is called as each answer ends (a progress bar)."""
    answers = [None] * len(prompts)

    def collect(i):
        ids = []

        def deliver(token, finish_reason):
            if token is not None:
                ids.append(token)
                return
            answers[i] = ids
            if on_answer is not None:
                on_answer()
        return deliver

    for i in sorted(range(len(prompts)), key=lambda i: len(prompts[i])):
        row_sampling = sampling if sampling.seed is None else replace(sampling, seed=sampling.seed + i)
        engine.submit(prompts[i], max_new_tokens, row_sampling, collect(i))
    while engine.step():
        pass
    return answers


def generate(model, prompts, max_new_tokens, eos_id=None, pad_id=0, sampling=Sampling()):
    """answer_all on an engine of its own that holds every prompt at once (tests, benchmarks)."""
    engine = BatchEngine(model, eos_id, pad_id, max_batch=len(prompts))
    return answer_all(engine, prompts, max_new_tokens, sampling)
