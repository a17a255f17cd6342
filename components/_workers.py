"""Worker processes that end with the step that started them.

A step that fans out over a process pool must not leave workers behind when it is stopped:
``spawn_pool`` gives each worker ``PR_SET_PDEATHSIG`` (Linux) so it is killed when its parent
dies, even by SIGKILL; ``kill_workers`` ends a pool's workers at once (before the step removes
the temporary output they write into); ``stop_on_signals`` turns SIGTERM/SIGHUP into SystemExit
so a step's cleanup (``finally`` blocks, ``atomic_path``) runs before it exits non-zero.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import sys
import threading
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import Any, Callable, Iterator

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(parent_pid: int) -> None:
    """Ask the kernel to SIGKILL this process when its parent dies; exit now if it already has.

    The check after ``prctl`` closes the race where the parent died before the call (the
    process was then re-parented and would never get the signal).
    """
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            log.warning("prctl(PR_SET_PDEATHSIG) failed (errno %d)", ctypes.get_errno())
    if os.getppid() != parent_pid:
        os._exit(1)


def _init_worker(parent_pid: int, initializer: Callable | None, initargs: tuple) -> None:
    die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the parent, which ends us
    if initializer is not None:
        initializer(*initargs)


def spawn_pool(workers: int, initializer: Callable | None = None, initargs: tuple = ()) -> ProcessPoolExecutor:
    """A spawn-based process pool whose workers die with this process.

    Create it from the thread that lives as long as the pool (normally the main thread): the
    kernel's parent-death signal follows the thread that started each worker.
    """
    return ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"),
                               initializer=_init_worker, initargs=(os.getpid(), initializer, initargs))


def kill_workers(pool: ProcessPoolExecutor, timeout: float = 10.0) -> None:
    """SIGKILL every worker of ``pool`` and wait for them, so none writes after this returns.

    The pool is broken afterwards: its pending futures fail with BrokenProcessPool (do not
    cancel them first: Python 3.11's pool thread then fails setting that error). Waiting for
    the pool's manager thread makes a later ``shutdown`` return at once; it cannot hang on a
    result a worker was killed in the middle of sending (see below).
    """
    processes = list((getattr(pool, "_processes", None) or {}).values())
    for proc in processes:
        with contextlib.suppress(Exception):
            proc.kill()
    for proc in processes:
        with contextlib.suppress(Exception):
            proc.join(timeout)
    # A worker killed while sending its result leaves half a message in the result pipe, and the
    # pool's manager thread blocks reading the rest forever (then so do shutdown() and the
    # interpreter's exit, which joins it). With every worker dead, closing the parent's copy of
    # the pipe's write end leaves it without writers: the read ends with EOF, the manager thread
    # sees a broken pool and exits.
    result_queue = getattr(pool, "_result_queue", None)
    writer = getattr(result_queue, "_writer", None)
    if writer is not None and all(not p.is_alive() for p in processes):
        with contextlib.suppress(Exception):
            writer.close()
    manager = getattr(pool, "_executor_manager_thread", None)
    if manager is not None and manager is not threading.current_thread():
        manager.join(timeout)


@contextlib.contextmanager
def stop_on_signals(step: str, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGHUP)) -> Iterator[None]:
    """Within the block, SIGTERM (and SIGHUP) raise ``SystemExit(128 + signum)`` in the main
    thread, so the step's cleanup runs; further signals are ignored while it cleans up.

    Outside the main thread (signal handlers cannot be set there) the block runs unchanged.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        for s in signals:
            signal.signal(s, signal.SIG_IGN)
        log.error("%s: received %s; stopping workers and removing the partial output", step,
                  signal.Signals(signum).name)
        raise SystemExit(128 + signum)

    previous = {s: signal.signal(s, handler) for s in signals}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
