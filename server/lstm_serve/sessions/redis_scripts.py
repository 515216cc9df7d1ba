"""The Lua scripts of the Redis session store: each one runs atomically inside Redis, so every decision about a
session (does it exist, is this write based on its current record, is the store full) is taken where the truth is.

Keys, under a prefix P (default "lstm:"):
  P s:<id>   hash: m model, r rev token, q seq, n steps, c created ms, u last used ms, t idle TTL ms, d record bytes,
             v the model version it is pinned to (absent in records from before versions: version 1);
             PEXPIRE'd to its idle TTL on every write, so Redis itself forgets idle sessions
  P e:<id>   why a session ended: "reason<TAB>model<TAB>at ms<TAB>detail", kept `ended` ms
  P lru      sorted set id -> last used ms (eviction order, and the live count)
  P exp      sorted set id -> idle deadline ms (sessions with a TTL): the sweep finds the expired ones here
  P m        hash id -> model, for sessions still counted
  P count    hash model -> live sessions
  P tenants  hash tenant -> live sessions (the tenant is the part of the id before "/", "" for a plain id)
Times come from Redis (TIME), so replicas with skewed clocks agree. Scripts touch keys they compute, so the store
needs one Redis (standalone, or a primary with replicas / Sentinel), not a Redis Cluster.

Replies: a live session is {1, m, r, q, n, c, u, t, d, v}; a gone one {0, reason, at, detail} (reason "" = unknown);
`events` lists (model, reason) of sessions that the script ended, for the metrics of exactly one replica.
"""

from __future__ import annotations

COMMON = r"""
local P = ARGV[1]
local ENDED = tonumber(ARGV[2])
local events = {}

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local NOW = now_ms()

local function fields(sk)
  return redis.call('HMGET', sk, 'm', 'r', 'q', 'n', 'c', 'u', 't', 'd', 'v')
end

local function mark_ended(id, model, reason, at, detail)
  local keep = ENDED - (NOW - at)
  if keep > 0 then
    redis.call('SET', P .. 'e:' .. id, reason .. '\t' .. model .. '\t' .. at .. '\t' .. detail, 'PX', keep)
  end
end

local function tenant_of(id)
  return string.match(id, '^([^/]*)/') or ''
end

-- Takes a session out of the live accounting once, whoever gets here first; returns its model or false.
local function unaccount(id)
  local model = redis.call('HGET', P .. 'm', id)
  if not model then return false end
  redis.call('HDEL', P .. 'm', id)
  redis.call('ZREM', P .. 'lru', id)
  redis.call('ZREM', P .. 'exp', id)
  if redis.call('HINCRBY', P .. 'count', model, -1) <= 0 then redis.call('HDEL', P .. 'count', model) end
  local tenant = tenant_of(id)
  if redis.call('HINCRBY', P .. 'tenants', tenant, -1) <= 0 then redis.call('HDEL', P .. 'tenants', tenant) end
  return model
end

-- The session key is gone: if Redis expired it and nobody has said so yet, record that it expired, and when.
local function settle(id)
  local deadline = redis.call('ZSCORE', P .. 'exp', id)
  local used = redis.call('ZSCORE', P .. 'lru', id)
  local model = unaccount(id)
  if model and deadline then
    local ttl = (tonumber(deadline) - tonumber(used)) / 1000
    mark_ended(id, model, 'expired', tonumber(deadline), 'after ' .. ttl .. ' s idle')
    table.insert(events, model)
    table.insert(events, 'expired')
  end
end

-- Settles the sessions Redis expired (at most `limit`), so that they no longer count against a limit.
local function settle_due(limit)
  for _, due in ipairs(redis.call('ZRANGEBYSCORE', P .. 'exp', '-inf', NOW, 'LIMIT', 0, limit)) do
    if redis.call('EXISTS', P .. 's:' .. due) == 0 then settle(due) end
  end
end

local function gone(id)
  settle(id)
  local v = redis.call('GET', P .. 'e:' .. id)
  if not v then return {0, '', '', ''} end
  local reason, _, at, detail = string.match(v, '^([^\t]*)\t([^\t]*)\t([^\t]*)\t(.*)$')
  return {0, reason, at, detail}
end

local function touch(id, sk, ttl)
  if ttl > 0 then
    redis.call('PEXPIRE', sk, ttl)
    redis.call('ZADD', P .. 'exp', NOW + ttl, id)
  end
  redis.call('ZADD', P .. 'lru', NOW, id)
end

local function finish(id, sk, reason, detail)
  local f = fields(sk)
  redis.call('DEL', sk)
  local model = unaccount(id) or f[1]
  mark_ended(id, model, reason, NOW, detail)
  table.insert(events, model)
  table.insert(events, reason)
  return f
end

local function live(f)
  return {1, f[1], f[2], f[3], f[4], f[5], f[6], f[7], f[8], f[9] or '1'}
end
"""

# ARGV: P, ended, id, model, zero record, idle TTL ms, max sessions, policy ("evict" | "refuse"), rev token,
# sweep limit, sessions per tenant at most (0: no limit), model version
CREATE = (
    COMMON
    + r"""
local id, model, rec, ttl = ARGV[3], ARGV[4], ARGV[5], tonumber(ARGV[6])
local max, policy, token, limit = tonumber(ARGV[7]), ARGV[8], ARGV[9], tonumber(ARGV[10])
local per_tenant, tenant = tonumber(ARGV[11]), tenant_of(ARGV[3])
local sk = P .. 's:' .. id
if redis.call('EXISTS', sk) == 1 then return {'exists', events} end
settle(id)
if per_tenant > 0 then
  local held = tonumber(redis.call('HGET', P .. 'tenants', tenant) or '0')
  if held >= per_tenant then
    settle_due(limit)
    held = tonumber(redis.call('HGET', P .. 'tenants', tenant) or '0')
    if held >= per_tenant then return {'tenant_full', events, held} end
  end
end
if redis.call('ZCARD', P .. 'lru') >= max then settle_due(limit) end
while redis.call('ZCARD', P .. 'lru') >= max do
  if policy == 'refuse' then return {'full', events} end
  local victim = redis.call('ZRANGE', P .. 'lru', 0, 0)[1]
  local vk = P .. 's:' .. victim
  if redis.call('EXISTS', vk) == 1 then
    finish(victim, vk, 'evicted', '(least recently used; at max_sessions=' .. max .. ')')
  else
    settle(victim)
    redis.call('ZREM', P .. 'lru', victim)
  end
end
redis.call('HSET', sk, 'm', model, 'r', token, 'q', 0, 'n', 0, 'c', NOW, 'u', NOW, 't', ttl, 'd', rec, 'v', ARGV[12])
redis.call('HSET', P .. 'm', id, model)
redis.call('HINCRBY', P .. 'count', model, 1)
redis.call('HINCRBY', P .. 'tenants', tenant, 1)
redis.call('DEL', P .. 'e:' .. id)
touch(id, sk, ttl)
return {'ok', events, NOW}
"""
)

# ARGV: P, ended, id...
LOAD = (
    COMMON
    + r"""
local out = {}
for i = 3, #ARGV do
  local f = fields(P .. 's:' .. ARGV[i])
  if f[1] then out[#out + 1] = live(f) else out[#out + 1] = gone(ARGV[i]) end
end
return {out, events}
"""
)

# ARGV: P, ended, then per write: id, base rev, new rev, seq, steps, record
COMMIT = (
    COMMON
    + r"""
local out = {}
for i = 3, #ARGV, 6 do
  local id = ARGV[i]
  local sk = P .. 's:' .. id
  local f = fields(sk)
  if not f[1] then
    out[#out + 1] = gone(id)
  elseif f[2] ~= ARGV[i + 1] then
    out[#out + 1] = live(f)
  else
    redis.call('HSET', sk, 'r', ARGV[i + 2], 'q', ARGV[i + 3], 'n', ARGV[i + 4], 'u', NOW, 'd', ARGV[i + 5])
    touch(id, sk, tonumber(f[7]))
    out[#out + 1] = {2, NOW}
  end
end
return {out, events}
"""
)

# ARGV: P, ended, id, zero state, new rev
RESET = (
    COMMON
    + r"""
local id, zero, token = ARGV[3], ARGV[4], ARGV[5]
local sk = P .. 's:' .. id
local f = fields(sk)
if not f[1] then return {gone(id), events} end
f[8] = zero .. string.sub(f[8], #zero + 1)
f[2] = token
f[6] = NOW
redis.call('HSET', sk, 'r', token, 'u', NOW, 'd', f[8])
touch(id, sk, tonumber(f[7]))
return {live(f), events}
"""
)

# ARGV: P, ended, id, reason, detail, only if model (or "")
FINISH = (
    COMMON
    + r"""
local id, reason, detail, model = ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local sk = P .. 's:' .. id
local f = fields(sk)
if not f[1] then return {gone(id), events} end
if model ~= '' and f[1] ~= model then return {live(f), events} end
finish(id, sk, reason, detail)
return {live(f), events}
"""
)

# ARGV: P, ended, limit
SWEEP = (
    COMMON
    + r"""
local due = redis.call('ZRANGEBYSCORE', P .. 'exp', '-inf', NOW, 'LIMIT', 0, tonumber(ARGV[3]))
for _, id in ipairs(due) do
  if redis.call('EXISTS', P .. 's:' .. id) == 0 then settle(id) end
end
return {#due, events}
"""
)
