"""Iteration-level replay of requests on a set of continuously batching replicas.

Each replica runs engine iterations back to back (see `model.ReplicaModel`): an iteration takes
up to the prefill budget of prompt tokens, first come first served (chunked prefill), and one
token from every decoding sequence. A request's first token comes out at the end of the iteration
that finishes its prompt. Requests are admitted to a batch while a sequence slot is free and the
KV cache can hold their prompt plus output. Runs of decode-only iterations are taken in one jump
(the time of each is still added up one by one), so an hour of traffic costs a few million cheap
steps rather than one Python call per iteration.

A router in front holds requests first in, first out and hands each to the ready replica with
the fewest requests on it, up to `max_num_seqs` per replica (Ray Serve's `max_ongoing_requests`
set to the engine's batch size), so that a replica that comes up takes the backlog at once.
Starting replicas become ready after their cold start; draining replicas take no new requests
and switch off when empty.

The hot loop is compiled with numba when it is installed and runs as plain Python otherwise
(same results, far slower; fine for unit tests).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from llama4_operator.planners.compiled import FloatArray, IntArray
from llama4_operator.planners.compiled import compiled as _compiled
from llama4_operator.simulator.model import ReplicaModel
from llama4_operator.simulator.traces import Trace

OFF, STARTING, READY, DRAINING = 0, 1, 2, 3

# Columns of the per-request arrays.
ARRIVAL, FIRST_TOKEN, FINISH = 0, 1, 2
PROMPT, OUTPUT, REMAINING_PREFILL, REMAINING_DECODE, CONTEXT, ADMITTED, REPLICA = range(7)
# Columns of the per-replica arrays.
CLOCK, READY_AT, LAST_BUSY_END = 0, 1, 2
STATE, USED_SLOTS, KV_RESERVED, KV_LIVE = range(4)
# Slots of the shared counters.
NEXT_ARRIVAL, NEXT_TO_ROUTE, ROUTE_CURSOR = 0, 1, 2
PROMPT_DONE, GENERATED_DONE = 0, 1


# One flat loop on purpose: numba compiles it to tight machine code; splitting it into helpers
# would pass a dozen arrays around for no clarity gained.
@_compiled
def _run_replica(  # noqa: PLR0912, PLR0915
    r: int,
    target: float,
    params: FloatArray,
    req_time: FloatArray,
    req_tok: IntArray,
    rep_time: FloatArray,
    rep_int: IntArray,
    slots: IntArray,
    scratch: IntArray,
    totals: FloatArray,
) -> None:
    """Run replica r's iterations that start before `target`."""
    a, b, c = params[0], params[1], params[2]
    budget_tokens = int(params[3])
    kv_capacity = int(params[5])
    while rep_time[r, CLOCK] < target:
        used = rep_int[r, USED_SLOTS]
        if used == 0:
            rep_time[r, CLOCK] = target
            return
        start = rep_time[r, CLOCK]
        # Admit first come first served while the KV cache can hold the whole request. Slots
        # are in arrival order; the router may hand over requests that arrive later on.
        for k in range(used):
            i = slots[r, k]
            if req_time[i, ARRIVAL] > start:
                break
            if req_tok[i, ADMITTED] == 0:
                need = req_tok[i, PROMPT] + req_tok[i, OUTPUT]
                if rep_int[r, KV_RESERVED] + need > kv_capacity:
                    break
                req_tok[i, ADMITTED] = 1
                rep_int[r, KV_RESERVED] += need
        budget = budget_tokens
        prefill_tokens = 0
        decoding = 0
        context_sum = 0
        min_remaining = 1 << 62
        next_arrival = np.inf
        for k in range(used):
            i = slots[r, k]
            scratch[k] = 0
            if req_time[i, ARRIVAL] > start:
                next_arrival = min(next_arrival, req_time[i, ARRIVAL])
                continue
            if req_tok[i, ADMITTED] == 0:
                continue
            if req_tok[i, REMAINING_PREFILL] > 0:
                if budget > 0:
                    take = min(req_tok[i, REMAINING_PREFILL], budget)
                    budget -= take
                    prefill_tokens += take
                    scratch[k] = take
            else:
                scratch[k] = -1
                decoding += 1
                context_sum += req_tok[i, CONTEXT]
                min_remaining = min(min_remaining, req_tok[i, REMAINING_DECODE])
        if prefill_tokens == 0 and decoding == 0:
            # Idle until the next routed request arrives (or blocked on KV, which cannot last:
            # an empty replica fits any request the router lets through).
            rep_time[r, CLOCK] = min(next_arrival, target)
            continue
        if prefill_tokens > 0:
            steps = 1
            end = start + a + b * prefill_tokens + c * context_sum
        else:
            # Decode-only: nothing changes the batch until a sequence ends, a request arrives
            # or `target` passes.
            steps = 0
            end = start
            while steps < min_remaining and end < target and end < next_arrival:
                end += a + c * (context_sum + decoding * steps)
                steps += 1
        finished = 0
        for k in range(used):
            i = slots[r, k]
            if scratch[k] > 0:
                req_tok[i, REMAINING_PREFILL] -= scratch[k]
                rep_int[r, KV_LIVE] += scratch[k]
                totals[PROMPT_DONE] += scratch[k]
                if req_tok[i, REMAINING_PREFILL] == 0:
                    req_time[i, FIRST_TOKEN] = end
                    totals[GENERATED_DONE] += 1
                    rep_int[r, KV_LIVE] += 1
                    req_tok[i, CONTEXT] = req_tok[i, PROMPT] + 1
                    req_tok[i, REMAINING_DECODE] = req_tok[i, OUTPUT] - 1
                    if req_tok[i, REMAINING_DECODE] == 0:
                        req_time[i, FINISH] = end
                        finished += 1
            elif scratch[k] == -1:
                req_tok[i, REMAINING_DECODE] -= steps
                req_tok[i, CONTEXT] += steps
                rep_int[r, KV_LIVE] += steps
                totals[GENERATED_DONE] += steps
                if req_tok[i, REMAINING_DECODE] == 0:
                    req_time[i, FINISH] = end
                    finished += 1
        rep_time[r, CLOCK] = end
        rep_time[r, LAST_BUSY_END] = end
        if finished > 0:
            # Drop finished requests, keeping the others in arrival order.
            kept = 0
            for k in range(used):
                i = slots[r, k]
                if req_tok[i, REMAINING_PREFILL] == 0 and req_tok[i, REMAINING_DECODE] == 0:
                    rep_int[r, KV_RESERVED] -= req_tok[i, PROMPT] + req_tok[i, OUTPUT]
                    rep_int[r, KV_LIVE] -= req_tok[i, CONTEXT]
                else:
                    slots[r, kept] = i
                    kept += 1
            rep_int[r, USED_SLOTS] = kept


@_compiled
def _route(
    now: float,
    params: FloatArray,
    req_time: FloatArray,
    req_tok: IntArray,
    rep_time: FloatArray,
    rep_int: IntArray,
    slots: IntArray,
    cursor: IntArray,
) -> None:
    """Hand waiting requests, oldest first, to the ready replica with the fewest requests."""
    max_seqs = int(params[4])
    kv_capacity = int(params[5])
    replicas = rep_int.shape[0]
    while cursor[NEXT_TO_ROUTE] < cursor[NEXT_ARRIVAL]:
        i = cursor[NEXT_TO_ROUTE]
        if req_tok[i, PROMPT] + req_tok[i, OUTPUT] > kv_capacity:
            # Can never fit: rejected, as an engine rejects a request over max_model_len.
            req_time[i, FIRST_TOKEN] = -1.0
            req_time[i, FINISH] = -1.0
            cursor[NEXT_TO_ROUTE] += 1
            continue
        best = -1
        best_load = max_seqs
        # Start the scan at a rotating replica so that ties do not always go to replica 0.
        start = cursor[ROUTE_CURSOR] % replicas
        for step in range(replicas):
            r = (start + step) % replicas
            if rep_int[r, STATE] == READY and rep_int[r, USED_SLOTS] < best_load:
                best = r
                best_load = rep_int[r, USED_SLOTS]
        if best < 0:
            return
        cursor[ROUTE_CURSOR] += 1
        slots[best, rep_int[best, USED_SLOTS]] = i
        rep_int[best, USED_SLOTS] += 1
        req_tok[i, REPLICA] = best
        rep_time[best, CLOCK] = max(rep_time[best, CLOCK], now)
        cursor[NEXT_TO_ROUTE] += 1


@_compiled
def _advance(
    t_end: float,
    sync_s: float,
    params: FloatArray,
    req_time: FloatArray,
    req_tok: IntArray,
    rep_time: FloatArray,
    rep_int: IntArray,
    slots: IntArray,
    scratch: IntArray,
    totals: FloatArray,
    cursor: IntArray,
    clock: FloatArray,
) -> None:
    """Move the whole cluster forward to `t_end` in steps of at most `sync_s`.

    At the start of each step the router hands out every request arriving within it, seeing
    the replicas as they were then (as a real router works from slightly old queue lengths);
    the replicas then run, each request entering a batch no earlier than its arrival.
    """
    n = req_time.shape[0]
    replicas = rep_int.shape[0]
    while clock[0] < t_end:
        now = clock[0]
        t_next = min(now + sync_s, t_end)
        for r in range(replicas):
            if rep_int[r, STATE] == STARTING and now < rep_time[r, READY_AT] < t_next:
                t_next = rep_time[r, READY_AT]
        nxt = cursor[NEXT_ARRIVAL]
        while nxt < n and req_time[nxt, ARRIVAL] <= t_next:
            nxt += 1
        cursor[NEXT_ARRIVAL] = nxt
        _route(now, params, req_time, req_tok, rep_time, rep_int, slots, cursor)
        for r in range(replicas):
            state = rep_int[r, STATE]
            if state == READY or state == DRAINING:  # noqa: PLR1714, SIM109 (numba-friendly)
                _run_replica(
                    r, t_next, params, req_time, req_tok, rep_time, rep_int, slots, scratch, totals
                )
                if state == DRAINING and rep_int[r, USED_SLOTS] == 0:
                    rep_int[r, STATE] = OFF
            elif state == STARTING and rep_time[r, READY_AT] <= t_next:
                rep_int[r, STATE] = READY
                rep_time[r, CLOCK] = t_next
        clock[0] = t_next


@_compiled
def _gauges(
    now: float,
    req_time: FloatArray,
    req_tok: IntArray,
    rep_int: IntArray,
    slots: IntArray,
    cursor: IntArray,
    out: FloatArray,
) -> None:
    """Queue and batch gauges at `now`, as a serving engine and its router export them.

    out: waiting requests (not yet scheduled), waiting prompt tokens, running requests,
    ongoing requests (at the router or on a replica), live KV tokens on ready replicas.
    """
    waiting = 0.0
    waiting_tokens = 0.0
    running = 0.0
    kv_live = 0.0
    for i in range(cursor[NEXT_TO_ROUTE], cursor[NEXT_ARRIVAL]):
        waiting += 1
        waiting_tokens += req_tok[i, REMAINING_PREFILL]
    ongoing = waiting
    for r in range(rep_int.shape[0]):
        if rep_int[r, STATE] == OFF or rep_int[r, STATE] == STARTING:
            continue
        if rep_int[r, STATE] == READY:
            kv_live += rep_int[r, KV_LIVE]
        for k in range(rep_int[r, USED_SLOTS]):
            i = slots[r, k]
            ongoing += 1
            waiting_tokens += req_tok[i, REMAINING_PREFILL]
            if req_tok[i, ADMITTED] == 1 and req_tok[i, REMAINING_PREFILL] < req_tok[i, PROMPT]:
                running += 1
            else:
                waiting += 1
    out[0] = waiting
    out[1] = waiting_tokens
    out[2] = running
    out[3] = ongoing
    out[4] = kv_live


@dataclass(frozen=True)
class ClusterGauges:
    """A snapshot of the cluster's queues, as the serving metrics would report it."""

    waiting_requests: float
    waiting_tokens: float
    running_requests: float
    ongoing_requests: float
    kv_live_tokens: float


@dataclass
class ReplicaLifetime:
    """When a replica was asked for and when it stopped costing money (None: still running)."""

    requested_at: float
    ready_at: float
    ended_at: float | None = None


class ClusterEngine:
    """The replicas, the router and every request of one trace; moved forward with `advance`."""

    def __init__(
        self,
        trace: Trace,
        model: ReplicaModel,
        max_replicas: int,
        seed: int = 0,
        sync_s: float = 0.1,
    ):
        n = trace.requests
        self.model = model
        self._params = np.array(
            [
                model.iteration_base_s,
                model.prefill_s_per_token,
                model.decode_s_per_context_token,
                model.prefill_budget_tokens,
                model.max_num_seqs,
                model.kv_capacity_tokens,
            ],
            dtype=np.float64,
        )
        self.req_time = np.full((n, 3), np.nan, dtype=np.float64)
        self.req_time[:, ARRIVAL] = trace.arrival_s
        self.req_tok = np.zeros((n, 7), dtype=np.int64)
        self.req_tok[:, PROMPT] = trace.prompt_tokens
        self.req_tok[:, OUTPUT] = trace.output_tokens
        self.req_tok[:, REMAINING_PREFILL] = trace.prompt_tokens
        self.req_tok[:, REPLICA] = -1
        # Room for draining replicas beside a full set of live ones.
        slots_total = 2 * max_replicas + 2
        self.rep_time = np.zeros((slots_total, 3), dtype=np.float64)
        self.rep_int = np.zeros((slots_total, 4), dtype=np.int64)
        self.slots = np.full((slots_total, model.max_num_seqs), -1, dtype=np.int64)
        self._scratch = np.zeros(model.max_num_seqs, dtype=np.int64)
        self.totals = np.zeros(2, dtype=np.float64)
        self._cursor = np.zeros(3, dtype=np.int64)
        self._cursor[ROUTE_CURSOR] = int(np.random.default_rng(seed).integers(0, slots_total))
        self._gauge_out = np.zeros(5, dtype=np.float64)
        self._clock = np.zeros(1, dtype=np.float64)
        self.sync_s = sync_s
        self.now = 0.0
        self.lifetimes: dict[int, ReplicaLifetime] = {}
        self.ended: list[ReplicaLifetime] = []

    def advance(self, t_end: float) -> None:
        """Simulate up to `t_end` seconds."""
        if t_end < self.now:
            raise ValueError("the engine cannot go back in time")
        _advance(
            t_end,
            self.sync_s,
            self._params,
            self.req_time,
            self.req_tok,
            self.rep_time,
            self.rep_int,
            self.slots,
            self._scratch,
            self.totals,
            self._cursor,
            self._clock,
        )
        self.now = t_end
        self._retire_switched_off()

    def gauges(self) -> ClusterGauges:
        _gauges(
            self.now,
            self.req_time,
            self.req_tok,
            self.rep_int,
            self.slots,
            self._cursor,
            self._gauge_out,
        )
        out = self._gauge_out
        return ClusterGauges(float(out[0]), float(out[1]), float(out[2]), float(out[3]), out[4])

    def count(self, state: int) -> int:
        return int(np.count_nonzero(self.rep_int[:, STATE] == state))

    @property
    def ready(self) -> int:
        return self.count(READY)

    @property
    def live(self) -> int:
        """Replicas asked for and not being removed: starting plus ready."""
        return self.count(STARTING) + self.count(READY)

    def add_replica(self, cold_start_s: float) -> None:
        """Ask for a replica now; it serves after `cold_start_s`."""
        free = np.flatnonzero(self.rep_int[:, STATE] == OFF)
        if len(free) == 0:
            raise RuntimeError("no room for another replica; raise max_replicas")
        r = int(free[0])
        self.rep_int[r, :] = 0
        self.slots[r, :] = -1
        if cold_start_s <= 0:
            self.rep_int[r, STATE] = READY
            self.rep_time[r, CLOCK] = self.now
        else:
            self.rep_int[r, STATE] = STARTING
            self.rep_time[r, READY_AT] = self.now + cold_start_s
        self.rep_time[r, LAST_BUSY_END] = self.now
        self.lifetimes[r] = ReplicaLifetime(self.now, self.now + max(cold_start_s, 0.0))

    def remove_replica(self) -> None:
        """Cancel the starting replica furthest from ready, else drain the least busy one."""
        starting = np.flatnonzero(self.rep_int[:, STATE] == STARTING)
        if len(starting):
            r = int(starting[np.argmax(self.rep_time[starting, READY_AT])])
            self.rep_int[r, STATE] = OFF
            self._end(r, self.now)
            return
        ready = np.flatnonzero(self.rep_int[:, STATE] == READY)
        if len(ready) == 0:
            raise RuntimeError("no replica to remove")
        r = int(ready[np.argmin(self.rep_int[ready, USED_SLOTS])])
        if self.rep_int[r, USED_SLOTS] == 0:
            self.rep_int[r, STATE] = OFF
            self._end(r, self.now)
        else:
            self.rep_int[r, STATE] = DRAINING

    def _end(self, r: int, at: float) -> None:
        lifetime = self.lifetimes.pop(r)
        lifetime.ended_at = at
        self.ended.append(lifetime)

    def _retire_switched_off(self) -> None:
        for r in [r for r in self.lifetimes if self.rep_int[r, STATE] == OFF]:
            self._end(r, max(self.rep_time[r, LAST_BUSY_END], self.lifetimes[r].requested_at))

    def replica_seconds(self) -> float:
        """Seconds of replicas paid for so far (asked for until switched off)."""
        running = sum(self.now - life.requested_at for life in self.lifetimes.values())
        ended = sum((life.ended_at or self.now) - life.requested_at for life in self.ended)
        return running + ended
