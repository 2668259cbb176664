"""`GET /metrics`: the server's counters in Prometheus' text exposition format (version 0.0.4), written by hand so
the server needs no client library. Counters only grow while the process lives; a restart starts them at 0,
which Prometheus' rate() already expects."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterable, Mapping

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _label(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    """What the HTTP layer counts (the engine counts its own batches): chat requests by outcome, admin operations
    by kind, and fits with their seconds. Thread-safe: counted from the event loop and the thread pool."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: Counter[str] = Counter()  # ok, error (generation failed), refused (a 4xx)
        self.admin: Counter[str] = Counter()  # added, uploaded, fitted, deleted, bound
        self.fits = 0
        self.fit_seconds = 0.0

    def count_request(self, outcome: str) -> None:
        with self._lock:
            self.requests[outcome] += 1

    def count_admin(self, operation: str) -> None:
        with self._lock:
            self.admin[operation] += 1

    def count_fit(self, seconds: float) -> None:
        with self._lock:
            self.fits += 1
            self.fit_seconds += float(seconds)

    def render(self, engine, loaded: Iterable[str]) -> str:
        """The exposition text: this object's counters, the engine's batches and gate fires (for the loaded
        erasers only: a withdrawn request's name leaves /metrics with it), and the batcher's liveness."""
        loaded = list(loaded)
        with self._lock:
            requests, admin, fits, fit_seconds = dict(self.requests), dict(self.admin), self.fits, self.fit_seconds
        fires = dict(engine.gate_fires)
        out: list[str] = []

        def family(name: str, kind: str, help_text: str, samples: Mapping[str, float] | float,
                   label: str | None = None) -> None:
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} {kind}")
            if label is None:
                out.append(f"{name} {_number(samples)}")
            else:
                for key, value in samples.items():
                    out.append(f'{name}{{{label}="{_label(key)}"}} {_number(value)}')

        family("mllmeraser_batcher_up", "gauge", "1 while the batcher thread runs, 0 once it has died",
               1 if engine.alive else 0)
        family("mllmeraser_chat_requests_total", "counter", "chat completions by outcome (ok, error: generation "
               "failed, refused: a 4xx)", {k: requests.get(k, 0) for k in ("ok", "error", "refused")}, "outcome")
        family("mllmeraser_batches_total", "counter", "forward batches run by the batcher", engine.batch_count)
        family("mllmeraser_batch_rows_total", "counter", "rows (requests) in those batches", engine.row_count)
        family("mllmeraser_erasers_loaded", "gauge", "erasers being applied", len(loaded))
        family("mllmeraser_gate_fires_total", "counter", "rows whose prompt gate fired each loaded eraser",
               {name: fires.get(name, 0) for name in loaded}, "eraser")
        family("mllmeraser_admin_operations_total", "counter", "acknowledged admin changes by kind",
               {k: admin.get(k, 0) for k in ("added", "uploaded", "fitted", "deleted", "bound")}, "operation")
        out.append("# HELP mllmeraser_fit_seconds seconds spent fitting deletion requests on the server")
        out.append("# TYPE mllmeraser_fit_seconds summary")
        out.append(f"mllmeraser_fit_seconds_sum {_number(fit_seconds)}")
        out.append(f"mllmeraser_fit_seconds_count {fits}")
        return "\n".join(out) + "\n"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))
