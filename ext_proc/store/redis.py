"""The ledger in Redis: for several replicas of the service sharing one budget.

Reserve, settle and expire are each one Lua script (registered once, run with EVALSHA), so each is atomic
against every other client. Keys (``prefix`` defaults to ``meshgen:``):

- ``{prefix}w:{tenant}:{kind}:{bucket}`` — a window total (integer; USD in micro-dollars, kind ``usd_per_day``),
  bucket = start of the UTC minute (rpm, tpm) or day (tpd, usd_per_day) in epoch seconds. Each write sets its TTL:
  2 minutes for minute windows, 2 days for day windows; a settle never re-creates an expired window (it skips it).
- ``{prefix}r:{id}`` — a reservation hash (tenant, model, tokens, usd micro-dollars, created, buckets, state
  open|estimated|exact, and the names of the three windows it was counted in), TTL 2 days from its creation.
- ``{prefix}m:{key}`` — a ``mark_once`` mark: the end of its window (the caller's clock), TTL until then (at
  least a second). A mark is taken when absent or ended, in one script, so a fake clock in tests behaves as the
  real one does.
- ``{prefix}open`` — sorted set of open reservation ids scored by creation time, for ``expire()``.

The settle and expire scripts touch keys named inside the reservation hash (not passed as KEYS), which standalone
Redis (and Sentinel) allows; Redis Cluster does not, and is not supported. TTLs are Redis's real clock; every
other time is the ``now`` the caller passes. An open reservation whose hash outlived its TTL is dropped from the
open set by ``expire()`` without being returned (call ``expire()`` far more often than every 2 days).

Cost, measured on loopback (2 cores, redis-py 8 without hiredis): a reserve ~150–190 µs wall, of which ~120–135 µs
is this process's CPU (redis-py's command path); settle and used are about the same.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from ext_proc.store import _ledger as L
from ext_proc.store.base import DAY_S, MINUTE_S, Cost, Limit, Limits, Settled, SettleItem, SettleState, Verdict

__all__ = ["RedisStore"]

MINUTE_TTL_S = 2 * MINUTE_S
"""TTL of a minute window, reset by each write in its minute: it lives at least a minute after the minute ends."""
DAY_TTL_S = 2 * DAY_S
"""TTL of a day window, reset by each write in its day: it lives at least a day after the day ends."""
RESERVATION_TTL_S = L.KEEP_S
DEFAULT_TIMEOUT_S = 0.2
"""Bound on connecting and on each reply (:meth:`RedisStore.from_url`): inside Envoy's admission timeout (250 ms
by default), far above a healthy call (~0.2 ms)."""
_EXPIRE_BATCH = 500

# KEYS: rpm, tpm, tpd, usd windows; reservation hash; open set.
# ARGV: tokens, usd micro, caps rpm tpm tpd usd ('' = unlimited), minute ttl, day ttl, reservation ttl,
#       id, tenant, model, created, minute bucket, day bucket.
# Returns {1, 0, totals...} admitted (totals after), or {0, index of refusing limit (1..4), totals as they stood}.
_RESERVE = """
local add = {1, tonumber(ARGV[1]), tonumber(ARGV[1]), tonumber(ARGV[2])}
local cur = {}
for i = 1, 4 do cur[i] = tonumber(redis.call('GET', KEYS[i]) or '0') end
for i = 1, 4 do
  local cap = ARGV[2 + i]
  if cap ~= '' and cur[i] + add[i] > tonumber(cap) then
    return {0, i, cur[1], cur[2], cur[3], cur[4]}
  end
end
local incr = {'1', ARGV[1], ARGV[1], ARGV[2]}
local ttl = {ARGV[7], ARGV[7], ARGV[8], ARGV[8]}
for i = 1, 4 do
  cur[i] = redis.call('INCRBY', KEYS[i], incr[i])
  redis.call('EXPIRE', KEYS[i], ttl[i])
end
redis.call('HSET', KEYS[5], 'tenant', ARGV[11], 'model', ARGV[12], 'tokens', ARGV[1], 'usd', ARGV[2],
  'created', ARGV[13], 'minute', ARGV[14], 'day', ARGV[15], 'state', 'open',
  'w_tpm', KEYS[2], 'w_tpd', KEYS[3], 'w_usd', KEYS[4])
redis.call('EXPIRE', KEYS[5], ARGV[9])
redis.call('ZADD', KEYS[6], ARGV[13], ARGV[10])
return {1, 0, cur[1], cur[2], cur[3], cur[4]}
"""

# KEYS: reservation hash, open set. ARGV: tokens, usd micro, id, state (exact|estimated).
# Returns nil (unknown) or {tenant, model, changed 0|1}.
_SETTLE = """
local h = redis.call('HMGET', KEYS[1], 'tenant', 'model', 'tokens', 'usd', 'state', 'w_tpm', 'w_tpd', 'w_usd')
if not h[1] then return false end
local tokens, usd = tonumber(ARGV[1]), tonumber(ARGV[2])
local dt, du = tokens - tonumber(h[3]), usd - tonumber(h[4])
if h[5] == 'exact' and ARGV[4] == 'estimated' then return false end
if h[5] == 'exact' and dt == 0 and du == 0 then return {h[1], h[2], 0} end
local shifts = {{h[6], dt}, {h[7], dt}, {h[8], du}}
for _, s in ipairs(shifts) do
  if s[2] ~= 0 and redis.call('EXISTS', s[1]) == 1 then
    redis.call('INCRBY', s[1], string.format('%d', s[2]))
  end
end
redis.call('HSET', KEYS[1], 'tokens', ARGV[1], 'usd', ARGV[2], 'state', ARGV[4])
redis.call('ZREM', KEYS[2], ARGV[3])
return {h[1], h[2], 1}
"""

# KEYS: open set. ARGV: reserved_before (exclusive), reservation key prefix, batch size.
# Returns a flat list id, tenant, model, tokens, usd (micro) per reservation now estimated, and the number of
# ids taken from the set first (a full batch means: call again).
_EXPIRE = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
local out = {#ids}
for _, id in ipairs(ids) do
  local key = ARGV[2] .. id
  local h = redis.call('HMGET', key, 'tenant', 'model', 'tokens', 'usd', 'state')
  redis.call('ZREM', KEYS[1], id)
  if h[1] and h[5] == 'open' then
    redis.call('HSET', key, 'state', 'estimated')
    table.insert(out, id)
    table.insert(out, h[1])
    table.insert(out, h[2])
    table.insert(out, h[3])
    table.insert(out, h[4])
  end
end
return out
"""


# KEYS: the mark. ARGV: window end, now, ttl seconds. Returns 1 when this call took the mark, else 0.
_MARK = """
local held = redis.call('GET', KEYS[1])
if held and tonumber(held) > tonumber(ARGV[2]) then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[3])
return 1
"""


class RedisStore:
    """``Store`` on Redis, through redis-py's asyncio client. The store owns the client: :meth:`close` closes it.
    The client may or may not decode responses."""

    def __init__(self, client: aioredis.Redis, *, prefix: str = "meshgen:") -> None:
        self._client = client
        self._prefix = prefix
        self._open_key = f"{prefix}open"
        self._reserve = client.register_script(_RESERVE)
        self._settle = client.register_script(_SETTLE)
        self._expire = client.register_script(_EXPIRE)
        self._mark = client.register_script(_MARK)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        prefix: str = "meshgen:",
        max_connections: int = 32,
        pool_timeout_s: float = 5.0,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> RedisStore:
        """A store on a new client for `url` (``redis://host:port/db``) whose pool *waits* (up to
        `pool_timeout_s`) for a free connection: redis-py's default pool raises ``MaxConnectionsError`` once
        100 calls are in flight, which a burst of admissions reaches. Build your own client the same way.

        Connecting and each reply are bounded by `timeout_s` and never retried, so a Redis that is down or
        unreachable costs a call at most that (then ``redis.exceptions.ConnectionError`` / ``TimeoutError``;
        the ledger degrades as the policy's ``ledger_down`` says)."""
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=pool_timeout_s,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
        )
        return cls(aioredis.Redis.from_pool(pool), prefix=prefix)

    def _window(self, tenant: str, kind: Limit, bucket: int) -> str:
        return f"{self._prefix}w:{tenant}:{kind.value}:{bucket}"

    def _windows(self, tenant: str, now: float) -> list[str]:
        minute, day = L.minute_bucket(now), L.day_bucket(now)
        return [
            self._window(tenant, Limit.RPM, minute),
            self._window(tenant, Limit.TPM, minute),
            self._window(tenant, Limit.TPD, day),
            self._window(tenant, Limit.USD_PER_DAY, day),
        ]

    async def reserve(self, tenant: str, model: str, cost: Cost, limits: Limits, now: float) -> Verdict:
        L.check_cost(cost)
        adding = L.additions(cost)
        caps = L.limit_values(limits)
        reservation = L.new_id(now)
        args: list[str | int | float] = [
            cost.tokens,
            adding[Limit.USD_PER_DAY],
            *("" if caps[kind] is None else str(caps[kind]) for kind in L.ORDER),
            MINUTE_TTL_S,
            DAY_TTL_S,
            RESERVATION_TTL_S,
            reservation,
            tenant,
            model,
            repr(float(now)),
            L.minute_bucket(now),
            L.day_bucket(now),
        ]
        keys = [*self._windows(tenant, now), f"{self._prefix}r:{reservation}", self._open_key]
        reply = await self._reserve(keys=keys, args=args)
        admitted, index, *totals = (int(x) for x in reply)
        used = L.as_used(dict(zip(L.ORDER, totals, strict=True)))
        if admitted:
            return Verdict(True, reservation, None, 0, used)
        refused = L.ORDER[index - 1]
        return Verdict(False, None, refused, L.retry_after(refused, now), used)

    async def settle(
        self, reservation: str, cost: Cost, now: float, state: SettleState = SettleState.EXACT
    ) -> Settled | None:
        L.check_cost(cost)
        usd_micro = L.to_micro(cost.usd)
        reply = await self._settle(
            keys=[f"{self._prefix}r:{reservation}", self._open_key],
            args=[cost.tokens, usd_micro, reservation, state.value],
        )
        if reply is None:
            return None
        tenant, model = _text(reply[0]), _text(reply[1])
        return Settled(reservation, tenant, model, state, Cost(cost.tokens, L.from_micro(usd_micro)))

    async def settle_many(self, items: Sequence[SettleItem], now: float) -> list[Settled | None]:
        """The settle script once per item, in one pipeline (one round trip, no MULTI: each script is atomic)."""
        for _, cost, _ in items:
            L.check_cost(cost)
        if not items:
            return []
        pipe = self._client.pipeline(transaction=False)
        micros = [L.to_micro(cost.usd) for _, cost, _ in items]
        for (reservation, cost, state), usd_micro in zip(items, micros, strict=True):
            await self._settle(
                keys=[f"{self._prefix}r:{reservation}", self._open_key],
                args=[cost.tokens, usd_micro, reservation, state.value],
                client=pipe,
            )
        replies = await pipe.execute()
        results: list[Settled | None] = []
        for (reservation, cost, state), usd_micro, reply in zip(items, micros, replies, strict=True):
            if reply is None:
                results.append(None)
            else:
                cost_now = Cost(cost.tokens, L.from_micro(usd_micro))
                results.append(Settled(reservation, _text(reply[0]), _text(reply[1]), state, cost_now))
        return results

    async def expire(self, reserved_before: float, now: float) -> list[Settled]:
        settled: list[Settled] = []
        while True:
            reply: Sequence[Any] = await self._expire(
                keys=[self._open_key], args=[repr(float(reserved_before)), f"{self._prefix}r:", _EXPIRE_BATCH]
            )
            taken, flat = int(reply[0]), reply[1:]
            for i in range(0, len(flat), 5):
                rid, tenant, model, tokens, micro = (_text(x) for x in flat[i : i + 5])
                cost = Cost(int(tokens), L.from_micro(int(micro)))
                settled.append(Settled(rid, tenant, model, SettleState.ESTIMATED, cost))
            if taken < _EXPIRE_BATCH:
                return settled

    async def used(self, tenant: str, now: float) -> dict[Limit, float]:
        values = await self._client.mget(self._windows(tenant, now))
        return L.as_used({kind: 0 if v is None else int(v) for kind, v in zip(L.ORDER, values, strict=True)})

    async def mark_once(self, key: str, window_end: float, now: float) -> bool:
        L.check_window(window_end, now)
        ttl = max(1, math.ceil(window_end - now))
        args: list[str | int] = [repr(float(window_end)), repr(float(now)), ttl]
        return int(await self._mark(keys=[f"{self._prefix}m:{key}"], args=args)) == 1

    async def close(self) -> None:
        await self._client.aclose()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
