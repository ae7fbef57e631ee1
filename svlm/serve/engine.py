"""One generation at a time. The model is not thread-safe, so one worker
thread owns it; requests wait in a bounded queue behind the running one, and
a request that finds the queue full is refused (the app answers 429). Each
job sends its text back, piece by piece, to the event loop that submitted it,
and stops between two tokens once cancelled (the client went away).

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
from svlm.inference.generation import TextStreamer, generate
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

    def __init__(self, work: Callable[[Job], Result], loop: asyncio.AbstractEventLoop | None) -> None:
        self.work, self.loop = work, loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()

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


class Cancelled(Exception):
    """Raised inside generation when its job is cancelled."""


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
        self.image_root = Path(limits.image_root).resolve() if limits.image_root else None
        self.encoder = ChatEncoder.for_model(tokenizer, model)
        self.processor = ImageProcessor(model.cfg.vision)
        self.stats: Counter[str] = Counter()  # finished jobs by finish reason, and "failed"
        self.last: Result | None = None  # the most recent finished generation
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._pending = 0  # running + waiting
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

    def check_room(self) -> None:
        """QueueFull unless a request submitted now would find a place."""
        if self._pending >= 1 + self.limits.max_queue:
            raise QueueFull

    def submit(self, work: Prompt | Callable[[Job], Result]) -> Job:
        """Queue a prompt (or any callable taking the Job, for tests); QueueFull when full."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        fn = (lambda job: self._generate(job, work)) if isinstance(work, Prompt) else work
        job = Job(fn, loop)
        with self._lock:
            if self._pending >= 1 + self.limits.max_queue:
                raise QueueFull
            self._pending += 1
        self._queue.put(job)
        return job

    def close(self, timeout: float = 5.0) -> None:
        """Stop the worker after the running job (waiting ones are cancelled)."""
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
        while (job := self._queue.get()) is not None:
            if job.cancelled.is_set():  # the client left while it waited
                self._finish(job, Result("", 0, 0, "cancelled"))
                continue
            try:
                result = job.work(job)
            except Exception as e:  # a failed job must not stop the worker
                log.exception("generation failed")
                self.stats["failed"] += 1
                error = e if isinstance(e, APIError) else APIError(500, f"generation failed: {e}", "server_error")
                with self._lock:
                    self._pending -= 1
                job.emit("error", error)
                continue
            self._finish(job, result)

    def _finish(self, job: Job, result: Result) -> None:
        self.stats[result.finish_reason] += 1
        self.last = result
        with self._lock:
            self._pending -= 1
        job.emit("done", result)

    def _generate(self, job: Job, prompt: Prompt) -> Result:
        start = time.perf_counter()
        request, device = prompt.request, self.device
        seed = request.seed if request.seed is not None else secrets.randbits(63)
        generator = torch.Generator(device=device).manual_seed(seed)
        streamer = TextStreamer(self.tokenizer, lambda text: job.emit("delta", text))

        def on_token(ids: list[int]) -> None:
            if job.cancelled.is_set():
                raise Cancelled
            streamer(ids)
            n_new[0] = len(ids)

        n_new = [0]
        prompt_tokens = prompt.input_ids.shape[1]
        room = min(request.max_tokens, self.model.cfg.lm.max_seq_len - prompt_tokens)
        pixel_values = None if prompt.pixel_values is None else prompt.pixel_values.to(device)
        try:
            with autocast_for(self.hardware, device):
                (ids,) = generate(
                    self.model,
                    prompt.input_ids.to(device),
                    pixel_values,
                    self.encoder.stop_ids,
                    room,
                    request.temperature,
                    request.top_k,
                    request.top_p,
                    on_token=on_token,
                    generator=generator,
                )
        except Cancelled:
            return Result(streamer.printed, prompt_tokens, n_new[0], "cancelled", time.perf_counter() - start)
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        if text[len(streamer.printed) :]:
            job.emit("delta", text[len(streamer.printed) :])
        stopped = len(ids) < room  # generation ends early only at the end-of-turn token
        return Result(
            text, prompt_tokens, len(ids) + stopped, "stop" if stopped else "length", time.perf_counter() - start
        )
