"""The Lua scripts behind :class:`~chatkit.RedisKeyedLock`: every step that reads and writes lock state.

Each script runs atomically on the Redis server, so no two steps ever interleave. Data, under the lock's
namespace ``NS``:

* ``NS:q:KEY``: a list, the key's queue of ticket ids in arrival order. The head holds the key once its
  ticket is *granted*; a multi-key ticket is granted when it heads the queue of every one of its keys.
* ``NS:t:TICKET``: a hash, one request: ``k`` its keys (a JSON array), ``c`` the pub/sub channel of the
  process that made it, ``l`` its label, ``g`` its fencing token once granted. It carries a TTL, the
  lease, which the owning process renews; a ticket whose hash has expired is *dead* (its process died or
  was paused past its lease) and is dropped from a queue when it reaches the head.
* ``NS:tok:KEY``: the key's last fencing token. A new token is ``max(server time in microseconds,
  last token of each key + 1)``: it grows with every acquisition of the key, also after the server lost
  its data (a restart without persistence) or the entry expired (kept 7 days), as long as the server's
  clock does not go back.

Granting publishes ``"TICKET TOKEN"`` on the waiter's channel: waiters are woken, never polling. A waiter
re-checks on its own only when a ticket ahead of it may have died: after that ticket's remaining TTL.

Single instance: the scripts reach keys they compute (other tickets, other keys' queues) besides the ones
passed in ``KEYS``, which a Redis Cluster allows only within one hash slot: on a Cluster, put a hash tag
in the namespace (``namespace="{chatkit-locks}"``) so that all of a lock's data lives in one slot.
"""

from __future__ import annotations

import hashlib

__all__ = ["Script", "ACQUIRE", "CHECK", "WITHDRAW", "RELEASE", "STATUS", "ALL"]

TOKEN_TTL_MS = 7 * 24 * 3600 * 1000

# ARGV[1] is always the namespace. Helpers shared by every script.
_COMMON = """
if redis.replicate_commands then redis.replicate_commands() end
local ns = ARGV[1]
local function qk(k) return ns .. ':q:' .. k end
local function tk(t) return ns .. ':t:' .. t end
local function lk(k) return ns .. ':tok:' .. k end
local popped = {}

-- The live head of a key's queue; tickets whose hash expired (dead) are popped on the way.
local function head(k)
  local q = qk(k)
  while true do
    local h = redis.call('LINDEX', q, 0)
    if not h then return false end
    if redis.call('EXISTS', tk(h)) == 1 then return h end
    redis.call('LPOP', q)
    popped[#popped + 1] = k
  end
end

local function keys_of(t) return cjson.decode(redis.call('HGET', tk(t), 'k')) end

local function grant(t, keys, now)
  local tok = now
  for _, k in ipairs(keys) do
    local last = tonumber(redis.call('GET', lk(k)) or '0')
    if last >= tok then tok = last + 1 end
  end
  local s = string.format('%.0f', tok)
  for _, k in ipairs(keys) do redis.call('SET', lk(k), s, 'PX', """ + str(TOKEN_TTL_MS) + """) end
  redis.call('HSET', tk(t), 'g', s)
  return s
end

-- Grant every head that can run now: on these keys, and on every key whose head changed meanwhile.
-- Returns the token if ticket `me` was granted (it is told by the reply, not by a message).
local function settle(keys, me)
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
  local work = {}
  for _, k in ipairs(keys) do work[#work + 1] = k end
  local i = 1
  local mine = false
  while i <= #work do
    local k = work[i]
    i = i + 1
    local before = #popped
    local h = head(k)
    if h and not redis.call('HGET', tk(h), 'g') then
      local hk = keys_of(h)
      local all = true
      for _, k2 in ipairs(hk) do
        if head(k2) ~= h then all = false end
      end
      if all then
        local s = grant(h, hk, now)
        if h == me then
          mine = s
        else
          redis.call('PUBLISH', redis.call('HGET', tk(h), 'c'), h .. ' ' .. s)
        end
      end
    end
    for j = before + 1, #popped do work[#work + 1] = popped[j] end
  end
  return mine
end

-- The shortest remaining lease among the live tickets ahead of `me` (-1: none): when to look again.
local function blockers(keys, me)
  local best = -1
  for _, k in ipairs(keys) do
    local h = head(k)
    if h and h ~= me then
      local p = redis.call('PTTL', tk(h))
      if best < 0 or p < best then best = p end
    end
  end
  return best
end
"""

# KEYS[1] = the ticket's hash, KEYS[2..] = the queues of its keys.
# ARGV: ns, ticket, channel, label, lease_ms, max_pending (0: none), key...
# Returns {1, token} (granted), {0, ms until a ticket ahead may have died}, {-1, index of the full key}.
_ACQUIRE_LUA = _COMMON + """
local me = ARGV[2]
local keys = {}
for i = 7, #ARGV do keys[#keys + 1] = ARGV[i] end
if redis.call('EXISTS', KEYS[1]) == 1 then  -- a retried call: report where it stands
  local g = redis.call('HGET', KEYS[1], 'g')
  if g then return {1, g} end
  return {0, blockers(keys, me)}
end
local max_pending = tonumber(ARGV[6])
if max_pending > 0 then
  for idx, k in ipairs(keys) do
    local q = qk(k)
    if redis.call('LLEN', q) >= max_pending then
      -- count the live waiters (not a granted head); drop dead tickets met on the way
      local live = 0
      for pos, t in ipairs(redis.call('LRANGE', q, 0, -1)) do
        if redis.call('EXISTS', tk(t)) == 1 then
          if not (pos == 1 and redis.call('HGET', tk(t), 'g')) then live = live + 1 end
        else
          redis.call('LREM', q, 1, t)
          popped[#popped + 1] = k
        end
      end
      if live >= max_pending then
        settle(keys, me)
        return {-1, idx}
      end
    end
  end
end
redis.call('HSET', KEYS[1], 'k', cjson.encode(keys), 'c', ARGV[3], 'l', ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
for _, k in ipairs(keys) do redis.call('RPUSH', qk(k), me) end
local mine = settle(keys, me)
if mine then return {1, mine} end
return {0, blockers(keys, me)}
"""

# KEYS[1] = the ticket's hash. ARGV: ns, ticket.
# Returns {1, token} (granted), {0, ms until a ticket ahead may have died}, {-2} (the ticket is gone).
_CHECK_LUA = _COMMON + """
local me = ARGV[2]
if redis.call('EXISTS', KEYS[1]) == 0 then return {-2} end
local g = redis.call('HGET', KEYS[1], 'g')
if g then return {1, g} end
local keys = keys_of(me)
local mine = settle(keys, me)
if mine then return {1, mine} end
return {0, blockers(keys, me)}
"""

# KEYS[1] = the ticket's hash. ARGV: ns, ticket.
# Returns {0} (left the queues), {1, token} (it had been granted: it holds the keys), {-2} (gone).
_WITHDRAW_LUA = _COMMON + """
local me = ARGV[2]
if redis.call('EXISTS', KEYS[1]) == 0 then return {-2} end
local g = redis.call('HGET', KEYS[1], 'g')
if g then return {1, g} end
local keys = keys_of(me)
for _, k in ipairs(keys) do redis.call('LREM', qk(k), 1, me) end
redis.call('DEL', KEYS[1])
settle(keys, me)
return {0}
"""

# KEYS[1] = the ticket's hash. ARGV: ns, ticket, token.
# Returns 1 (released), -2 (the ticket is gone: its lease ran out or the server lost it), -3 (it does not
# hold the keys under this token).
_RELEASE_LUA = _COMMON + """
local me = ARGV[2]
if redis.call('EXISTS', KEYS[1]) == 0 then return -2 end
if redis.call('HGET', KEYS[1], 'g') ~= ARGV[3] then return -3 end
local keys = keys_of(me)
for _, k in ipairs(keys) do redis.call('LREM', qk(k), 1, me) end
redis.call('DEL', KEYS[1])
settle(keys, me)
return 1
"""

# KEYS[1] = the key's queue. ARGV: ns, key.
# Returns {queue length, holder's label, holder's token, holder's remaining lease in ms} ({0} when idle;
# label and token are '' when the head waits for other keys).
_STATUS_LUA = _COMMON + """
settle({ARGV[2]}, '')
local h = head(ARGV[2])
if not h then return {0} end
local n = redis.call('LLEN', KEYS[1])
local g = redis.call('HGET', tk(h), 'g')
if not g then return {n, '', '', -1} end
return {n, redis.call('HGET', tk(h), 'l'), g, redis.call('PTTL', tk(h))}
"""


class Script:
    """A Lua script known by its SHA1 (called with EVALSHA; loaded again if the server forgot it)."""

    def __init__(self, name: str, text: str) -> None:
        self.name = name
        self.text = text
        self.sha = hashlib.sha1(text.encode()).hexdigest()

    def __repr__(self) -> str:
        return f"<lock script {self.name} {self.sha[:8]}>"


ACQUIRE = Script("acquire", _ACQUIRE_LUA)
CHECK = Script("check", _CHECK_LUA)
WITHDRAW = Script("withdraw", _WITHDRAW_LUA)
RELEASE = Script("release", _RELEASE_LUA)
STATUS = Script("status", _STATUS_LUA)
ALL = (ACQUIRE, CHECK, WITHDRAW, RELEASE, STATUS)
