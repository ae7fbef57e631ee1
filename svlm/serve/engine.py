"""Continuous batching. The model is not thread-safe, so one worker thread
owns it and decodes up to `serve.max_batch` requests together
(svlm/inference/generation.py's Batch: a ragged batch, each row at its own
positions). Between two decode steps it retires the rows that finished or
whose client went away (their slots are free for the next step), and admits
waiting requests: their prompts are prefilled together, then they join the
running batch. Requests wait in a bounded queue; one that finds
`max_batch + max_queue` requests already running or waiting is refused (the
app answers 429). Each job sends its text back, piece by piece, to the event
loop that submitted it.

    prompt = engine.prepare(body)   # any thread: parse, decode images, encode the prompt
    job = engine.submit(prompt)     # the event loop: QueueFull when full
    kind, value = await job.events.get()   # ("delta", text) ... then ("done", Result) or ("error", APIError)
"""

from __future__ import annotations

import asyncio
import logging
import queue
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from svlm.config import HardwareConfig
from svlm.data.chat import ChatEncoder
from svlm.hardware import autocast_for
from svlm.inference.generation import Batch, Sampling, Stream, TextStreamer, prepare_for_decoding
from svlm.models.vision import ImageProcessor
from svlm.models.vlm import VLM
from svlm.serve.config import LimitsConfig
from svlm.serve.messages import APIError, ChatRequest, parse_chat_request

log = logging.getLogger("svlm.serve")


class QueueFull(Exception):
    """Every place in the queue is taken."""


@dataclass
class Prompt:
    request: ChatRequest
    input_ids: torch.Tensor  # (1, T)
    pixel_values: torch.Tensor | None  # (views, 3, S, S): one an image, or (with tiles) its tiles and thumbnail


@dataclass
class Result:
    text: str
    prompt_tokens: int
    completion_tokens: int  # tokens the model generated, its end-of-turn token included
    finish_reason: str  # "stop" (end of turn), "length" (max_tokens or the context), "cancelled"
    seconds: float = 0.0


class Job:
    """A unit of work for the worker; `events` is read on the submitting event loop."""

    def __init__(self, work: Prompt | Callable[[Job], Result], loop: asyncio.AbstractEventLoop | None) -> None:
        self.work, self.loop = work, loop  # a prompt to decode, or (tests) a callable the worker runs alone
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        self.started = time.perf_counter()
        self.streamer: TextStreamer | None = None  # its text so far, once it decodes

    def cancel(self) -> None:
        self.cancelled.set()

    def emit(self, kind: str, value: object) -> None:
        """From the worker thread: put (kind, value) on `events`."""
        if self.loop is None:
            return
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass


class Engine:
    def __init__(
        self,
        model: VLM,
        tokenizer,
        device: torch.device,
        hardware: HardwareConfig,
        limits: LimitsConfig,
        folder: Path | None = None,
        meta: dict | None = None,
    ) -> None:
        self.model, self.tokenizer, self.device, self.hardware, self.limits = model, tokenizer, device, hardware, limits
        self.folder, self.meta = folder, meta or {}
        prepare_for_decoding(model, hardware.compile)
        self.image_root = Path(limits.image_root).resolve() if limits.image_root else None
        self.encoder = ChatEncoder.for_model(tokenizer, model)
        self.processor = ImageProcessor(model.cfg.vision)
        self.stats: Counter[str] = Counter()  # finished jobs by finish reason, and "failed"
        self.last: Result | None = None  # the most recent finished generation
        self.steps = 0  # decode steps run
        self.batch = Batch(model, self.encoder.banned_ids)
        self._jobs: dict[Stream, Job] = {}  # the job of each stream in the batch (or joining it)
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._pending = 0  # running + waiting
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name="svlm-generate", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ any thread

    def prepare(self, body: object) -> Prompt:
        """A decoded JSON body -> a Prompt; APIError for a bad request."""
        request = parse_chat_request(body, self.limits, self.image_root)
        pixel_values, grids = self.processor.all_views(request.images)  # every image's views, and tile grids
        ids, _ = self.encoder.encode(request.turns, add_generation_prompt=True, grids=grids)
        context = self.model.cfg.lm.max_seq_len
        if len(ids) >= context:
            raise APIError(
                400,
                f"the conversation is {len(ids)} tokens (images included); this model's context is {context}",
                param="messages",
                code="context_length_exceeded",
            )
        return Prompt(request, torch.tensor([ids]), pixel_values)

    @property
    def pending(self) -> int:
        return self._pending

    @property
    def capacity(self) -> int:
        """Requests that may be running or waiting at once."""
        return self.limits.max_batch + self.limits.max_queue

    def check_room(self) -> None:
        """QueueFull unless a request submitted now would find a place."""
        if self._pending >= self.capacity:
            raise QueueFull

    def submit(self, work: Prompt | Callable[[Job], Result]) -> Job:
        """Queue a prompt (or any callable taking the Job, for tests); QueueFull when full."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        job = Job(work, loop)
        with self._lock:
            if self._pending >= self.capacity:
                raise QueueFull
            self._pending += 1
        self._queue.put(job)
        return job

    def close(self, timeout: float = 5.0) -> None:
        """Stop the worker after its current step (running and waiting jobs are cancelled)."""
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.cancel()
                self._finish(job, Result("", 0, 0, "cancelled"))
        self._queue.put(None)
        self._thread.join(timeout)

    # ------------------------------------------------------ the worker thread

    def _loop(self) -> None:
        while not self._closing:
            self._admit(wait=len(self.batch) == 0)
            for stream in list(self.batch.streams):  # a client gone: its slot is free before the next step
                if self._jobs[stream].cancelled.is_set():
                    self.batch.cancel(stream)
                    self._complete([stream])
            if len(self.batch):
                self._run(self.batch.step, list(self.batch.streams), step=True)
                self.steps += 1
        for stream in list(self.batch.streams):
            self.batch.cancel(stream)
            self._complete([stream])

    def _admit(self, wait: bool) -> None:
        """Take waiting jobs into free slots (waiting for one when the batch is
        empty) and prefill the prompts together."""
        joining: list[Stream] = []
        while len(self.batch) + len(joining) < self.limits.max_batch:
            try:
                job = self._queue.get(block=wait and not joining)
            except queue.Empty:
                break
            if job is None:
                self._closing = True
                break
            if job.cancelled.is_set():  # the client left while it waited
                self._finish(job, Result("", 0, 0, "cancelled"))
            elif isinstance(job.work, Prompt):
                joining.append(self._stream(job))
            else:
                self._run_alone(job)
        if joining:
            self._run(lambda: self.batch.add(joining), joining)

    def _stream(self, job: Job) -> Stream:
        request, prompt = job.work.request, job.work
        seed = request.seed if request.seed is not None else secrets.randbits(63)
        streamer = TextStreamer(self.tokenizer, lambda text: job.emit("delta", text))
        stream = Stream(
            prompt.input_ids[0].tolist(),
            None if prompt.pixel_values is None else prompt.pixel_values.to(self.device),
            request.max_tokens,
            frozenset(self.encoder.stop_ids),
            Sampling(request.temperature, request.top_k, request.top_p),
            torch.Generator(device=self.device).manual_seed(seed),
            on_token=lambda s: streamer(s.ids),
        )
        job.streamer = streamer
        self._jobs[stream] = job
        return stream

    def _run(self, work: Callable[[], list[Stream]], streams: list[Stream], step: bool = False) -> None:
        """A prefill or (step) a decode step; a failure fails the requests it
        touched, and a failed step leaves an empty batch (its cache may be half
        written); the worker goes on."""
        try:
            with torch.inference_mode(), autocast_for(self.hardware, self.device):
                self._complete(work())
        except Exception as e:
            log.exception("generation failed")
            error = e if isinstance(e, APIError) else APIError(500, f"generation failed: {e}", "server_error")
            if step:
                self.batch = Batch(self.model, self.encoder.banned_ids)
            for s in streams:
                if s in self._jobs:
                    self._fail(self._jobs.pop(s), error)

    def _complete(self, streams: list[Stream]) -> None:
        for s in streams:
            job = self._jobs.pop(s)
            text = self.tokenizer.decode(s.ids, skip_special_tokens=True)
            if s.finish != "cancelled" and text[len(job.streamer.printed) :]:
                job.emit("delta", text[len(job.streamer.printed) :])
            n = len(s.ids) + (s.finish == "stop")  # the end-of-turn token counts
            self._finish(job, Result(text, len(s.prompt), n, s.finish, time.perf_counter() - job.started))

    def _run_alone(self, job: Job) -> None:
        try:
            result = job.work(job)
        except Exception as e:
            log.exception("job failed")
            self._fail(job, APIError(500, f"generation failed: {e}", "server_error"))
            return
        self._finish(job, result)

    def _fail(self, job: Job, error: APIError) -> None:
        self.stats["failed"] += 1
        with self._lock:
            self._pending -= 1
        job.emit("error", error)

    def _finish(self, job: Job, result: Result) -> None:
        self.stats[result.finish_reason] += 1
        self.last = result
        with self._lock:
            self._pending -= 1
        job.emit("done", result)
