"""Run independent work in a forked process beside the current one, splitting the CPU threads.

Generation does not keep two threads of one process busy. On 2 CPU cores, two processes with one
torch thread each generated 1.15 to 1.3 times as many tokens per second as one process with two
threads (the 135M organism, 100 to 120 prompts). The work is forked after the models are loaded,
so the child reads their weights (copy on write) without loading them again.

One and two threads can sum in different orders, so forked results equal serial ones up to float
rounding. On the organism the greedy responses, the diagnosis and the patching sweep were identical.

`side_job` and `split_work` fall back to running everything in this process when forking does not
apply: not Linux, fewer than 2 torch threads (so a forked child never forks again), CUDA
initialised (a forked child cannot use it), or `enabled=False`. Work must be a closure over what it
needs and return something picklable.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import pickle
import signal
import sys
import threading
import traceback
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence, TypeVar

import torch

from .progress import Advance, ProgressFactory, no_progress

logger = logging.getLogger(__name__)

Job = Callable[[ProgressFactory], Any]
Item = TypeVar("Item")
Result = TypeVar("Result")


class SideJobError(RuntimeError):
    """A job forked by `side_job` failed in a way its own exception cannot carry back."""


def can_fork() -> bool:
    """Return whether `side_job` can fork here: Linux, at least 2 torch threads, CUDA not initialised."""
    return (sys.platform.startswith("linux") and torch.get_num_threads() >= 2
            and not torch.cuda.is_initialized() and "fork" in multiprocessing.get_all_start_methods())


class SideJob:
    """A job running in a forked child; `result()` waits for it and returns its value.

    The child gets half of this process's torch threads and this process keeps the rest until the
    child is done. Torch's thread count is set per OS thread, so only the main thread can give the
    threads back. The parent calls `poll()` from its own loops (`watch` wraps a progress factory to
    do so), and `result()` restores them at the latest.
    """

    def __init__(self, job: Job, description: str, progress: ProgressFactory = no_progress):
        self.description = description
        self._threads = torch.get_num_threads()
        self._done = threading.Event()
        self._outcome: tuple[str, Any] | None = None
        context = multiprocessing.get_context("fork")
        receiver, sender = context.Pipe(duplex=False)
        child_threads = self._threads // 2
        self._process = context.Process(target=_run_child, args=(job, sender, child_threads),
                                        name=f"safereact: {description}", daemon=True)
        self._process.start()
        sender.close()
        torch.set_num_threads(self._threads - child_threads)
        logger.info("forked process %d for %s (%d torch threads there, %d here)", self._process.pid,
                    description, child_threads, self._threads - child_threads)
        self._reader = threading.Thread(target=self._read, args=(receiver, progress), daemon=True)
        self._reader.start()

    def _read(self, receiver, progress: ProgressFactory) -> None:
        """Mirror the child's progress bars with `progress` and keep its final message."""
        bars: dict[int, tuple[Any, Advance]] = {}
        try:
            while True:
                message = pickle.loads(receiver.recv_bytes())
                kind = message[0]
                if kind == "open":
                    manager = progress(message[2], message[3])
                    bars[message[1]] = (manager, manager.__enter__())
                elif kind == "advance":
                    bars[message[1]][1](message[2])
                elif kind == "close":
                    manager, _ = bars.pop(message[1])
                    manager.__exit__(None, None, None)
                else:
                    self._outcome = message
                    return
        except EOFError:
            self._outcome = ("crashed", None)
        except Exception as error:  # a message that does not unpickle here, e.g. an exception class
            logger.error("could not read a message of the forked process for %s: %r", self.description, error)
            self._outcome = ("error-text", f"its message could not be read here: {error!r}")
        finally:
            for manager, _ in bars.values():
                manager.__exit__(None, None, None)
            receiver.close()
            self._done.set()

    def poll(self) -> bool:
        """Return whether the child is done; once it is, give this process its threads back."""
        if not self._done.is_set():
            return False
        if torch.get_num_threads() != self._threads:
            torch.set_num_threads(self._threads)
        return True

    def polling(self, callback: Callable | None) -> Callable:
        """Wrap `callback` (None for none) so that every call also polls the child."""

        def call_and_poll(*args):
            value = callback(*args) if callback is not None else None
            self.poll()
            return value

        return call_and_poll

    def watch(self, progress: ProgressFactory) -> ProgressFactory:
        """Wrap `progress` so that every advance also polls the child."""

        @contextmanager
        def watched(description: str, total: int) -> Iterator[Advance]:
            with progress(description, total) as advance:
                yield self.polling(advance)

        return watched

    def result(self) -> Any:
        """Wait for the child and return the job's value, or raise the job's exception."""
        self._done.wait()
        self._process.join()
        self.poll()
        kind, value = self._outcome
        if kind == "result":
            return value
        if kind == "error":
            error, text = value
            raise error from SideJobError(f"traceback of {self.description} in its forked process:\n{text}")
        if kind == "error-text":
            raise SideJobError(f"{self.description} failed in its forked process:\n{value}")
        raise SideJobError(f"the forked process running {self.description} ended without a result (exit code "
                           f"{self._process.exitcode}, negative means killed by that signal, e.g. -9 when out of "
                           f"memory); rerun with --serial (parallel=False in Python) to run everything in "
                           f"one process")

    def stop(self) -> None:
        """Terminate the child if it still runs and give the threads back."""
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(timeout=10)
            if self._process.is_alive():
                self._process.kill()
                self._process.join()
        self._reader.join(timeout=10)
        torch.set_num_threads(self._threads)


class FinishedJob:
    """A job that already ran in this process; the same interface as `SideJob`."""

    def __init__(self, value: Any):
        self._value = value

    def poll(self) -> bool:
        return True

    def polling(self, callback: Callable | None) -> Callable | None:
        return callback

    def watch(self, progress: ProgressFactory) -> ProgressFactory:
        return progress

    def result(self) -> Any:
        return self._value

    def stop(self) -> None:
        pass


@contextmanager
def side_job(job: Job, description: str, *, progress: ProgressFactory = no_progress,
             enabled: bool = True) -> Iterator[SideJob | FinishedJob]:
    """Run `job(progress)` in a forked process while the `with` body runs here.

    Call `.result()` inside the body to collect the value. Leaving the body by an exception
    terminates the child. Without forking (see `can_fork`), the job runs here before the body.
    """
    if not (enabled and can_fork()):
        yield FinishedJob(job(progress))
        return
    running = SideJob(job, description, progress)
    try:
        yield running
    finally:
        running.stop()


def into_bar(advance: Advance | None) -> ProgressFactory:
    """Return a progress factory whose every bar advances the existing bar `advance` (None: no bar)."""

    @contextmanager
    def factory(description: str, total: int) -> Iterator[Advance]:
        yield advance or (lambda n: None)

    return factory


def split_work(work: Callable[[Sequence[Item], Advance], Result], items: Sequence[Item], description: str, *,
               advance: Advance | None = None, enabled: bool = True) -> list[Result]:
    """Run `work(items[1::2], ...)` in a forked process and `work(items[0::2], ...)` here.

    Returns the results, this process's first. Without forking (see `can_fork`) it returns
    `[work(items, advance)]`. Both halves advance `advance`, the bar of the caller.
    """
    advance = advance or (lambda n: None)
    if not (enabled and can_fork()) or len(items) < 2:
        return [work(items, advance)]

    def job(progress: ProgressFactory) -> Result:
        with progress(description, len(items[1::2])) as forwarded:
            return work(items[1::2], forwarded)

    with side_job(job, description, progress=into_bar(advance)) as other:
        mine = work(items[0::2], other.polling(advance))
        return [mine, other.result()]


def _run_child(job: Job, sender, threads: int) -> None:
    from transformers.utils import logging as transformers_logging

    # `stop()` ends the child with SIGTERM, which should kill it at once, even where the parent
    # turned SIGTERM into an exception.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    torch.set_num_threads(threads)
    # Loading bars drawn here would interleave with the parent's bars; the job's own progress goes
    # to the parent through `forwarded`.
    transformers_logging.disable_progress_bar()
    keys = itertools.count()

    def send(message: tuple) -> None:
        sender.send_bytes(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))

    @contextmanager
    def forwarded(description: str, total: int) -> Iterator[Advance]:
        key = next(keys)
        send(("open", key, description, total))
        try:
            yield lambda n: send(("advance", key, n))
        finally:
            send(("close", key))

    try:
        send(("result", job(forwarded)))
    except BaseException as error:  # every failure, Ctrl-C included, goes back to the parent
        text = traceback.format_exc()
        try:
            payload = pickle.dumps(("error", (error, text)), protocol=pickle.HIGHEST_PROTOCOL)
            pickle.loads(payload)  # an exception class with extra constructor arguments fails here
        except Exception:
            payload = pickle.dumps(("error-text", text), protocol=pickle.HIGHEST_PROTOCOL)
        sender.send_bytes(payload)
