"""Device, precision and accelerator policy: the one home of what a
`hardware` option (conf/hardware/, svlm.config.HardwareConfig) means.

- `pick_device`: the device to run on (and torch's CPU threads), for eval,
  infer and the server; `planned_device`: the same without touching torch's
  state, for the memory planner.
- `resolve_precision`: `precision=auto` settled (bf16 on a GPU, fp16 where it
  has no bf16, fp32 on the CPU); `autocast_for`: the matching autocast.
- `make_accelerator` / `accelerator_kwargs`: accelerate's Accelerator for
  training, with the engine (DDP, FSDP2 or DeepSpeed) used when launched with
  several processes.
- `THREADS` (a `ThreadGovernor`): torch's CPU thread count, the cores other
  processes leave free unless hardware.threads or OMP_NUM_THREADS fix it;
  training steps and decode steps call `THREADS.follow()`.
"""

from __future__ import annotations

import os
import time
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DeepSpeedPlugin, DistributedDataParallelKwargs, FullyShardedDataParallelPlugin

from svlm.config import HardwareConfig
from svlm.errors import ConfigError

NO_CUDA = "hardware.device=cuda but no CUDA GPU is available (use hardware=cpu or hardware=auto)"
FSDP_WRAP = ["Block", "Dinov2Layer"]  # FSDP units: one per LM block and per DINOv2 layer


def planned_device(hw: HardwareConfig) -> str:
    """The device a run would use: hardware.device, auto meaning a GPU when there
    is one (cuda is planned for even on a machine without one: the memory planner)."""
    if hw.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return hw.device


def available_device(hw: HardwareConfig) -> str:
    """planned_device, refused when it is a GPU this machine does not have."""
    if hw.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(NO_CUDA)
    return planned_device(hw)


def pick_device(hw: HardwareConfig) -> torch.device:
    """The device to run on; settles torch's CPU threads (THREADS.start)."""
    THREADS.start(hw.threads)
    return torch.device(available_device(hw))


def resolve_precision(hw: HardwareConfig, device: str) -> str:
    """hardware.precision with `auto` settled: bf16 on a GPU (fp16 where it has no bf16), fp32 on the CPU."""
    if hw.precision != "auto":
        return hw.precision
    if device == "cuda":
        return "bf16" if not torch.cuda.is_available() or torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def autocast_for(hw: HardwareConfig, device: torch.device) -> AbstractContextManager:
    """The autocast for the precision hardware asks for (bf16/fp16 on a GPU; none in fp32 or on the CPU)."""
    precision = resolve_precision(hw, device.type)
    if precision == "fp32" or device.type != "cuda":
        return nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def accelerator_kwargs(hw: HardwareConfig, find_unused_parameters: bool = False) -> dict:
    """What `Accelerator(...)` gets for a hardware config: device, precision, and
    the engine (DDP, FSDP or DeepSpeed) used when launched with several processes.
    find_unused_parameters: for DDP when some parameters may get no gradient in a
    step (mixture-of-experts experts no token was routed to)."""
    device = available_device(hw)
    precision = resolve_precision(hw, device)
    kwargs: dict = {
        "cpu": device != "cuda",
        "mixed_precision": {"fp32": "no"}.get(precision, precision),
        "kwargs_handlers": [DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)],
    }
    if hw.distributed == "fsdp":
        kwargs["fsdp_plugin"] = FullyShardedDataParallelPlugin(
            fsdp_version=2,
            reshard_after_forward=True,  # full sharding: parameters, gradients and optimizer states
            auto_wrap_policy="transformer_based_wrap",
            transformer_cls_names_to_wrap=FSDP_WRAP,
            state_dict_type="FULL_STATE_DICT",
            cpu_ram_efficient_loading=False,
        )
    elif hw.distributed == "deepspeed":
        kwargs["deepspeed_plugin"] = DeepSpeedPlugin(
            zero_stage=hw.zero_stage,
            offload_optimizer_device="cpu" if hw.offload else "none",
            offload_param_device="cpu" if hw.offload and hw.zero_stage == 3 else "none",
            zero3_save_16bit_model=False,
        )
    return kwargs


def make_accelerator(hw: HardwareConfig, find_unused_parameters: bool = False) -> Accelerator:
    THREADS.start(hw.threads)
    return Accelerator(**accelerator_kwargs(hw, find_unused_parameters))


def to_device(value: float, device: torch.device) -> torch.Tensor:
    """A number as a tensor on `device`, copied without waiting for the device's queue."""
    t = torch.tensor(value)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)


# ------------------------------------------------------------------ CPU threads
#
# With as many threads as cores, a second busy process on one of them makes
# every parallel region wait for the thread that lost its core (and with a
# spinning wait policy, svlm/openmp.py, the waiting threads take the core
# from it): benchmarks/threads.py measured 2-thread training at a third of
# the 1-thread speed. So by default the thread count is the number of cores
# (of this process's affinity) that other processes leave free, measured
# from /proc/stat minus this process's own time, and re-measured as the run
# goes. hardware.threads or OMP_NUM_THREADS fix the count instead: do that
# where a run must repeat bit for bit (the count changes float sums' order).


class ThreadGovernor:
    """torch's CPU thread count, following the cores other processes leave free."""

    def __init__(
        self, every_s: float = 1.0, proc: Path = Path("/proc"), clock=time.monotonic, sleep=time.sleep
    ) -> None:
        self.every_s, self.proc, self.clock, self.sleep = every_s, proc, clock, sleep
        affinity = getattr(os, "sched_getaffinity", None)
        self.cores = sorted(affinity(0)) if affinity else list(range(os.cpu_count() or 1))
        self.tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100  # jiffies a second
        self.following, self.how, self.free = False, "torch's default", None
        self.last: tuple[float, int, int] | None = None
        self.pending: int | None = None  # a new count seen once: taken when the next check agrees

    def sample(self) -> tuple[float, int, int] | None:
        """(wall time, busy jiffies of our cores, this process's jiffies); None without /proc."""
        try:
            stat = (self.proc / "stat").read_text().splitlines()
            own = (self.proc / "self" / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        names = {f"cpu{c}" for c in self.cores}
        busy = 0
        for line in stat:
            fields = line.split()
            if fields and fields[0] in names:  # user nice system idle iowait irq softirq steal ...
                busy += sum(map(int, fields[1:4])) + sum(map(int, fields[6:9]))
        return self.clock(), busy, int(own[11]) + int(own[12])  # utime + stime, every thread

    def free_cores(self, before: tuple[float, int, int], after: tuple[float, int, int]) -> float:
        """Cores not taken by other processes between two samples."""
        elapsed = (after[0] - before[0]) * self.tick
        others = ((after[1] - before[1]) - (after[2] - before[2])) / max(elapsed, 1e-9)
        return min(max(len(self.cores) - others, 0.0), float(len(self.cores)))

    def threads_for(self, free: float) -> int:
        """A thread a free core, a core counted free when others take under 0.3 of it
        (with 2 threads spinning on 2 cores, a newcomer gets only half of one)."""
        return max(1, min(len(self.cores), int(free + 0.3)))

    def start(self, threads: int | None, wait_s: float = 0.25) -> None:
        """Settle the count at the start of a run: `threads` (hardware.threads), else
        OMP_NUM_THREADS's, else the free cores, measured over `wait_s` and then
        followed (measured once a process: a later start goes on following)."""
        fixed_by = "hardware.threads" if threads else "OMP_NUM_THREADS" if "OMP_NUM_THREADS" in os.environ else None
        if fixed_by:
            if threads:
                torch.set_num_threads(threads)
            self.following, self.how, self.free = False, fixed_by, None
            return
        if self.following:
            return
        before = self.sample()
        if before is None:
            self.how = "torch's default (no /proc to measure the load)"
            return
        self.sleep(wait_s)
        self.last, self.pending = self.sample(), None
        self.free = self.free_cores(before, self.last)
        torch.set_num_threads(self.threads_for(self.free))
        self.following, self.how = True, "following the free cores"

    def follow(self) -> int | None:
        """Between steps: re-measure at most every `every_s` and change the count
        when two checks in a row agree on a new one; returns the new count then."""
        if not self.following or self.clock() - self.last[0] < self.every_s:
            return None
        now = self.sample()
        self.free = self.free_cores(self.last, now)
        self.last = now
        want = self.threads_for(self.free)
        if want == torch.get_num_threads():
            self.pending = None
            return None
        if self.pending != want:  # seen once: wait for the next check
            self.pending = want
            return None
        torch.set_num_threads(want)
        self.pending = None
        return want

    def describe(self) -> str:
        """For the run's log line, e.g. "2 threads (following the free cores: 2.0 of 2)"."""
        n = torch.get_num_threads()
        if self.free is None:
            return f"{n} threads ({self.how})"
        return f"{n} threads ({self.how}: {self.free:.1f} of {len(self.cores)} free)"


THREADS = ThreadGovernor()
