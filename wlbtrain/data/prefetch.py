"""The input pipeline: step N+1 is planned and gathered on the host while step N trains.

Planning a global batch and gathering its tokens from the store is host work of a few
milliseconds that would otherwise sit between two steps with the GPU idle. A background thread
runs the producer for each step in order, one step ahead: the packer is still driven by a single
thread in step order, so the plan is exactly the one a synchronous loop would make. Each step's
input carries the stream and packer state right after its plan, which is what a checkpoint of
that step must save (the live packer is already a step further).
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterable


@dataclass
class StepInput:
    step: int
    plan: list  # the global batch: every micro-batch's pieces
    state: dict  # {"stream", "packer"} state right after this plan: what a checkpoint saves
    batches: list  # this rank's micro-batches, gathered on the host
    seconds: float  # host time spent producing this input


@dataclass
class _Failed:
    error: BaseException


_END = object()


class InputPipeline:
    """``next()`` returns ``produce(step)`` for each step of ``steps`` in order; with
    ``background`` the next one is produced on a thread while the caller trains."""

    def __init__(self, produce: Callable[[int], StepInput], steps: Iterable[int],
                 background: bool = True):
        self._produce = produce
        self._steps = iter(steps)
        self._queue: queue.Queue = queue.Queue(maxsize=1)  # one step ahead, no more
        self._stop = threading.Event()
        self._thread = None
        if background:
            self._thread = threading.Thread(target=self._work, name="wlbtrain-input", daemon=True)
            self._thread.start()

    def next(self) -> StepInput:
        if self._thread is None:
            return self._produce(next(self._steps))
        item = self._queue.get()
        if isinstance(item, _Failed):
            # the producer's own error and traceback, raised where the step needed its input
            raise item.error
        if item is _END:
            raise StopIteration("the input pipeline has no more steps")
        return item

    def close(self) -> None:
        """Stop producing; an input made ahead of time is dropped (its state was never saved)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)

    def _work(self) -> None:
        try:
            for step in self._steps:
                if not self._offer(self._produce(step)):
                    return
            self._offer(_END)
        except BaseException as err:  # noqa: BLE001 - handed to the consumer, which re-raises
            self._offer(_Failed(err))

    def _offer(self, item: Any) -> bool:
        """Put ``item`` when there is room; False when stopped first."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __enter__(self) -> "InputPipeline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
