"""The Lua scripts RedisBus runs in Redis, as text: history, offsets, idempotency, presence.

Only `broker/bus/redis.py` talks to Redis; this module holds the source and its SHA1 so the
bus can send EVALSHA and fall back to SCRIPT LOAD on NOSCRIPT. The key layout and the
payload formats are described in `broker/bus/redis.py`.

Calling convention of every script (one for all, so the bus fills the same two values in
at send time, from INFO fetched on each (re)connection of its publisher):
    ARGV[1]  the server's replication id (`master_replid` from INFO replication);
    ARGV[2]  '1' when a change of replication id means a restart that kept every
             acknowledged write: `master_replid2` is all zeros (the server did not take
             over another master's history) and `aof_enabled:1` (INFO persistence); else ''.
             On a Redis Cluster (broker/bus/redis_cluster.py) that flag is followed by
             `|id|id|...|`: the replication ids of the cluster's masters at the bus' last
             look, whose data a slot migration (MIGRATE) may have brought here.
The script's own arguments follow, from ARGV[3] on.

Epochs. A script that keeps a topic position (`position` below) reads the topic's meta hash
(`o` offset, `e` epoch, `r` the replication id of the epoch's last write) and:
- keeps the epoch when `r` is the server's replication id (nothing happened since);
- keeps it and records the new id in `r` when the id changed and ARGV[2] starts with '1'
  (a restart with AOF: history is what was acknowledged), or `r` is in ARGV[2]'s list of
  live masters (a Cluster slot migration moved the keys here from a master that has had no
  break since: MIGRATE is atomic per batch and acknowledged);
- otherwise makes a new epoch, offset 0, and DELetes the topic's stream: the meta hash is
  missing (Redis came back empty, FLUSHALL, the meta expired), or the id changed on a
  server promoted from a replica (`master_replid2` set: writes the old master acknowledged
  may be missing), or on a restart without AOF (an RDB snapshot may be older than
  acknowledged writes).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Script:
    name: str
    source: bytes
    sha: bytes = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha", hashlib.sha1(self.source).hexdigest().encode())


# The topic's position, made anew (offset 0, the caller's epoch candidate) when the meta hash
# is gone or belongs to another replication id: offsets kept there may be missing or reused.
_POSITION = """
local function position(meta, stream, replid, candidate, meta_ttl)
  local m = redis.call('HMGET', meta, 'o', 'e', 'r')
  if m[2] and m[3] == replid then
    return tonumber(m[1]), m[2]
  end
  -- a restart that kept every acknowledged write, or keys migrated from a live master
  if m[2] and (string.sub(ARGV[2], 1, 1) == '1'
      or (m[3] and string.find(ARGV[2], '|' .. m[3] .. '|', 1, true))) then
    redis.call('HSET', meta, 'r', replid)
    return tonumber(m[1]), m[2]
  end
  redis.call('DEL', stream)
  redis.call('HSET', meta, 'o', 0, 'e', candidate, 'r', replid)
  if meta_ttl > 0 then
    redis.call('PEXPIRE', meta, meta_ttl)
  end
  return 0, candidate
end

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
"""

# KEYS: meta, stream[, idempotency key]
# ARGV: replid, trusted restart, channel, envelope, epoch candidate, history_size,
#       history_ttl_ms (0: none), meta_ttl_ms (0: none), idempotency_ttl_ms
# Returns {offset, epoch, duplicate (0/1)}.
PUBLISH = Script(
    "publish",
    (
        _POSITION
        + """
local meta, stream, key = KEYS[1], KEYS[2], KEYS[3]
local replid, channel, envelope, candidate = ARGV[1], ARGV[3], ARGV[4], ARGV[5]
local size, ttl = tonumber(ARGV[6]), tonumber(ARGV[7])
local meta_ttl, key_ttl = tonumber(ARGV[8]), tonumber(ARGV[9])

if key then
  local first = redis.call('GET', key)
  if first then
    local o, e = string.match(first, '^(%d+):(.*)$')
    if o then  -- (a key left by a plain-topic publish, before a rule change, is ignored)
      return {tonumber(o), e, 1}
    end
  end
end

local _, epoch = position(meta, stream, replid, candidate, meta_ttl)
local offset = redis.call('HINCRBY', meta, 'o', 1)
local ms = now_ms()
local data = 'H' .. string.format('%d', offset) .. ':' .. epoch .. ':' .. envelope
redis.call('XADD', stream, 'MAXLEN', size, string.format('%d-0', offset), 't', ms, 'd', data)

if ttl > 0 then
  -- Age bound: drop expired entries from the head, one XRANGE COUNT 1 each (a payload is
  -- copied per look, so look at few); up to 3 per publish outpaces the one added, and
  -- reads skip any left. An idle stream expires as a whole.
  local cutoff = ms - ttl
  for _ = 1, 3 do
    local head = redis.call('XRANGE', stream, '-', '+', 'COUNT', 1)[1]
    if not head or tonumber(head[2][2]) >= cutoff then break end
    local o = tonumber(string.match(head[1], '^(%d+)'))
    redis.call('XTRIM', stream, 'MINID', string.format('%d-0', o + 1))
  end
  redis.call('PEXPIRE', stream, ttl)
  redis.call('PEXPIRE', meta, meta_ttl)
end

if key then
  redis.call('SET', key, string.format('%d:', offset) .. epoch, 'PX', key_ttl)
end
redis.call('PUBLISH', channel, data)
return {offset, epoch, 0}
"""
    ).encode(),
)

# KEYS: meta, stream
# ARGV: replid, trusted restart, epoch candidate, after ('' for the position only), the
#       reader's epoch, limit, history_ttl_ms (0: none), meta_ttl_ms (0: none)
# Returns {offset, epoch, complete (0/1), {payload, ...}}: the payloads of the entries after
# `after`, in offset order; complete when they are exactly after+1 .. offset.
HISTORY = Script(
    "history",
    (
        _POSITION
        + """
local meta, stream = KEYS[1], KEYS[2]
local replid, candidate, after, reader_epoch = ARGV[1], ARGV[3], ARGV[4], ARGV[5]
local limit, ttl, meta_ttl = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])

local offset, epoch = position(meta, stream, replid, candidate, meta_ttl)
if after == '' then
  return {offset, epoch, 1, {}}
end
after = tonumber(after)
if reader_epoch ~= epoch or after > offset then
  return {offset, epoch, 0, {}}
end
if after == offset then
  return {offset, epoch, 1, {}}
end

local cutoff = -1
if ttl > 0 then
  cutoff = now_ms() - ttl
end
local out = {}
local start = string.format('%d-0', after + 1)
for _, entry in ipairs(redis.call('XRANGE', stream, start, '+', 'COUNT', limit)) do
  if tonumber(entry[2][2]) >= cutoff then
    out[#out + 1] = entry[2][4]
  end
end
local complete = 0
if #out == offset - after then
  complete = 1
end
return {offset, epoch, complete, out}
"""
    ).encode(),
)

# The `leave` event for a presence entry; the entry's value is '{"w":"<worker>","i":<info>}'.
_LEAVE = """
local function leave_event(client, value)
  local info = string.match(value, '^{"w":"[^"]*","i":(.*)}$') or 'null'
  return 'P{"k":"leave","c":' .. cjson.encode(client) .. ',"i":' .. info .. '}'
end
"""

# KEYS: presence hash.
# ARGV: replid, trusted restart, client id, value, channel, join event ('' for none)
# Returns 1 when the client was not present before.
PRESENCE_ADD = Script(
    "presence_add",
    b"""
local added = redis.call('HSET', KEYS[1], ARGV[3], ARGV[4])
if added == 1 and ARGV[6] ~= '' then
  redis.call('PUBLISH', ARGV[5], ARGV[6])
end
return added
""",
)

# KEYS: presence hash.  ARGV: replid, trusted restart, client id, channel, announce ('1' or '')
# Returns 1 when the client was present.
PRESENCE_REMOVE = Script(
    "presence_remove",
    (
        _LEAVE
        + """
local value = redis.call('HGET', KEYS[1], ARGV[3])
if not value then
  return 0
end
redis.call('HDEL', KEYS[1], ARGV[3])
if ARGV[5] == '1' then
  redis.call('PUBLISH', ARGV[4], leave_event(ARGV[3], value))
end
return 1
"""
    ).encode(),
)

# KEYS: presence hash.
# ARGV: replid, trusted restart, worker key prefix, channel, announce ('1' or ''),
#       list ('1' or '')
# Entries whose worker key is gone are removed (and, with announce, a `leave` is published
# for each: HDEL inside the script, so only one caller ever announces one entry).
# Returns {removed, {client, value, ...}} (the live entries when `list` is '1').
#
# The worker keys are not in KEYS. On one Redis they are outside the topic's slot; on a
# Cluster the prefix is `P{T}:w:`, so they are in the topic's slot (Redis allows a script
# keys it did not declare when they are in the slot of those it did).
PRESENCE_LIST = Script(
    "presence_list",
    (
        _LEAVE
        + """
local hash, worker_prefix, channel = KEYS[1], ARGV[3], ARGV[4]
local announce, list = ARGV[5] == '1', ARGV[6] == '1'
local all = redis.call('HGETALL', hash)
local alive, out, removed = {}, {}, 0
for i = 1, #all, 2 do
  local client, value = all[i], all[i + 1]
  local worker = string.match(value, '^{"w":"([^"]*)"')
  local live = false
  if worker then
    live = alive[worker]
    if live == nil then
      live = redis.call('EXISTS', worker_prefix .. worker) == 1
      alive[worker] = live
    end
  end
  if live then
    if list then
      out[#out + 1] = client
      out[#out + 1] = value
    end
  else
    redis.call('HDEL', hash, client)
    removed = removed + 1
    if announce then
      redis.call('PUBLISH', channel, leave_event(client, value))
    end
  end
end
return {removed, out}
"""
    ).encode(),
)

# A keyed publish on a topic without history: the key is taken (SET NX) or the publish is a
# duplicate and publishes nothing.
# KEYS: idempotency key.  ARGV: replid, trusted restart, channel, envelope, idempotency_ttl_ms
# Returns 1 when it published, 0 for a duplicate.
PUBLISH_KEYED = Script(
    "publish_keyed",
    b"""
if not redis.call('SET', KEYS[1], '-', 'NX', 'PX', tonumber(ARGV[5])) then
  return 0
end
redis.call('PUBLISH', ARGV[3], ARGV[4])
return 1
""",
)

SCRIPTS = (PUBLISH, HISTORY, PRESENCE_ADD, PRESENCE_REMOVE, PRESENCE_LIST, PUBLISH_KEYED)


def sharded(script: Script) -> Script:
    """The same script with every PUBLISH made SPUBLISH (Redis >= 7 sharded pub/sub), for a
    Redis Cluster: each channel a script publishes on is hash-tagged like its keys, so the
    SPUBLISH stays in the script's slot (Redis refuses a script touching another slot)."""
    source = script.source.replace(b"redis.call('PUBLISH'", b"redis.call('SPUBLISH'")
    return Script(script.name + "_sharded", source)


SHARDED = {script: sharded(script) for script in SCRIPTS}  # the Cluster bus' variants
