"""SIGTERM while a run trains: a flag read between steps, not the default's immediate end."""
import os
import signal
import subprocess
import sys
import threading
import time

import torch

from mpl_fast.train.distributed import Context
from mpl_fast.train.stop_signal import StopSignal


def _until(condition, seconds=5.0):
    end = time.monotonic() + seconds
    while not condition() and time.monotonic() < end:
        time.sleep(0.01)
    return condition()


def test_the_first_sigterm_sets_the_flag_and_closing_puts_the_old_handler_back():
    before = signal.getsignal(signal.SIGTERM)
    stop = StopSignal()
    try:
        assert signal.getsignal(signal.SIGTERM) is not before
        assert not stop.agreed(Context(), torch.device("cpu"), synced_step=True)
        os.kill(os.getpid(), signal.SIGTERM)
        assert _until(lambda: stop.received)
        # one process: every step may stop, synced or not
        assert stop.agreed(Context(), torch.device("cpu"), synced_step=False)
    finally:
        stop.close()
    assert signal.getsignal(signal.SIGTERM) is before


def test_replicas_read_the_flag_at_synced_steps_alone():
    """Under torchrun a replica may not leave on its own flag between synced steps: the others
    would wait for it in the next step's all-reduce."""
    stop = StopSignal()
    try:
        stop.received = True
        asked = []
        world = Context(rank=0, world=2)
        # the all-reduce as one replica alone would see it
        world.any = lambda flag: asked.append(float(flag)) or flag  # noqa: E731
        assert not stop.agreed(world, torch.device("cpu"), synced_step=False)
        assert asked == []
        assert stop.agreed(world, torch.device("cpu"), synced_step=True)
        assert asked == [1.0]
        stop.received = False
        world.any = lambda flag: torch.ones(())  # noqa: E731 (another replica was signalled)
        assert stop.agreed(world, torch.device("cpu"), synced_step=True)
    finally:
        stop.close()


def test_a_second_sigterm_ends_the_process_at_once():
    """A run stuck somewhere (a hung collective) can still be stopped by a second SIGTERM."""
    code = ("import os, signal, time\n"
            "from mpl_fast.train.stop_signal import StopSignal\n"
            "stop = StopSignal()\n"
            "os.kill(os.getpid(), signal.SIGTERM)\n"
            "time.sleep(0.2)\n"
            "print('first', stop.received, flush=True)\n"
            "os.kill(os.getpid(), signal.SIGTERM)\n"
            "time.sleep(2)\n"
            "print('still running', flush=True)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.stdout == "first True\n"
    assert done.returncode == -signal.SIGTERM


def test_outside_the_main_thread_it_catches_nothing():
    """signal.signal is refused off the main thread; a run driven from a thread keeps the
    process's SIGTERM handling."""
    before = signal.getsignal(signal.SIGTERM)
    seen = []

    def body():
        stop = StopSignal()
        seen.append(signal.getsignal(signal.SIGTERM))
        stop.close()

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    assert seen == [before] and signal.getsignal(signal.SIGTERM) is before
