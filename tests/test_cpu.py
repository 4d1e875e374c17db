"""common.infra.cpu.FreeCores: torch's thread count follows the cores other processes leave free."""
import torch

from common.infra import cpu


def test_threads_follow_the_cores_other_processes_use(monkeypatch):
    clock = {"t": 0.0, "busy": 0.0, "own": 0.0}
    monkeypatch.setattr(cpu, "_machine_busy_seconds", lambda: clock["busy"])
    monkeypatch.setattr(cpu.time, "monotonic", lambda: clock["t"])
    monkeypatch.setattr(cpu.time, "process_time", lambda: clock["own"])
    monkeypatch.setattr(cpu.os, "cpu_count", lambda: 2)
    threads = torch.get_num_threads()
    try:
        free = cpu.FreeCores(max_threads=2)
        free.update()                                   # a starting point only
        # 1 s: this process used 2 cores' worth, nobody else: 2 threads
        clock.update(t=1.0, busy=2.0, own=2.0)
        assert free.update() == 2 and torch.get_num_threads() == 2
        # 1 s: another process held one core (we got the other): 1 thread
        clock.update(t=2.0, busy=4.0, own=3.0)
        assert free.update() == 1 and torch.get_num_threads() == 1
        # too soon to judge (< min_interval): unchanged
        clock.update(t=2.1, busy=4.2, own=3.2)
        assert free.update() == 1
        # the competitor left: back to 2
        clock.update(t=3.0, busy=5.0, own=4.0)
        assert free.update() == 2 and torch.get_num_threads() == 2
        # never below one thread, even when others use every core
        clock.update(t=4.0, busy=7.0, own=4.0)
        assert free.update() == 1
    finally:
        torch.set_num_threads(threads)


def test_without_proc_stat_nothing_changes(monkeypatch):
    monkeypatch.setattr(cpu, "_machine_busy_seconds", lambda: None)
    free = cpu.FreeCores()
    assert free.update() == free.update() == torch.get_num_threads()
