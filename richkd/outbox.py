"""A bounded FIFO of pending writes to a service that may be down, with back-off (docs/architecture.md, "Data flow").
Plain Python: `richkd.tracking.RunWriter` keeps its MLflow writes here, so a tracking server that is down delays the
logging but never stops the work."""
from __future__ import annotations

import logging
import time
from collections import deque
from typing import Callable, Optional

log = logging.getLogger(__name__)


class Outbox:
    """FIFO of pending writes (tuples, the kind first) with back-off; never raises. A write that fails while a
    cheap probe fails too means the store is down: it stays queued, one warning says so, and retries wait a doubling
    delay (first_delay_s .. max_delay_s). A write that fails while the probe answers (a bad write, or a server half-way
    through a restart) is retried after the first delay and skipped after REJECTS_BEFORE_SKIP tries. Beyond `max_ops`
    the oldest per-step metric records are dropped, said once (a sweep's are in Tune's trial_*/result.json too)."""

    REJECTS_BEFORE_SKIP = 3
    DROPPABLE = "metrics"

    def __init__(self, target: str, max_ops: int = 20000, first_delay_s: float = 2.0, max_delay_s: float = 60.0):
        self.target, self.max_ops = target, max_ops
        self.first_delay_s, self.max_delay_s = first_delay_s, max_delay_s
        self.ops: deque = deque()
        self.dropped = 0          # metric records given up because the outbox was full
        self.skipped = 0          # writes the (reachable) store rejected
        self._reset()
        self._warned_full = False

    def _reset(self) -> None:
        self._down_since: Optional[float] = None
        self._next_try, self._delay, self._rejects = 0.0, self.first_delay_s, 0

    def __getstate__(self) -> dict:    # monotonic clocks do not survive a driver restart
        return {**self.__dict__, "_down_since": None, "_next_try": 0.0, "_delay": self.first_delay_s, "_rejects": 0}

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
            victim = next((i for i, o in enumerate(self.ops) if o[0] == self.DROPPABLE), None)
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
        """Send pending writes in order; True when none is left. Waits out the back-off unless `force`."""
        if not self.ops:
            return True
        if not force and time.monotonic() < self._next_try:
            return False
        sent = 0
        while self.ops:
            op = self.ops[0]
            try:
                apply(op)
            except Exception as exc:  # MLflow raises MlflowException, requests / SQLAlchemy errors, OSError
                try:
                    up = bool(reachable())
                except Exception:
                    up = False
                if not up:
                    now = time.monotonic()
                    if self._down_since is None:
                        self._down_since = now
                        log.warning("MLflow at %s is unreachable (%s); the work continues, its writes are buffered "
                                    "(%d pending) and retried with back-off up to every %.0f s", self.target,
                                    _one_line(exc), len(self.ops), self.max_delay_s)
                    else:
                        self._delay = min(self._delay * 2, self.max_delay_s)
                    self._next_try = now + self._delay
                    return False
                self._rejects += 1
                if self._rejects < self.REJECTS_BEFORE_SKIP:   # maybe a server half-way through a restart
                    self._next_try = time.monotonic() + self.first_delay_s
                    return False
                self.ops.popleft()
                self._rejects, self.skipped = 0, self.skipped + 1
                log.warning("MLflow at %s rejected a %s write %d times, skipped it: %s", self.target, op[0],
                            self.REJECTS_BEFORE_SKIP, _one_line(exc))
                continue
            self.ops.popleft()
            self._rejects, sent = 0, sent + 1
        if self.is_down:
            log.warning("MLflow at %s is reachable again after %.0f s: caught up %d buffered writes", self.target,
                        time.monotonic() - self._down_since, sent)
        self._reset()
        return True

    def drain(self, apply: Callable[[tuple], None], reachable: Callable[[], bool], wait_s: float) -> bool:
        """Flush, retrying with the back-off delays for up to `wait_s` seconds (the end of a command)."""
        deadline = time.monotonic() + max(0.0, wait_s)
        while not self.flush(apply, reachable, force=True):
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(self._delay, left))
        return True


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]
