"""The thread governor (svlm/hardware.py): torch's CPU threads are the cores
other processes leave free, measured from a /proc written here, followed
between steps, and fixed by hardware.threads or OMP_NUM_THREADS."""

from pathlib import Path

import pytest
import torch

from svlm.hardware import ThreadGovernor

TICK = 100  # jiffies a second


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class FakeProc:
    """/proc/stat for two cores and /proc/self/stat, advanced by hand."""

    def __init__(self, root: Path, clock: Clock) -> None:
        self.root, self.clock = root, clock
        (root / "self").mkdir(parents=True)
        self.busy = [0, 0]  # jiffies each core was busy
        self.own = 0  # this process's jiffies
        self.write()

    def write(self) -> None:
        lines = ["cpu  0 0 0 0 0 0 0 0 0 0"]
        for i, b in enumerate(self.busy):  # user nice system idle iowait irq softirq steal guest guest_nice
            lines.append(f"cpu{i} {b // 2} 0 {b - b // 2} 5000 7 0 0 0 0 0")
        (self.root / "stat").write_text("\n".join(lines + ["intr 1 2 3", "ctxt 42"]) + "\n")
        own = ["S"] + ["0"] * 10 + [str(self.own // 2), str(self.own - self.own // 2)] + ["0"] * 30
        (self.root / "self" / "stat").write_text("1234 (python -c x) " + " ".join(own) + "\n")

    def run(self, seconds: float, others: float, ours: float) -> None:
        """`seconds` pass with other processes on `others` cores and us on `ours`."""
        self.clock.t += seconds
        total = round((others + ours) * seconds * TICK)
        self.busy[0] += total // 2
        self.busy[1] += total - total // 2
        self.own += round(ours * seconds * TICK)
        self.write()


@pytest.fixture
def proc(tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    fake = FakeProc(tmp_path / "proc", Clock())
    fake.others = 0.0
    before = torch.get_num_threads()
    yield fake
    torch.set_num_threads(before)


def governor(proc: FakeProc) -> ThreadGovernor:
    g = ThreadGovernor(every_s=1.0, proc=proc.root, clock=proc.clock, sleep=lambda s: proc.run(s, proc.others, 0.0))
    g.cores, g.tick = [0, 1], TICK
    return g


def test_free_cores_are_the_cores_others_leave(proc):
    g = governor(proc)
    a = g.sample()
    proc.run(2.0, others=0.75, ours=1.0)  # our own time does not count against us
    assert g.free_cores(a, g.sample()) == pytest.approx(1.25)
    assert [g.threads_for(f) for f in (0.0, 0.4, 1.2, 1.5, 1.7, 2.0)] == [1, 1, 1, 1, 2, 2]


def test_start_measures_and_follow_changes_on_two_agreeing_checks(proc):
    g = governor(proc)
    proc.others = 1.0  # a busy process holds one core when the run starts
    g.start(None)
    assert torch.get_num_threads() == 1 and g.describe() == "1 threads (following the free cores: 1.0 of 2 free)"
    proc.others = 0.0
    g.start(None)  # a second start in the process goes on following: not measured again
    assert torch.get_num_threads() == 1 and g.free == 1.0
    proc.run(0.5, others=0.0, ours=1.0)
    assert g.follow() is None  # under every_s since the last check: not measured
    proc.run(0.6, others=0.0, ours=1.0)
    assert g.follow() is None and torch.get_num_threads() == 1  # the load left: seen once
    proc.run(1.0, others=0.0, ours=2.0)
    assert g.follow() == 2 and torch.get_num_threads() == 2  # seen twice: taken
    proc.run(1.0, others=1.0, ours=1.0)
    assert g.follow() is None  # the load is back once ...
    proc.run(1.0, others=0.1, ours=2.0)
    assert g.follow() is None and torch.get_num_threads() == 2  # ... and gone: no change, no flapping


def test_hardware_threads_or_the_environment_fix_the_count(proc, monkeypatch):
    g = governor(proc)
    g.start(1)
    assert torch.get_num_threads() == 1 and g.describe() == "1 threads (hardware.threads)"
    proc.run(5.0, others=0.0, ours=1.0)
    assert g.follow() is None and torch.get_num_threads() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    torch.set_num_threads(2)
    g.start(None)
    assert g.describe() == "2 threads (OMP_NUM_THREADS)" and g.follow() is None


def test_without_proc_torch_keeps_its_default(tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    n = torch.get_num_threads()
    g = ThreadGovernor(proc=tmp_path / "no-proc")
    g.start(None)
    assert torch.get_num_threads() == n and g.follow() is None
    assert g.describe() == f"{n} threads (torch's default (no /proc to measure the load))"


def test_this_machine_proc_reads():
    """The real /proc parses (Linux): the free cores lie between none and all of ours."""
    g = ThreadGovernor()
    a = g.sample()
    if a is None:
        pytest.skip("no /proc on this system: the governor leaves torch's default")
    sum(i * i for i in range(200_000))
    assert 0.0 <= g.free_cores(a, g.sample()) <= len(g.cores)
