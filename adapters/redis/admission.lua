-- Admission store (SPEC §4.1, §4.2, §4.4, §6.2): one script, called by SHA, so that every decision
-- and every correction is a single atomic round trip. All KEYS share the tenant's hash tag.
--
-- KEYS  1 leases:key  2 leases:tenant   (ZSET lease_id -> expiry ms)
--       3 rpm:key     4 rpm:tenant      (ZSET lease_id -> admitted at ms)
--       5 tpm:key     6 tpm-sum:key     (ZSET "lease_id|tokens" -> admitted at ms, plus running sum)
--       7 tpm:tenant  8 tpm-sum:tenant
--       9 this lease's marker (admission time ms from grant until settle/release, then "done")
--       10.. one budget counter per configured period, in ARGV order
-- ARGV  1 op ("admit" | "settle" | "release" | "renew")  2 now ms, or -1 for Redis TIME  3 lease_id
--   admit:   4 prompt  5 completion asked  6 refresh expiries (1 | 0)  7 lease ttl ms  8 window ms
--            9 concurrent:key  10 concurrent:tenant  11 rpm:key  12 rpm:tenant  13 tpm:key  14 tpm:tenant
--            (-1 = unlimited), then per period: name, cap, ms to reset (-1 = never),
--            seed (-1 = none), counter ttl s (-1 = none)
--   settle:  4 real tokens  5 reserved tokens      release: 5 reserved tokens
--   renew:   4 lease ttl ms
-- Leases and windows run on Redis' clock (TIME), so a replica whose clock is off cannot shorten
-- anyone's lease; budget period instances are the replica's choice at admission (in KEYS).
-- Times are integer milliseconds, so scores stay exact as Lua numbers.

local op = ARGV[1]
local now = tonumber(ARGV[2])
if now < 0 then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local lease = ARGV[3]
local marker = KEYS[9]
local FIRST_BUDGET = 10
-- A settlement after a replica stalled this long finds no marker and changes nothing in Redis
-- (the ledger still charges it, and counters are rebuilt from the ledger).
local MARKER_TTL_S = 3600
-- How long a settled lease's tombstone turns away a repeated settle or release.
local SETTLED_TTL_S = 120

local function tokens_of(member)
  return tonumber(string.match(member, '|(%d+)$')) or 0
end

local function add_clamped(key, delta)
  -- Counters and sums never go below zero, and a correction never recreates a vanished key:
  -- a flushed budget counter is rebuilt from the ledger, not from a delta.
  if delta == 0 or redis.call('EXISTS', key) == 0 then return end
  if redis.call('INCRBY', key, delta) < 0 then redis.call('SET', key, 0, 'KEEPTTL') end
end

-- add_clamped for every budget counter: which of them exist is asked in one MGET.
local function add_to_budgets(delta)
  if delta == 0 or #KEYS < FIRST_BUDGET then return end
  local counters = {}
  for k = FIRST_BUDGET, #KEYS do counters[#counters + 1] = KEYS[k] end
  local values = redis.call('MGET', unpack(counters))
  for i, key in ipairs(counters) do
    if values[i] and redis.call('INCRBY', key, delta) < 0 then redis.call('SET', key, 0, 'KEEPTTL') end
  end
end

if op == 'renew' then
  -- XX: a lease already settled, released or expired is not brought back.
  local lease_ttl = tonumber(ARGV[4])
  for _, key in ipairs({KEYS[1], KEYS[2]}) do
    redis.call('ZADD', key, 'XX', now + lease_ttl, lease)
    redis.call('PEXPIRE', key, 2 * lease_ttl)
  end
  local state = redis.call('GET', marker)
  if state and state ~= 'done' then redis.call('EXPIRE', marker, MARKER_TTL_S) end
  return 'OK'
end

if op == 'settle' or op == 'release' then
  -- Once per lease: the first settle or release turns the marker into a tombstone, so a retry
  -- (say after a lost answer) is a no-op.
  local at = redis.call('SET', marker, 'done', 'EX', SETTLED_TTL_S, 'GET')
  if at == 'done' then return 'DONE' end
  local real = tonumber(ARGV[4]) or 0
  local reserved = tonumber(ARGV[5])
  if not at then
    -- Redis lost this lease (flush, restart): its windows are gone and the budget counters were
    -- rebuilt from the ledger without it, so a settlement adds its real usage and nothing else.
    if op == 'settle' then
      add_to_budgets(real)
    end
    return 'OK'
  end
  redis.call('ZREM', KEYS[1], lease)
  redis.call('ZREM', KEYS[2], lease)
  local prefix = lease .. '|'
  -- The admission logged the reservation itself, so the entry's name is known. Should the names
  -- ever differ (a number Lua formats otherwise), it is found by its score. A settlement puts the
  -- real count in before taking the estimate out: were the log emptied on the way, Redis would drop
  -- it, and the entry put back would live on in a set without an expiry.
  local logged = prefix .. ARGV[5]
  local settled = prefix .. real
  for _, pair in ipairs({{KEYS[5], KEYS[6]}, {KEYS[7], KEYS[8]}}) do
    local log, found = pair[1], {}
    if op ~= 'settle' then
      if redis.call('ZREM', log, logged) == 1 then found[1] = logged end
    elseif logged ~= settled then
      redis.call('ZADD', log, at, settled)
      if redis.call('ZREM', log, logged) == 1 then
        found[1] = logged
      else
        redis.call('ZREM', log, settled)
      end
    elseif redis.call('ZSCORE', log, logged) then
      found[1] = logged  -- settled at exactly the estimate: the entry stays as it is
    end
    if #found == 0 then
      for _, m in ipairs(redis.call('ZRANGEBYSCORE', log, at, at)) do
        if string.sub(m, 1, #prefix) == prefix then
          if op == 'settle' and m ~= settled then redis.call('ZADD', log, at, settled) end
          if op ~= 'settle' or m ~= settled then redis.call('ZREM', log, m) end
          found[#found + 1] = m
        end
      end
    end
    for _, m in ipairs(found) do
      local estimate = tokens_of(m)
      add_clamped(pair[2], (op == 'settle' and real or 0) - estimate)
    end
  end
  local delta = (op == 'settle') and (real - reserved) or -reserved
  add_to_budgets(delta)
  return 'OK'
end

local prompt = tonumber(ARGV[4])
local asked = tonumber(ARGV[5])
-- Expiries are pushed out when the caller asks (it does at least every half window or lease ttl per
-- key, so every entry it adds outlives its use) and whenever a structure is new; not on every admit.
local refresh = ARGV[6] == '1'
local lease_ttl = tonumber(ARGV[7])
local window = tonumber(ARGV[8])
local cutoff = now - window
-- Idle structures disappear on their own; every admit pushes their expiry out again.
local window_pttl = 2 * window
local lease_pttl = 2 * lease_ttl

local function limit(arg)
  local n = tonumber(arg)
  if n < 0 then return nil end
  return n
end

local levels = {
  {leases = KEYS[1], rpm = KEYS[3], tpm = KEYS[5], sum = KEYS[6],
   concurrent = limit(ARGV[9]), rpm_limit = limit(ARGV[11]), tpm_limit = limit(ARGV[13])},
  {leases = KEYS[2], rpm = KEYS[4], tpm = KEYS[7], sum = KEYS[8],
   concurrent = limit(ARGV[10]), rpm_limit = limit(ARGV[12]), tpm_limit = limit(ARGV[14])},
}

local periods = {}
do
  local i, k = 15, FIRST_BUDGET
  while i <= #ARGV do
    periods[#periods + 1] = {name = ARGV[i], cap = tonumber(ARGV[i + 1]), reset = tonumber(ARGV[i + 2]),
                             seed = tonumber(ARGV[i + 3]), ttl = tonumber(ARGV[i + 4]), key = KEYS[k]}
    i, k = i + 5, k + 1
  end
end

local function newest_score(key)
  local r = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
  if #r == 0 then return nil end
  return tonumber(r[2])
end

-- Drops what left the window and returns the sum of what is still in it, and whether the log is
-- empty (gone). Each entry is read once when it expires, so the cost is amortized O(log n) per
-- request, not O(window).
local function load_tokens(log, sum)
  local old = redis.call('ZRANGEBYSCORE', log, '-inf', cutoff)
  if #old > 0 then redis.call('ZREMRANGEBYSCORE', log, '-inf', cutoff) end
  if redis.call('ZCARD', log) == 0 then
    redis.call('DEL', sum)
    return 0, true
  end
  local total = redis.call('GET', sum)
  if not total then
    -- The sum vanished without its log (eviction): rebuild it once from the log.
    total = 0
    for _, m in ipairs(redis.call('ZRANGE', log, 0, -1)) do total = total + tokens_of(m) end
    redis.call('SET', sum, total, 'PX', window_pttl)
    return total
  end
  total = tonumber(total)
  if #old > 0 then
    for _, m in ipairs(old) do total = total - tokens_of(m) end
    if total < 0 then total = 0 end
    redis.call('SET', sum, total, 'KEEPTTL')
  end
  return total
end

-- Seeding is cache rebuilding, not consumption: it happens even if the request is then denied.
-- NX: a counter another replica created meanwhile is never overwritten.
for _, p in ipairs(periods) do
  if p.seed >= 0 then
    if p.ttl > 0 then
      redis.call('SET', p.key, p.seed, 'NX', 'EX', p.ttl)
    else
      redis.call('SET', p.key, p.seed, 'NX')
    end
  end
end

for _, lv in ipairs(levels) do
  if lv.concurrent then
    redis.call('ZREMRANGEBYSCORE', lv.leases, '-inf', now)
    lv.in_flight = redis.call('ZCARD', lv.leases)
  end
  if lv.rpm_limit then
    redis.call('ZREMRANGEBYSCORE', lv.rpm, '-inf', cutoff)
    lv.requests = redis.call('ZCARD', lv.rpm)
  end
  if lv.tpm_limit then lv.tokens, lv.tpm_empty = load_tokens(lv.tpm, lv.sum) end
end

local missing = {}
if #periods > 0 then
  local keys = {}
  for i, p in ipairs(periods) do keys[i] = p.key end
  local values = redis.call('MGET', unpack(keys))
  for i, p in ipairs(periods) do
    if values[i] then p.used = tonumber(values[i]) else missing[#missing + 1] = p.name end
  end
end

-- The binding window for the headers: least remaining after this decision, key level on a tie.
local function window_state(count_field, limit_field, log_field, added)
  local best = nil
  for _, lv in ipairs(levels) do
    local lim = lv[limit_field]
    if lim then
      local remaining = lim - lv[count_field] - added
      if remaining < 0 then remaining = 0 end
      -- Fully restored when the newest entry leaves the window; on a grant that is this request's.
      local reset = window
      if added == 0 then
        local newest = newest_score(lv[log_field])
        reset = newest and math.max(0, newest + window - now) or 0
      end
      if best == nil or remaining < best[2] then best = {lim, remaining, reset} end
    end
  end
  return best
end

local function budget_state(reserve)
  if #missing > 0 or #periods == 0 then return nil, nil end
  local name, least = nil, nil
  for _, p in ipairs(periods) do
    local remaining = p.cap - p.used - reserve
    if least == nil or remaining < least then name, least = p.name, remaining end
  end
  if least < 0 then least = 0 end
  return name, least
end

local function deny(denial, retry_ms, should_retry, extra)
  local out = {granted = false, denial = denial, retry_ms = retry_ms, should_retry = should_retry,
               rq = window_state('requests', 'rpm_limit', 'rpm', 0),
               tk = window_state('tokens', 'tpm_limit', 'tpm', 0)}
  out.budget_period, out.budget_remaining = budget_state(0)
  for k, v in pairs(extra or {}) do out[k] = v end
  return cjson.encode(out)
end

for _, lv in ipairs(levels) do
  if lv.concurrent and lv.in_flight >= lv.concurrent then
    -- A slot frees when any request ends, which is not known here: ask for a short wait.
    return deny('concurrent', 1000, lv.concurrent > 0)
  end
end

do
  local retry, futile = nil, false
  for _, lv in ipairs(levels) do
    local lim = lv.rpm_limit
    if lim and lv.requests >= lim then
      local wait = window
      if lim == 0 then
        futile = true
      else
        -- Enough entries must leave for one more to fit: the (count - limit)-th oldest is the last.
        local r = redis.call('ZRANGE', lv.rpm, lv.requests - lim, lv.requests - lim, 'WITHSCORES')
        wait = tonumber(r[2]) + window - now
      end
      if retry == nil or wait > retry then retry = wait end
    end
  end
  if retry then return deny('rpm', retry, not futile) end
end

if #missing > 0 then
  return cjson.encode({granted = false, missing = missing})
end

local exhausted, granted_completion = nil, asked
for _, p in ipairs(periods) do
  local remaining = p.cap - p.used
  if remaining <= prompt then
    -- Of several exhausted periods the one resetting last decides when a retry can succeed.
    if exhausted == nil or exhausted.reset >= 0 and (p.reset < 0 or p.reset > exhausted.reset) then
      exhausted = p
    end
  elseif remaining - prompt < granted_completion then
    granted_completion = remaining - prompt
  end
end
if exhausted then granted_completion = asked end
local need = prompt + granted_completion

do
  local retry, futile = nil, false
  for _, lv in ipairs(levels) do
    local lim = lv.tpm_limit
    if lim and lv.tokens + need > lim then
      local wait = window
      if need > lim then
        -- The estimate alone exceeds the limit: no amount of waiting admits it.
        futile = true
      else
        local excess, freed, start = lv.tokens + need - lim, 0, 0
        while freed < excess do
          local batch = redis.call('ZRANGE', lv.tpm, start, start + 99, 'WITHSCORES')
          if #batch == 0 then break end
          for j = 1, #batch, 2 do
            freed = freed + tokens_of(batch[j])
            if freed >= excess then
              wait = tonumber(batch[j + 1]) + window - now
              break
            end
          end
          start = start + 100
        end
      end
      if retry == nil or wait > retry then retry = wait end
    end
  end
  if retry then return deny('tpm', retry, not futile) end
end

if exhausted then
  return deny('budget', 0, exhausted.reset >= 0, {period = exhausted.name})
end

-- An empty sorted set does not exist in Redis: one that was empty above is created here, without
-- an expiry of its own, so it always gets one.
for _, lv in ipairs(levels) do
  if lv.concurrent then
    redis.call('ZADD', lv.leases, now + lease_ttl, lease)
    if refresh or lv.in_flight == 0 then redis.call('PEXPIRE', lv.leases, lease_pttl) end
  end
  if lv.rpm_limit then
    redis.call('ZADD', lv.rpm, now, lease)
    if refresh or lv.requests == 0 then redis.call('PEXPIRE', lv.rpm, window_pttl) end
  end
  if lv.tpm_limit then
    redis.call('ZADD', lv.tpm, now, lease .. '|' .. need)
    redis.call('INCRBY', lv.sum, need)
    if refresh or lv.tpm_empty then
      redis.call('PEXPIRE', lv.tpm, window_pttl)
      redis.call('PEXPIRE', lv.sum, window_pttl)
    end
  end
end
for _, p in ipairs(periods) do redis.call('INCRBY', p.key, need) end
-- Lives as long as a settlement may still come (renewed with the lease).
redis.call('SET', marker, now, 'EX', MARKER_TTL_S)

local out = {granted = true, completion = granted_completion, reserved = need,
             rq = window_state('requests', 'rpm_limit', 'rpm', 1),
             tk = window_state('tokens', 'tpm_limit', 'tpm', need)}
out.budget_period, out.budget_remaining = budget_state(need)
return cjson.encode(out)
