"""The batcher: one thread owns the model. Requests wait in a queue; a batch is taken when `max_batch` requests
of one modality (image or text) are waiting or the oldest has waited `max_wait` seconds. Every loaded eraser is
attached at once (`Steering`: one RequestIndex over every request where they all have knn gates over one retain
bank, the default; else one stacked Eraser), kept in step with the registry between batches, and each batch sets
a per-row term mask (SteeringHandle.row_terms) so rows with different eraser sets share one forward pass. Other
work on the model (fitting a deletion request, `Engine.call`) runs on the same thread between batches, with the
steering detached.

Per row, in one `model.generate` call: its own token limit (a stopping criterion), its own temperature, top_p and
seed (a logits processor that samples the row with the row's generator and hands generate a one-hot score, so
generate's greedy step picks it; temperature 0 leaves the scores alone: greedy, exactly `models.generate`), and
its own stream of text deltas (a streamer). A batch that fails is retried row by row, so one bad row fails alone.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from ..core import models
from ..core.eraser import Eraser
from ..core.index import RequestIndex
from ..core.inputs import Prompt
from .policy import Registry, Snapshot


@dataclass
class Job:
    """One chat completion: the prompt (asked verbatim), its eraser names and sampling settings.
    `emit` receives ("delta", text), then ("done", info) or ("error", message), from the batcher thread."""

    item: Prompt
    erasers: tuple[str, ...]
    max_tokens: int
    emit: Callable[[tuple[str, Any]], None]
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    arrived: float = field(default_factory=time.monotonic)
    cancelled: threading.Event = field(default_factory=threading.Event)
    streamed: bool = False  # a delta went out (a failed batch cannot retry this row unseen)
    finished: bool = False  # "done" went out

    @property
    def modality(self) -> str:
        return self.item.modality


class _RowSampler(LogitsProcessor):
    """Rows with temperature > 0: sample from softmax(scores / T) (top_p nucleus) with the row's generator and
    return a score that is 0 at the sampled token and -inf elsewhere; greedy rows pass through unchanged."""

    def __init__(self, jobs: Sequence[Job]):
        self.rows = [(row, job.temperature, job.top_p,
                      torch.Generator().manual_seed(job.seed if job.seed is not None else secrets.randbits(62)))
                     for row, job in enumerate(jobs) if job.temperature > 0]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if not self.rows:
            return scores
        chosen = scores.clone()
        for row, temperature, top_p, generator in self.rows:
            probs = torch.softmax(scores[row].detach().to("cpu", torch.float32) / temperature, dim=-1)
            if top_p < 1.0:
                ordered, order = probs.sort(descending=True)
                drop = ordered.cumsum(0) - ordered >= top_p  # keep the smallest prefix reaching top_p
                probs = probs.scatter(0, order, ordered.masked_fill(drop, 0.0))
            token = int(torch.multinomial(probs, 1, generator=generator))
            chosen[row] = float("-inf")
            chosen[row, token] = 0.0
        return chosen


class _RowLimits(StoppingCriteria):
    """Per row: done once it has `max_tokens` new tokens, or its client went away."""

    def __init__(self, jobs: Sequence[Job], prompt_length: int):
        self.jobs, self.prompt_length = jobs, prompt_length
        self.limits = torch.tensor([job.max_tokens for job in jobs])

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        done = (input_ids.shape[1] - self.prompt_length) >= self.limits
        done |= torch.tensor([job.cancelled.is_set() for job in self.jobs])
        return done.to(input_ids.device)


class _RowStreamer(BaseStreamer):
    """Receives each step's tokens [B]; per row, keeps the tokens up to its eos or limit and emits text deltas
    (leading and trailing whitespace held back, so the deltas join to the final answer)."""

    def __init__(self, jobs: Sequence[Job], tokenizer, eos_ids: set[int], prompt_tokens: Sequence[int]):
        self.jobs, self.tokenizer, self.eos_ids = jobs, tokenizer, eos_ids
        self.tokens: list[list[int]] = [[] for _ in jobs]
        self.sent = [""] * len(jobs)
        self.finish: list[str | None] = [None] * len(jobs)
        self.prompt_tokens = prompt_tokens
        self.seen_prompt = False

    def put(self, value: torch.Tensor) -> None:
        if not self.seen_prompt and value.ndim == 2:  # generate hands the prompt first
            self.seen_prompt = True
            return
        for row, token in enumerate(value.reshape(-1).tolist()):
            if self.finish[row] is not None:
                continue
            job = self.jobs[row]
            if token in self.eos_ids:
                self._finish(row, "stop")
                continue
            self.tokens[row].append(token)
            self._flush(row)
            if len(self.tokens[row]) >= job.max_tokens:
                self._finish(row, "length")
            elif job.cancelled.is_set():
                self._finish(row, "cancelled")

    def text(self, row: int) -> str:
        return self.tokenizer.decode(self.tokens[row], skip_special_tokens=True).strip()

    def _flush(self, row: int) -> None:
        text = self.text(row)
        if text.startswith(self.sent[row]) and len(text) > len(self.sent[row]):
            self.jobs[row].emit(("delta", text[len(self.sent[row]):]))
            self.jobs[row].streamed = True
            self.sent[row] = text

    def _finish(self, row: int, reason: str) -> None:
        self.finish[row] = reason
        text = self.text(row)
        self._flush(row)
        self.jobs[row].finished = True
        self.jobs[row].emit(("done", {"text": text, "finish_reason": reason,
                                      "prompt_tokens": self.prompt_tokens[row],
                                      "completion_tokens": len(self.tokens[row])}))

    def end(self) -> None:
        for row, reason in enumerate(self.finish):
            if reason is None:
                self._finish(row, "length")


class Steering:
    """What the batcher attaches, kept in step with the registry's snapshots (`apply`, between batches).

    Where every loaded eraser has a knn prompt gate and they share one retain bank (requests fitted on one model
    cache do), one RequestIndex holds them all and stays attached: a change adds or removes only the erasers that
    changed, O(their size) whatever else is loaded, and a prompt is scored against every request at once. Otherwise
    (ridge or paper gates, or another retain bank) the erasers are stacked into one Eraser (Eraser.concat) and
    re-attached on every change, O(everything). `terms` maps each name to its columns of the gate's decisions
    [batch, width], what a row mask selects."""

    def __init__(self, model):
        self.model = model
        self.handle = None
        self.index: RequestIndex | None = None
        self.stacked: Eraser | None = None
        self.applied: dict[str, Eraser] = {}  # index mode: the erasers the index holds, by name
        self.terms: dict[str, tuple[int, ...]] = {}
        self.width = 0
        self.version: int | None = None

    @property
    def kind(self) -> str:
        return "index" if self.index is not None else "stacked" if self.stacked is not None else "none"

    def apply(self, snapshot: Snapshot) -> None:
        if snapshot.version == self.version:
            return
        erasers = snapshot.erasers
        if erasers and all(e.prompt_gate is not None and e.prompt_gate.kind == "knn" for e in erasers.values()):
            try:
                self._index(erasers)
            except ValueError:  # not one retain bank (or settings): the erasers still stack
                self._stack(erasers)
        elif erasers:
            self._stack(erasers)
        else:
            self._drop()
        self.version = snapshot.version

    def _index(self, erasers: Mapping[str, Eraser]) -> None:
        if self.index is None:
            self._drop()
            self.index = RequestIndex.like(next(iter(erasers.values())))
        for name in [name for name, eraser in self.applied.items() if erasers.get(name) is not eraser]:
            self.index.remove(name)
            del self.applied[name]
        for name, eraser in erasers.items():
            if name not in self.applied:
                self.index.add(name, eraser)
                self.applied[name] = eraser
        if self.handle is None:  # fingerprints were checked when each eraser was loaded
            self.handle = self.index.attach(self.model, check_fingerprint=False)
        self.terms = {name: tuple(self.index.slots(name)) for name in erasers}
        self.width = self.index.capacity["slots"]

    def _stack(self, erasers: Mapping[str, Eraser]) -> None:
        self._drop()
        self.stacked = Eraser.concat(list(erasers.values()))
        self.handle = self.stacked.attach(self.model, check_fingerprint=False)
        offset = 0
        for name, eraser in erasers.items():
            self.terms[name] = tuple(range(offset, offset + eraser.num_terms))
            offset += eraser.num_terms
        self.width = offset

    def _drop(self) -> None:
        self.detach()
        self.index, self.stacked, self.applied, self.terms, self.width = None, None, {}, {}, 0

    def detach(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None

    @contextmanager
    def detached(self) -> Iterator[None]:
        """The model without steering for the block (e.g. to fit a request on it), then attached as before."""
        self.detach()
        try:
            yield
        finally:
            source = self.index if self.index is not None else self.stacked
            if source is not None:
                self.handle = source.attach(self.model, check_fingerprint=False)


BATCH_LOG = 10_000  # batch sizes kept in Engine.batches


class BatchLog(deque):
    """The latest batch sizes: a deque with a maxlen (a server runs for months), sliceable like the list it
    replaced (`engine.batches[before:]` in the tests and the benchmark)."""

    def __init__(self, maxlen: int = BATCH_LOG):
        super().__init__(maxlen=maxlen)

    def __getitem__(self, index):
        return list(self)[index] if isinstance(index, slice) else super().__getitem__(index)


class Engine:
    """The batcher thread and its queue (see the module docstring). `submit` is thread-safe."""

    def __init__(self, model, processor, registry: Registry, max_batch: int = 16, max_wait: float = 0.01):
        self.model, self.processor, self.registry = model, processor, registry
        self.max_batch, self.max_wait = max(1, int(max_batch)), max(0.0, float(max_wait))
        self._pending: list[Job] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._tasks: list[tuple[Callable[[], Any], Future]] = []  # work on the model between batches (call)
        self.steering = Steering(model)
        # the sizes of the latest batches (tests, the benchmark): bounded, a server runs for months
        self.batches = BatchLog()
        self.batch_count = 0  # every batch run, and their rows (/metrics)
        self.row_count = 0
        self.gate_fires: Counter[str] = Counter()  # per eraser name: rows whose prompt gate fired it (/metrics)
        eos = getattr(model.generation_config, "eos_token_id", None)
        if eos is None:
            eos = processor.tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos])

    # ---- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="mllmeraser-batcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            pending, self._pending = self._pending, []
            tasks, self._tasks = self._tasks, []
            self._cond.notify_all()
        for job in pending:
            job.emit(("error", "the server is shutting down"))
        for _, future in tasks:
            future.set_exception(RuntimeError("the server is shutting down"))
        if self._thread is not None:
            self._thread.join()
        self.steering.detach()

    @property
    def alive(self) -> bool:
        """The batcher thread is running (False before start, after stop, or once it died of an error)."""
        return self._thread is not None and self._thread.is_alive()

    def _refuse_if_down(self) -> None:
        if self._stopping:
            raise RuntimeError("the server is shutting down")
        if self._thread is not None and not self._thread.is_alive():  # nothing would ever answer the request
            raise RuntimeError("the batcher thread has died; the server needs a restart")

    def call(self, work: Callable[[], Any]) -> Future:
        """Run `work()` on the batcher thread between two batches, with the steering detached (the model is then
        plain: e.g. a deletion request's fit); its result or exception comes back through the Future."""
        future: Future = Future()
        with self._cond:
            self._refuse_if_down()
            self._tasks.append((work, future))
            self._cond.notify_all()
        return future

    def submit(self, job: Job) -> None:
        with self._cond:
            self._refuse_if_down()
            self._pending.append(job)
            self._cond.notify_all()

    # ---- the batcher thread ---------------------------------------------------------------------

    def _take(self) -> list[Job] | tuple[Callable[[], Any], Future]:
        with self._cond:
            while True:
                while not self._pending and not self._tasks and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return []
                if self._tasks:
                    return self._tasks.pop(0)
                self._pending = [job for job in self._pending if not job.cancelled.is_set()]
                if not self._pending:
                    continue
                first = self._pending[0]
                deadline = first.arrived + self.max_wait
                while True:
                    same = [job for job in self._pending if job.modality == first.modality]
                    left = deadline - time.monotonic()
                    if len(same) >= self.max_batch or left <= 0 or self._stopping:
                        break
                    self._cond.wait(left)
                batch = same[: self.max_batch]
                taken = set(map(id, batch))
                self._pending = [job for job in self._pending if id(job) not in taken]
                return batch

    def _loop(self) -> None:
        while True:
            jobs = self._take()
            if isinstance(jobs, tuple):
                self._run_task(*jobs)
                continue
            if not jobs:
                return
            try:
                self._run(jobs)
            except Exception as exc:  # a batch that fails is retried row by row: one bad row fails alone
                for job in jobs:
                    if job.finished:
                        continue
                    if len(jobs) == 1 or job.streamed:
                        job.emit(("error", f"generation failed ({type(exc).__name__}: {exc})"))
                        continue
                    try:
                        self._run([job])
                    except Exception as row_exc:
                        job.emit(("error", f"generation failed ({type(row_exc).__name__}: {row_exc})"))

    def _run_task(self, work: Callable[[], Any], future: Future) -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            self.steering.apply(self.registry.snapshot())
            with self.steering.detached():
                result = work()
        except BaseException as exc:  # the caller gets it; the batcher goes on
            future.set_exception(exc)
        else:
            future.set_result(result)

    @torch.no_grad()
    def _run(self, jobs: list[Job]) -> None:
        steering = self.steering
        steering.apply(self.registry.snapshot())
        self.batches.append(len(jobs))
        self.batch_count += 1
        self.row_count += len(jobs)
        tokenizer = self.processor.tokenizer
        batch = models.to_device(models.encode_prompts(self.processor, [job.item for job in jobs]), self.model)
        prompt_length = batch["input_ids"].shape[1]
        if steering.handle is not None:
            mask = torch.zeros(len(jobs), steering.width)
            for row, job in enumerate(jobs):
                for name in job.erasers:
                    mask[row, list(steering.terms.get(name, ()))] = 1.0  # a name removed since: gone
            steering.handle.row_terms = mask
        streamer = _RowStreamer(jobs, tokenizer, self.eos_ids, batch["attention_mask"].sum(dim=1).tolist())
        try:
            self.model.generate(**batch, max_new_tokens=max(job.max_tokens for job in jobs), do_sample=False,
                                pad_token_id=tokenizer.pad_token_id, streamer=streamer,
                                logits_processor=LogitsProcessorList([_RowSampler(jobs)]),
                                stopping_criteria=StoppingCriteriaList([_RowLimits(jobs, prompt_length)]))
            self._count_fires(len(jobs))
        finally:
            if steering.handle is not None:
                steering.handle.row_terms = None
        streamer.end()

    def _count_fires(self, rows: int) -> None:
        """Per eraser, the rows of this batch its prompt gate fired on (decisions are already masked to each
        row's eraser set). A paper gate decides per layer and keeps no decisions: not counted."""
        decisions = getattr(self.steering.handle, "decisions", None)
        if decisions is None:
            return
        try:  # a counter must never fail the batch it counts
            fired = (decisions[:rows] > 0).cpu()
            owner = {slot: name for name, slots in self.steering.terms.items() for slot in slots}
            for row in range(fired.shape[0]):
                names = {owner.get(int(slot)) for slot in fired[row].nonzero().flatten().tolist()}
                self.gate_fires.update(name for name in names if name is not None)
        except (RuntimeError, TypeError, IndexError):
            pass
