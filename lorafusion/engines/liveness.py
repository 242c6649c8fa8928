"""parallel.timeout_s: a rank that stops answering (hung, SIGSTOPped, its host gone) stops the run
on every other rank after timeout_s, with one line naming it, instead of torch's default 30-minute
wait and a backend error that names nobody.

The timeout itself is the process groups' (init_process_group, megatron's and DeepSpeed's groups:
DeepSpeed's through `set_group_timeouts`). Gloo's timeout error says only "Timed out waiting 5000ms for recv operation",
so each rank also beats a counter in the process group's store (a daemon thread, one increment
every `interval` seconds). When an operation times out, a rank reads every counter twice, a few
intervals apart: a stopped process's thread stops with it, so its counter is the one that does not
move. A rank that leaves (timed out itself, or finished) says so in the store first, so it is not
taken for the one that hung. Where the store cannot tell (it is unreachable, or nobody is
stalled), the message names what the blocked operation knows: the peer of a point-to-point
transfer (`waiting_on`), or else just that some rank did not answer.

With NCCL, torch's watchdog usually aborts the process itself at the timeout, with its own message.
"""

from __future__ import annotations

import datetime
import itertools
import re
import threading
import time
from contextlib import contextmanager

import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

# A gloo send/receive/collective that timed out, or whose peer went away; NCCL's and torch's own
# timeout errors say "timeout" or "Timeout".
_PEER_FAILURE = re.compile(r"Timed out waiting|[Tt]imeout|Connection (closed|reset) by peer")
# Agreed on by every rank (each builds the same number of watches), so a run in a process that ran
# another keeps its own keys.
_generation = itertools.count()


class RankStoppedAnswering(RuntimeError):
    """A peer did not answer within parallel.timeout_s; the message is one line."""


def process_groups() -> set:
    return {group for group in c10d._world.pg_map if group is not None}


def set_group_timeouts(timeout_s: float, groups) -> None:
    """Give `groups` (e.g. DeepSpeed's, which it creates with torch's default) the run's timeout."""
    timeout = datetime.timedelta(seconds=timeout_s)
    for group in groups:
        if not c10d._rank_not_in_group(group):
            c10d._set_pg_timeout(timeout, group)


def is_peer_failure(error: BaseException) -> bool:
    return isinstance(error, RuntimeError) and bool(_PEER_FAILURE.search(str(error)))


class PeerWatch:
    """This rank's heartbeat in the store, and the explanation of a timed-out operation."""

    def __init__(self, timeout_s: float, role: str):
        self.timeout_s = timeout_s
        self.role = role
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        # A beat every tenth of the timeout (at most 1 s); a rank counts as stalled when its counter
        # stands still for several beats, which a live process's thread never does.
        self.interval = min(1.0, timeout_s / 10)
        self.window = 4 * self.interval + 0.5
        self.waiting_on_peer: str | None = None
        self._prefix = f"lorafusion/liveness/{next(_generation)}/"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        try:
            self._store = c10d._get_default_store()
            self._store.set(f"{self._prefix}role/{self.rank}", role)
        except Exception:  # noqa: BLE001 - without a store the messages fall back on waiting_on
            self._store = None

    def start(self) -> None:
        if self._store is None:
            return
        self._thread = threading.Thread(target=self._beat, name="lorafusion-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        key = f"{self._prefix}beat/{self.rank}"
        try:
            self._store.add(key, 1)
            while not self._stop.wait(self.interval):
                self._store.add(key, 1)
        except Exception:  # noqa: BLE001 - the store is gone: the run is ending anyway
            return

    def stop(self, failed: bool = False) -> None:
        self._stop.set()
        self._announce_leaving("failed" if failed else "done")

    def _announce_leaving(self, why: str) -> None:
        if self._store is not None:
            try:
                self._store.set(f"{self._prefix}left/{self.rank}", why)
            except Exception:  # noqa: BLE001
                pass

    def _failed_ranks(self) -> list[int]:
        """The other ranks that left on an error of their own (not a timeout)."""
        failed = []
        for rank in range(self.world_size):
            key = f"{self._prefix}left/{rank}"
            try:
                if rank != self.rank and self._store.check([key]) and self._store.get(key) == b"failed":
                    failed.append(rank)
            except Exception:  # noqa: BLE001
                return failed
        return failed

    @contextmanager
    def waiting_on(self, peer: str):
        """Name `peer` (e.g. 'rank 1 (pipeline stage 1)') as the one a timeout inside would be waiting for."""
        self.waiting_on_peer = peer
        yield
        self.waiting_on_peer = None  # not on an exception: explain() reads it

    def stalled_ranks(self) -> list[int] | None:
        """The other ranks whose heartbeat stands still and which did not leave; None if the store
        cannot tell."""
        if self._store is None:
            return None
        store, others = self._store, [r for r in range(self.world_size) if r != self.rank]
        try:
            first = {r: store.add(f"{self._prefix}beat/{r}", 0) for r in others}
            time.sleep(self.window)
            return [
                r for r in others
                if store.add(f"{self._prefix}beat/{r}", 0) == first[r] and not store.check([f"{self._prefix}left/{r}"])
            ]
        except Exception:  # noqa: BLE001 - an unreachable store (hosted by the stopped rank)
            return None

    def _describe(self, rank: int) -> str:
        try:
            if self._store.check([f"{self._prefix}role/{rank}"]):
                return f"rank {rank} ({self._store.get(f'{self._prefix}role/{rank}').decode()})"
        except Exception:  # noqa: BLE001
            pass
        return f"rank {rank}"

    def explain(self, error: BaseException) -> RankStoppedAnswering:
        peer = self.waiting_on_peer
        self._stop.set()
        self._announce_leaving("timed out")  # before looking: the others must not take this rank for the stalled one
        stalled = self.stalled_ranks()
        failed = self._failed_ranks() if self._store is not None and not stalled else []
        if stalled:
            culprit = ", ".join(self._describe(r) for r in stalled) + " stopped answering"
        elif failed:
            culprit = ", ".join(self._describe(r) for r in failed) + " stopped on an error (see its output)"
        elif peer is not None:
            culprit = f"{peer} stopped answering"
        else:
            culprit = "a rank of the run stopped answering"
        what = "timed out" if re.search(r"[Tt]ime", str(error)) else "lost its connection"
        return RankStoppedAnswering(
            f"{culprit}: rank {self.rank} ({self.role}) {what} waiting for it "
            f"(parallel.timeout_s: {self.timeout_s:g}); the run stops (--resume continues it)"
        )


@contextmanager
def watching_peers(timeout_s: float, role: str):
    """Heartbeat while the body runs; a peer timeout inside becomes RankStoppedAnswering. A rank
    leaving on another error says so, so that the others name it when they lose it."""
    watch = PeerWatch(timeout_s, role)
    watch.start()
    try:
        yield watch
    except BaseException as error:
        if not is_peer_failure(error):
            watch.stop(failed=True)
            raise
        raise watch.explain(error) from None
    watch.stop()
