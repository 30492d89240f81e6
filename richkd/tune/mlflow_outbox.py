"""A bounded, retrying outbox for the sweep's MLflow writes: an unreachable tracking server never stops training.

Why: Tune runs callbacks on the driver thread, and an exception there ends the whole sweep; MLflow's own HTTP
client retries a dead server for minutes (7 retries with exponential back-off by default), stalling every trial.
So the MLflow callback puts each write in this FIFO as plain data and `flush` sends what it can. When a write
fails and the store does not answer a cheap probe either, the server is *down*: the write stays queued, a
single warning says so, and the next attempt waits an exponentially growing delay (2 s .. 60 s), so a dead
server costs one short failed request per delay, not one per report. When the probe answers but the write
still fails, the write may be bad (e.g. a run deleted by hand) or the server may be half-way up or down (a
probe can slip in between a refused write and a restart): the write is retried after the first delay, and
only after REJECTS_BEFORE_SKIP such failures in a row is it skipped with a warning instead of blocking the
queue forever. The queue is bounded; beyond `max_ops` the oldest per-epoch metric records are
dropped (counted and reported once) while run creation and trial summaries are kept. Every metric also lives
in Tune's own results (trial_*/result.json), so nothing reported by a trial is lost.
"""
from __future__ import annotations

import logging
import time
from collections import deque
from typing import Callable, Optional

log = logging.getLogger(__name__)

FIRST_DELAY_S = 2.0
MAX_DELAY_S = 60.0
DEFAULT_MAX_OPS = 20000
REJECTS_BEFORE_SKIP = 3    # failures of one write while the store answers the probe, before it is given up
DROPPABLE = "metrics"      # the op kind given up first when the outbox is full


class Outbox:
    """FIFO of pending write operations (tuples whose first item is the kind) with back-off state."""

    def __init__(self, target: str, max_ops: int = DEFAULT_MAX_OPS, first_delay_s: float = FIRST_DELAY_S,
                 max_delay_s: float = MAX_DELAY_S) -> None:
        self.target = target
        self.max_ops = max_ops
        self.first_delay_s = first_delay_s
        self.max_delay_s = max_delay_s
        self.ops: deque = deque()
        self.dropped = 0          # metric records given up because the outbox was full
        self.skipped = 0          # writes the (reachable) store rejected
        self.outages = 0          # how many times the store went down during this driver's life
        self._down_since: Optional[float] = None
        self._next_try = 0.0
        self._delay = first_delay_s
        self._warned_full = False
        self._rejects = 0         # consecutive failures of the head write while the store was reachable

    # -- state carried through Tune's experiment checkpoints (monotonic clocks do not survive a restart) --
    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.update(_down_since=None, _next_try=0.0, _delay=self.first_delay_s, _rejects=0)
        return state

    def export(self) -> dict:
        return {"ops": [list(op) for op in self.ops], "dropped": self.dropped}

    def restore(self, state: dict) -> None:
        self.ops = deque(tuple(op) for op in state.get("ops", []))
        self.dropped = int(state.get("dropped", 0))

    @property
    def is_down(self) -> bool:
        return self._down_since is not None

    def __len__(self) -> int:
        return len(self.ops)

    def put(self, op: tuple) -> None:
        self.ops.append(tuple(op))
        while len(self.ops) > self.max_ops:
            victim = next((i for i, o in enumerate(self.ops) if o[0] == DROPPABLE), None)
            if victim is None:     # nothing droppable: keep everything rather than lose a run or a summary
                break
            del self.ops[victim]
            self.dropped += 1
            if not self._warned_full:
                self._warned_full = True
                log.warning("MLflow outbox for %s is full (%d writes pending): dropping the oldest per-epoch metric "
                            "records; Tune's trial_*/result.json files still hold every metric", self.target,
                            self.max_ops)

    def flush(self, apply: Callable[[tuple], None], reachable: Callable[[], bool], force: bool = False) -> bool:
        """Send pending writes in order; True when none is left. Skips the attempt while backing off
        (unless `force`). Never raises: a failure either marks the store down or skips the bad write."""
        if not self.ops:
            return True
        now = time.monotonic()
        if not force and now < self._next_try:    # backing off (store down, or retrying a rejected write)
            return False
        sent = 0
        while self.ops:
            op = self.ops[0]
            try:
                apply(op)
            except Exception as exc:  # MLflow raises MlflowException, requests / SQLAlchemy errors, OSError
                if not _probe(reachable):
                    self._went_down(exc)
                    return False
                self._rejects += 1
                if self._rejects < REJECTS_BEFORE_SKIP:   # maybe a server half-way through a restart: retry soon
                    self._next_try = time.monotonic() + self.first_delay_s
                    return False
                self.ops.popleft()
                self._rejects = 0
                self.skipped += 1
                log.warning("MLflow at %s rejected a %s write %d times, skipped it: %s", self.target, op[0],
                            REJECTS_BEFORE_SKIP, _one_line(exc))
                continue
            self.ops.popleft()
            self._rejects = 0
            sent += 1
        if self.is_down:
            log.warning("MLflow at %s is reachable again after %.0f s: caught up %d buffered writes", self.target,
                        time.monotonic() - self._down_since, sent)
        self._down_since, self._delay, self._next_try = None, self.first_delay_s, 0.0
        return True

    def drain(self, apply: Callable[[tuple], None], reachable: Callable[[], bool], wait_s: float) -> bool:
        """Flush, retrying with the back-off delays for up to `wait_s` seconds (the end of a sweep)."""
        deadline = time.monotonic() + max(0.0, wait_s)
        while True:
            if self.flush(apply, reachable, force=True):
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(self._delay, left))

    def _went_down(self, exc: BaseException) -> None:
        now = time.monotonic()
        if self._down_since is None:
            self._down_since = now
            self.outages += 1
            log.warning("MLflow at %s is unreachable (%s); training continues, its writes are buffered (%d pending) "
                        "and retried with back-off up to every %.0f s", self.target, _one_line(exc), len(self.ops),
                        self.max_delay_s)
        else:
            self._delay = min(self._delay * 2, self.max_delay_s)
        self._next_try = now + self._delay


def _probe(reachable: Callable[[], bool]) -> bool:
    try:
        return bool(reachable())
    except Exception:
        return False


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]
