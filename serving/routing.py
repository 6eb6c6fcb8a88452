"""Which generator replica a request goes to: adapter affinity that gives way to load.

Ray Serve's default router sends a request with a ``multiplexed_model_id`` to a replica holding
that id for as long as that replica accepts requests, i.e. until its ongoing requests reach
``max_ongoing_requests``; only a full replica (or, for an id no replica holds,
``RAY_SERVE_MULTIPLEXED_MODEL_ID_MATCHING_TIMEOUT_S``) makes it look elsewhere. A popular
adapter set therefore queues on the one replica that loaded it first while the others idle, and
tuning the matching timeout does not help: it only applies once the holder refuses.

Here any replica can serve any adapter set (step-level batching gathers each sample's adapters
from slots; the fused path swaps them in), and holding a set only saves loading it: tens of
milliseconds from the replica's CPU tier, a few hundred from storage, against seconds of
rendering. So affinity should win only while it costs little waiting. For each request
:class:`AdapterAffinityRouter` prefers

1. among replicas holding any of the request's adapters, those holding the most of them, as
   long as the least loaded of those has at most ``affinity_slack`` more ongoing requests than
   the least loaded replica overall;
2. otherwise (or when that replica turns out to be full) the least loaded replica, ties going to
   the replica holding the fewest adapter sets, so new adapters spread over the replicas.

A replica that takes a popular set because the holder was busy loads it and becomes a holder
too, so a popular adapter ends up on as many replicas as its load needs. "Load" is the
replica's ongoing requests as the router knows them: its cache, updated as requests are sent
and finish, and probed from the replica when missing (as Serve's own routers do). Node locality
is not weighed: a render takes seconds, a hop between nodes milliseconds.

Configured by ``routing.*`` and installed through the generator deployment's
``request_router_config`` (Serve's request router API).
"""

from __future__ import annotations

import asyncio
import random
from typing import Optional

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica


def adapters_of(set_id: str) -> frozenset[str]:
    """The ``name@version`` parts of an adapter set id (``''``: no adapters)."""
    return frozenset(filter(None, set_id.split(",")))


def held_adapters(replica: RunningReplica) -> frozenset[str]:
    """Every adapter in the sets a replica holds (Serve reports them as multiplexed model ids)."""
    return frozenset(a for set_id in replica.multiplexed_model_ids for a in adapters_of(set_id))


class AdapterAffinityRouter(RequestRouter):
    """Serve request router of the generator deployment (see the module docstring)."""

    def initialize_state(self, affinity_slack: int = 2, **kwargs) -> None:
        self.affinity_slack = affinity_slack

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: Optional[PendingRequest] = None) -> list[list[RunningReplica]]:
        if pending_request is not None:
            # when every replica is full, the caller retries after a backoff instead of at once
            pending_request.routing_context.should_backoff = True
        if not candidate_replicas:
            return []
        # requests just assigned to a replica count themselves in the cache when their send runs
        # on this event loop: let those run first, so a burst is not routed on stale counts
        await asyncio.sleep(0)
        load = await self._ongoing_requests(candidate_replicas)
        open_replicas = [r for r in candidate_replicas if load.get(r.replica_id) is not None and load[r.replica_id] < r.max_ongoing_requests]
        if not open_replicas:  # all full or unreachable: Serve probes them again after the backoff
            return [candidate_replicas]
        by_load = sorted(open_replicas, key=lambda r: (load[r.replica_id], len(r.multiplexed_model_ids), random.random()))
        ranks = []
        wanted = adapters_of(pending_request.metadata.multiplexed_model_id) if pending_request is not None else frozenset()
        if wanted:
            overlap = {r.replica_id: len(wanted & held_adapters(r)) for r in open_replicas}
            most = max(overlap.values())
            if most:
                holder = next(r for r in by_load if overlap[r.replica_id] == most)
                if load[holder.replica_id] <= load[by_load[0].replica_id] + self.affinity_slack:
                    ranks.append([holder])
        ranks.append(by_load)
        return ranks

    async def _ongoing_requests(self, replicas: list[RunningReplica]) -> dict:
        """{replica_id: ongoing requests or None (did not answer)}: from the router's cache, and
        probed for replicas missing from it or recorded as full."""
        load, probe = {}, []
        for r in replicas:
            known = self.replica_queue_len_cache.get(r.replica_id) if self._use_replica_queue_len_cache else None
            if known is None or known >= r.max_ongoing_requests:
                probe.append(r)
            else:
                load[r.replica_id] = known
        if probe:
            for r, queue_len in await self._probe_queue_lens(probe, 0):
                load[r.replica_id] = queue_len
        return load
