"""What runs beside the answering passes on the driver: the output's lease renewal and the progress lines."""

from __future__ import annotations

import math
import threading
import time

POOL_ACTOR_CLASS = "MapWorker"  # Ray Data's actor class for a pool's actors (the GCS table's class name)


class Ticker:
    """Calls ``tick()`` every ``every`` seconds on a daemon thread while the context is open."""

    def __init__(self, every_s: float, name: str):
        self.every = every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name=name)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            self.tick()

    def tick(self) -> None:
        raise NotImplementedError


class LeaseKeeper(Ticker):
    """Renews the run's lease on the output every LEASE_RENEW_S while the job answers."""

    def __init__(self, output):
        from pipeline.commit import LEASE_RENEW_S

        super().__init__(LEASE_RENEW_S, "qa-lease")
        self.output = output

    def tick(self) -> None:
        try:
            self.output.renew_lease()
        except OSError:  # a missed renewal only shortens the lease; the next tick retries
            pass


class ProgressReporter(Ticker):
    """A line every few seconds for headless logs (`ray job logs`): rows done/total, rate, ETA."""

    def __init__(self, stats, total_rows: int, every_s: float):
        super().__init__(every_s, "qa-progress")
        self.stats, self.total = stats, total_rows
        self._t0 = time.time()

    def tick(self) -> None:
        import ray

        try:
            totals, long_rows = ray.get([self.stats.totals.remote(), self.stats.long_rows.remote()], timeout=10)
        except Exception:  # noqa: BLE001 - progress must never fail the job; the next tick retries
            return
        alive = answering_actors()
        actors = f"{totals.actors} actors started" if alive is None else \
            f"{alive[0]} actors on {alive[1]} nodes ({totals.actors} started)"
        print(progress_line(totals.input_rows, self.total, time.time() - self._t0, actors, long_rows), flush=True)


def progress_line(done: int, total: int, elapsed_s: float, actors: str, long_rows: list = ()) -> str:
    """``progress: 40/101 rows (39.6%), 2.1 rows/s, ETA 0:00:29, 2 actors on 1 nodes (2 started)``, then
    ``; row ID: DONE/TOTAL windows`` for each long row an actor is working through (jobs.ray_stage.LongRow): rows
    one actor answers alone, whose rows are counted only once they are done. The ETA is the later of the rows' and
    the long rows' own (their windows left at their rate so far)."""
    rate = done / elapsed_s if elapsed_s > 0 else 0.0
    eta = (total - done) / rate if rate > 0 else float("nan")
    eta = max([eta, *(r.eta_s() for r in long_rows)], key=lambda s: -1 if math.isnan(s) else s)
    line = (f"progress: {done}/{total} rows ({100 * done / max(total, 1):.1f}%), {rate:.1f} rows/s, "
            f"ETA {_clock(eta)}, {actors}")
    return line + "".join(f"; row {r.row}: {r.done}/{r.total} windows" for r in long_rows)


def answering_actors() -> tuple[int, int] | None:
    """(answering actors alive now, the nodes they are on), from the GCS actor table (one call, this job's
    alive actors only); None if it cannot be read. ``ray._private.state``: Ray's public state API needs the
    dashboard, which a cluster may run without."""
    import ray
    import ray._private.state

    try:
        table = ray._private.state.actors(job_id=ray.JobID.from_hex(ray.get_runtime_context().get_job_id()),
                                          actor_state_name="ALIVE")
    except Exception:  # noqa: BLE001 - progress must never fail the job
        return None
    nodes = [a["Address"]["NodeID"] for a in table.values() if POOL_ACTOR_CLASS in a["ActorClassName"]]
    return len(nodes), len(set(nodes))


def _clock(seconds: float) -> str:
    if math.isnan(seconds):  # no rate yet
        return "unknown"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}"
