-- The limiter's Redis side: one call per admission, settle, release, 429 report or snapshot.
-- It mirrors runtime/limiter/budget.py function by function (read that docstring for the
-- algorithm and its exactness argument). Times are integer microseconds from Redis TIME.
--
-- KEYS: 1 state hash, 2 log zset (score = slot, member = grant id),
--       3 grants hash (id -> "requests:tokens:lane"), 4 daily counts hash (day -> requests)
-- ARGV: 1 op, 2 now_us ('' = Redis TIME; a number only in tests),
--       3 limits "window_us rpm tpm rpd horizon_us lane=ppm,...", 4.. op arguments
-- 'admit' books a whole queue of one process's waiters in one call (see the dispatch).
local S, L, G, D = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local op = ARGV[1]
local now
if ARGV[2] ~= '' then
  now = tonumber(ARGV[2])
else
  local clock = redis.call('TIME')
  now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
end
local W, RPM, TPM, RPD, HORIZON, SPEC =
  string.match(ARGV[3], '^(%d+) (%d+) (%d+) (%d+) (%d+) ?(.*)$')
W, RPM, TPM, RPD, HORIZON = tonumber(W), tonumber(RPM), tonumber(TPM), tonumber(RPD),
  tonumber(HORIZON)
local SHARES, SHARE_LANES = {}, {}
for lane, ppm in string.gmatch(SPEC, '([^,=]+)=(%d+)') do
  SHARES[lane] = tonumber(ppm)
  table.insert(SHARE_LANES, lane)
end

local PPM, DAY_US = 1000000, 86400000000
local FACTOR_FLOOR_PPM, FACTOR_CUT_PPM, RECOVERY_PPM_PER_WINDOW = 100000, 700000, 100000
local KNEE_PPM, SLOW_WINDOWS, RECOVERY_WINDOWS = 800000, 20, 40
local PHANTOM_ENTRIES, WALK_LIMIT, BATCH_SPAN_US = 100, 128, 10000
local ADMIT, WAIT, TOO_LARGE, DAY_EXHAUSTED = 0, 1, 2, 3

-- Integers are exact below 2**53 and formatted without exponent.
local function fmt(x) return string.format('%d', x) end
local function floor_div(a, b) return math.floor(a / b) end
local function ceil_div(a, b) return math.floor((a + b - 1) / b) end

local st, dirty = {}, {}
local raw = redis.call('HGETALL', S)
for i = 1, #raw, 2 do st[raw[i]] = raw[i + 1] end
local function get(k) return tonumber(st[k] or 0) end
local function put(k, v) st[k] = v; dirty[k] = true end

local function parse(v)
  if not v then return 0, 0, '' end
  local r, t, l = string.match(v, '^(%d+):(%d+):(.*)$')
  return tonumber(r), tonumber(t), l
end

local function add(id, at, requests, tokens, lane)
  redis.call('ZADD', L, fmt(at), id)
  redis.call('HSET', G, id, fmt(requests) .. ':' .. fmt(tokens) .. ':' .. lane)
  put('rq', get('rq') + requests)
  put('tk', get('tk') + tokens)
  if lane ~= '' then
    put('lr:' .. lane, get('lr:' .. lane) + requests)
    put('lt:' .. lane, get('lt:' .. lane) + tokens)
  end
end

local function subtract(requests, tokens, lane)
  put('rq', get('rq') - requests)
  put('tk', get('tk') - tokens)
  if lane ~= '' then
    put('lr:' .. lane, get('lr:' .. lane) - requests)
    put('lt:' .. lane, get('lt:' .. lane) - tokens)
  end
end

-- elapsed * rate // W, with every product exact below 2**53.
local function gain(elapsed, rate)
  local q = floor_div(elapsed, W)
  return q * rate + floor_div((elapsed - q * W) * rate, W)
end

local function effective_factor()
  local fa = get('fa')
  if fa == 0 then return PPM end
  local elapsed = math.max(0, now - fa)
  if elapsed >= RECOVERY_WINDOWS * W then return PPM end
  local factor = get('fp')
  local fast = gain(elapsed, RECOVERY_PPM_PER_WINDOW)
  local ceiling = get('fc')
  if ceiling > factor then
    local knee = math.max(factor, floor_div(ceiling * KNEE_PPM, PPM))
    if factor + fast <= knee then return factor + fast end
    local beyond = fast - (knee - factor)
    local slow_span = SLOW_WINDOWS * RECOVERY_PPM_PER_WINDOW
    if beyond <= slow_span then return knee + floor_div(beyond * (ceiling - knee), slow_span) end
    factor = ceiling
    fast = beyond - slow_span
  end
  return math.min(PPM, factor + fast)
end

local function effective_limits(factor)
  return math.max(1, floor_div(RPM * factor, PPM)), math.max(1, floor_div(TPM * factor, PPM))
end

local function seed()
  redis.call('DEL', S, L, G)
  st, dirty = {}, {}
  put('init', 1)
  put('tr', now)
  put('tt', now)
  local rpm, tpm = effective_limits(PPM)
  local n = math.min(rpm, PHANTOM_ENTRIES)
  for k = 1, n do
    local at = now - W + ceil_div(k * W, n)
    local requests = floor_div(rpm * k, n) - floor_div(rpm * (k - 1), n)
    local tokens = floor_div(tpm * k, n) - floor_div(tpm * (k - 1), n)
    add('~' .. k, at, requests, tokens, '')
  end
end

local function expire()
  local cutoff = fmt(now - W)
  while true do
    local ids = redis.call('ZRANGEBYSCORE', L, '-inf', cutoff, 'LIMIT', 0, 500)
    if #ids == 0 then return end
    local values = redis.call('HMGET', G, unpack(ids))
    for _, v in ipairs(values) do
      if v then subtract(parse(v)) end
    end
    redis.call('ZREM', L, unpack(ids))
    redis.call('HDEL', G, unpack(ids))
  end
end

-- The log read in chunks from its head: entry(i) is {slot, requests, tokens, lane}.
local cache = {}
local function entry(i)
  if cache[i] == nil then
    local rows = redis.call('ZRANGE', L, i, i + 31, 'WITHSCORES')
    if #rows == 0 then return nil end
    local ids = {}
    for j = 1, #rows, 2 do table.insert(ids, rows[j]) end
    local values = redis.call('HMGET', G, unpack(ids))
    for j = 1, #ids do
      local r, t, l = parse(values[j])
      cache[i + j - 1] = {tonumber(rows[2 * j]), r, t, l}
    end
  end
  return cache[i]
end

local function reserve(used, active, rpm, tpm)
  local r, t = 0, 0
  for _, lane in ipairs(active) do
    r = r + math.max(0, floor_div(SHARES[lane] * rpm, PPM) - used[lane][1])
    t = t + math.max(0, floor_div(SHARES[lane] * tpm, PPM) - used[lane][2])
  end
  return r, t
end

local function admit(id, tokens, lane, latest)
  if get('init') == 0 then seed() end
  expire()
  cache = {}  -- an admission before this one may have shifted the log
  if lane ~= '' then put('ld:' .. lane, now) end
  if tokens > TPM then return {TOO_LARGE, 0, now} end
  local day = floor_div(now, DAY_US)
  if RPD > 0 and tonumber(redis.call('HGET', D, fmt(day)) or 0) >= RPD then
    return {DAY_EXHAUSTED, (day + 1) * DAY_US - now, now}
  end
  local rpm, tpm = effective_limits(effective_factor())
  if tokens > tpm then return {WAIT, floor_div(W, 4), now} end
  local used, active = {}, {}
  for _, other in ipairs(SHARE_LANES) do
    if other ~= lane and get('ld:' .. other) > now - W then
      used[other] = {get('lr:' .. other), get('lt:' .. other)}
      table.insert(active, other)
    end
  end
  local requests, charged = get('rq'), get('tk')
  local tolerance = ceil_div(W, rpm)
  local t = math.max(now, get('pu'), get('tr'), get('tt') - tolerance)
  local i = 0
  local lane_blocked = false
  local function fits()
    if requests + 1 > rpm or charged + tokens > tpm then return false end
    local reserve_r, reserve_t = reserve(used, active, rpm, tpm)
    return rpm - requests - 1 >= reserve_r and tpm - charged - tokens >= reserve_t
  end
  -- Reading the log costs more than all the rest: skip it when the request fits at t
  -- before any entry leaves the window (an entry leaving can only make more room).
  while t - now > HORIZON or (latest and t > latest) or not fits() do
    if t - now > HORIZON then return {WAIT, math.max(1000, t - now - HORIZON), now} end
    if latest and t > latest then return {WAIT, t - now, now} end
    local e = entry(i)
    while e ~= nil and i < WALK_LIMIT and e[1] <= t - W do
      requests = requests - e[2]
      charged = charged - e[3]
      if used[e[4]] ~= nil then
        used[e[4]][1] = used[e[4]][1] - e[2]
        used[e[4]][2] = used[e[4]][2] - e[3]
      end
      i = i + 1
      e = entry(i)
    end
    if fits() then break end
    -- Room in the whole budget, but not outside the other lanes' reserves.
    if requests + 1 <= rpm and charged + tokens <= tpm then lane_blocked = true end
    if e == nil or i >= WALK_LIMIT then
      if e == nil and lane_blocked then
        local earliest = nil
        for _, other in ipairs(active) do
          local seen = get('ld:' .. other)
          if earliest == nil or seen < earliest then earliest = seen end
        end
        t = math.max(t, earliest + W)
      end
      return {WAIT, math.max(1000, t - now), now}
    end
    t = math.max(t, e[1] + W)
  end
  if lane_blocked then return {WAIT, math.max(1000, t - now), now} end
  add(id, t, 1, tokens, lane)
  put('tr', t + ceil_div(W, rpm))
  put('tt', math.max(get('tt'), t) + ceil_div(tokens * W, tpm))
  redis.call('HINCRBY', D, fmt(day), 1)
  redis.call('EXPIRE', D, 2 * 86400)
  return {ADMIT, t, now}
end

local function settle(id, estimate, actual, lane)
  expire()
  local v = redis.call('HGET', G, id)
  if v then
    local r, t, l = parse(v)
    redis.call('HSET', G, id, fmt(r) .. ':' .. fmt(actual) .. ':' .. l)
    put('tk', get('tk') + actual - t)
    if l ~= '' then put('lt:' .. l, get('lt:' .. l) + actual - t) end
    return {actual - t, now}
  end
  local raise_id = id .. '+'
  if actual <= estimate or redis.call('HEXISTS', G, raise_id) == 1 or get('init') == 0 then
    return {0, now}
  end
  add(raise_id, now, 0, actual - estimate, lane)
  return {actual - estimate, now}
end

local function release(id)
  expire()
  local v = redis.call('HGET', G, id)
  if not v then return {0, now} end
  redis.call('HDEL', G, id)
  redis.call('ZREM', L, id)
  subtract(parse(v))
  local day = fmt(floor_div(now, DAY_US))
  if tonumber(redis.call('HGET', D, day) or 0) > 0 then redis.call('HINCRBY', D, day, -1) end
  return {1, now}
end

-- Requests and tokens booked after now, in all and by lane.
local function booked_ahead()
  local booked_r, booked_t, lane_booked = 0, 0, {}
  local offset = 0
  while true do
    local ids = redis.call('ZRANGEBYSCORE', L, '(' .. fmt(now), '+inf', 'LIMIT', offset, 500)
    if #ids == 0 then break end
    local values = redis.call('HMGET', G, unpack(ids))
    for _, v in ipairs(values) do
      if v then
        local r, t, l = parse(v)
        booked_r = booked_r + r
        booked_t = booked_t + t
        if l ~= '' then
          local ahead = lane_booked[l] or {0, 0}
          lane_booked[l] = {ahead[1] + r, ahead[2] + t}
        end
      end
    end
    offset = offset + #ids
  end
  return booked_r, booked_t, lane_booked
end

local function report(retry_after_us, teach)
  if get('init') == 0 then seed() end
  expire()
  put('pu', math.max(get('pu'), now + retry_after_us))
  if teach and (get('fa') == 0 or now - get('fa') >= floor_div(W, 4)) then
    local factor = effective_factor()
    local booked_r, booked_t = booked_ahead()
    local used = math.max(floor_div((get('rq') - booked_r) * PPM, RPM),
      floor_div((get('tk') - booked_t) * PPM, TPM))
    local base = math.min(factor, math.max(used, floor_div(factor * FACTOR_CUT_PPM, PPM)))
    local cut = math.max(FACTOR_FLOOR_PPM, floor_div(base * FACTOR_CUT_PPM, PPM))
    local lowest = floor_div(cut * PPM, KNEE_PPM)
    if factor < PPM then put('fc', math.max(lowest, math.min(factor, used))) else put('fc', 0) end
    put('fp', cut)
    put('fa', now)
  end
  return {0, now}
end

local function snapshot()
  if get('init') ~= 0 then expire() end
  local today = tonumber(redis.call('HGET', D, fmt(floor_div(now, DAY_US))) or 0)
  -- Bookings ahead of now count apart from the window (now - W, now].
  local booked_r, booked_t, lane_booked = booked_ahead()
  local out = {now, get('rq') - booked_r, get('tk') - booked_t, effective_factor(), get('pu'),
    today, booked_r, booked_t}
  for k, v in pairs(st) do
    local lane = string.match(k, '^lr:(.*)$')
    if lane then
      local ahead = lane_booked[lane] or {0, 0}
      table.insert(out, lane)
      table.insert(out, tonumber(v) - ahead[1])
      table.insert(out, get('lt:' .. lane) - ahead[2])
    end
  end
  return out
end

local result
if op == 'admit' then
  -- ARGV[4] lane, then (id, tokens) pairs admitted in order until one is not (see
  -- admit_many): the reply is kind, value for each request decided, then now.
  result = {}
  local latest = nil
  for k = 5, #ARGV, 2 do
    local decision = admit(ARGV[k], tonumber(ARGV[k + 1]), ARGV[4], latest)
    table.insert(result, decision[1])
    table.insert(result, decision[2])
    if decision[1] ~= ADMIT then break end
    latest = latest or decision[2] + BATCH_SPAN_US
  end
  table.insert(result, now)
elseif op == 'settle' then
  result = settle(ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6]), ARGV[7])
elseif op == 'release' then
  result = release(ARGV[4])
elseif op == 'report' then
  result = report(tonumber(ARGV[4]), ARGV[5] == '1')
elseif op == 'snapshot' then
  result = snapshot()
else
  return redis.error_reply('unknown limiter operation ' .. tostring(op))
end

if next(dirty) ~= nil then
  local args = {}
  for k in pairs(dirty) do
    table.insert(args, k)
    table.insert(args, fmt(st[k]))
  end
  redis.call('HSET', S, unpack(args))
end
-- Every key lives two windows past its last use: nothing is left behind for ever.
local ttl = ceil_div(2 * W, 1000)
redis.call('PEXPIRE', S, ttl)
redis.call('PEXPIRE', L, ttl)
redis.call('PEXPIRE', G, ttl)
return result
