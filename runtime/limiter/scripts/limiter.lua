-- The limiter's Redis side: one call per admission, settle, release, 429 report or snapshot.
-- It mirrors runtime/limiter/budget.py function by function (read that docstring for the
-- algorithm and its exactness argument). Times are integer microseconds from Redis TIME.
--
-- KEYS: 1 state (a MessagePack map of integers), 2 log zset (score = slot, member = budget.member: the grant id, a
--       NUL, then "requests:tokens:lane"), 3 daily counts hash (day -> requests)
-- ARGV: 1 op, 2 now_us ('' = Redis TIME; a number only in tests),
--       3 limits: window_us, rpm, tpm, rpd, horizon_us as big-endian int64, then the lane
--       shares as text "lane=ppm,...", 4.. op arguments
-- 'admit' books a whole queue of one process's waiters in one call (see the dispatch).
--
-- The script runs on every admission, so it does little besides its Redis calls: each
-- operation defines only the functions it uses, and the functions reach the shared
-- ones through one table (M) rather than through dozens of upvalues, which Lua looks up
-- one by one every time it creates a closure.
local S, L, D = KEYS[1], KEYS[2], KEYS[3]
local op = ARGV[1]
local now
if ARGV[2] ~= '' then
  now = tonumber(ARGV[2])
else
  local clock = redis.call('TIME')
  now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
end
local W, RPM, TPM, RPD, HORIZON, rest = struct.unpack('>i8i8i8i8i8', ARGV[3])
local SPEC = string.sub(ARGV[3], rest)

-- budget.py's constants.
local K = {
  PPM = 1000000, DAY_US = 86400000000,
  FACTOR_FLOOR_PPM = 100000, FACTOR_CUT_PPM = 700000, RECOVERY_PPM_PER_WINDOW = 100000,
  KNEE_PPM = 800000, SLOW_WINDOWS = 20, RECOVERY_WINDOWS = 40,
  PHANTOM_ENTRIES = 100, WALK_LIMIT = 128, BATCH_SPAN_US = 10000,
  ADMIT = 0, WAIT = 1, TOO_LARGE = 2, DAY_EXHAUSTED = 3,
}

-- The state: integers by name, read in one piece (absent = 0) and written back in one
-- piece when changed (M.dirty).
local st = {}
do
  local packed = redis.call('GET', S)
  if packed then st = cmsgpack.unpack(packed) end
  setmetatable(st, {__index = function() return 0 end})
end

-- refresh_ttl: the log was created by this call (see the end).
local M = {dirty = false, refresh_ttl = false}

-- Integers are exact below 2**53 and formatted without exponent.
function M.fmt(x) return string.format('%d', x) end
function M.put(k, v) st[k] = v; M.dirty = true end

-- Requests and tokens stay far below 10**14, which Lua turns into digits exactly.
function M.member(id, requests, tokens, lane)
  return id .. '\0' .. requests .. ':' .. tokens .. ':' .. lane
end

function M.parse(m)
  local r, t, l = string.match(m, '%z(%d+):(%d+):(.*)$')
  return tonumber(r), tonumber(t), l
end

function M.add(id, at, requests, tokens, lane)
  -- An empty log has no key (Redis deletes an empty zset): this ZADD creates it.
  if st.rq == 0 and st.tk == 0 then M.refresh_ttl = true end
  redis.call('ZADD', L, M.fmt(at), M.member(id, requests, tokens, lane))
  M.put('rq', st.rq + requests)
  M.put('tk', st.tk + tokens)
  if lane ~= '' then
    M.put('lr:' .. lane, st['lr:' .. lane] + requests)
    M.put('lt:' .. lane, st['lt:' .. lane] + tokens)
  end
end

function M.subtract(requests, tokens, lane)
  M.put('rq', st.rq - requests)
  M.put('tk', st.tk - tokens)
  if lane ~= '' then
    M.put('lr:' .. lane, st['lr:' .. lane] - requests)
    M.put('lt:' .. lane, st['lt:' .. lane] - tokens)
  end
end

-- Entries leave the log from its head, in score order: ZREMRANGEBYRANK removes exactly
-- the entries just read.
function M.expire()
  local cutoff = M.fmt(now - W)
  while true do
    local gone = redis.call('ZRANGEBYSCORE', L, '-inf', cutoff, 'LIMIT', 0, 500)
    if #gone == 0 then return end
    for _, m in ipairs(gone) do M.subtract(M.parse(m)) end
    redis.call('ZREMRANGEBYRANK', L, 0, #gone - 1)
    if #gone < 500 then return end
  end
end

function M.effective_limits(factor)
  return math.max(1, math.floor(RPM * factor / K.PPM)),
    math.max(1, math.floor(TPM * factor / K.PPM))
end

-- What only a lost state, a 429 or a snapshot needs is defined when first used.
setmetatable(M, {__index = function(_, name)
  -- elapsed * rate // W, with every product exact below 2**53.
  function M.gain(elapsed, rate)
    local q = math.floor(elapsed / W)
    return q * rate + math.floor((elapsed - q * W) * rate / W)
  end

  function M.effective_factor()
    if st.fa == 0 then return K.PPM end
    local elapsed = math.max(0, now - st.fa)
    if elapsed >= K.RECOVERY_WINDOWS * W then return K.PPM end
    local factor = st.fp
    local fast = M.gain(elapsed, K.RECOVERY_PPM_PER_WINDOW)
    local ceiling = st.fc
    if ceiling > factor then
      local knee = math.max(factor, math.floor(ceiling * K.KNEE_PPM / K.PPM))
      if factor + fast <= knee then return factor + fast end
      local beyond = fast - (knee - factor)
      local slow_span = K.SLOW_WINDOWS * K.RECOVERY_PPM_PER_WINDOW
      if beyond <= slow_span then
        return knee + math.floor(beyond * (ceiling - knee) / slow_span)
      end
      factor = ceiling
      fast = beyond - slow_span
    end
    return math.min(K.PPM, factor + fast)
  end

  function M.seed()
    redis.call('DEL', S, L)
    for k in pairs(st) do st[k] = nil end
    M.put('init', 1)
    M.put('tr', now)
    M.put('tt', now)
    local rpm, tpm = M.effective_limits(K.PPM)
    local n = math.min(rpm, K.PHANTOM_ENTRIES)
    for k = 1, n do
      local at = now - W + math.floor((k * W + n - 1) / n)
      local requests = math.floor(rpm * k / n) - math.floor(rpm * (k - 1) / n)
      local tokens = math.floor(tpm * k / n) - math.floor(tpm * (k - 1) / n)
      M.add('~' .. k, at, requests, tokens, '')
    end
  end

  -- Requests and tokens booked after now, in all and by lane.
  function M.booked_ahead()
    local booked_r, booked_t, lane_booked = 0, 0, {}
    local offset = 0
    while true do
      local ahead = redis.call('ZRANGEBYSCORE', L, '(' .. M.fmt(now), '+inf', 'LIMIT', offset, 500)
      if #ahead == 0 then break end
      for _, m in ipairs(ahead) do
        local r, t, l = M.parse(m)
        booked_r = booked_r + r
        booked_t = booked_t + t
        if l ~= '' then
          local lane = lane_booked[l] or {0, 0}
          lane_booked[l] = {lane[1] + r, lane[2] + t}
        end
      end
      offset = offset + #ahead
    end
    return booked_r, booked_t, lane_booked
  end
  return rawget(M, name)
end})

local result
if op == 'admit' then
  local lane = ARGV[4]
  local shares, share_lanes = {}, {}
  for other, ppm in string.gmatch(SPEC, '([^,=]+)=(%d+)') do
    shares[other] = tonumber(ppm)
    table.insert(share_lanes, other)
  end

  -- The log read in chunks from its head: entry(i) is {slot, requests, tokens, lane}.
  local cache
  local function entry(i)
    if cache[i] == nil then
      local rows = redis.call('ZRANGE', L, i, i + 31, 'WITHSCORES')
      if #rows == 0 then return nil end
      for j = 1, #rows, 2 do
        local r, t, l = M.parse(rows[j])
        cache[i + (j - 1) / 2] = {tonumber(rows[j + 1]), r, t, l}
      end
    end
    return cache[i]
  end

  local function admit(id, tokens, latest)
    if st.init == 0 then M.seed() end
    M.expire()
    cache = {}  -- an admission before this one may have shifted the log
    if lane ~= '' then M.put('ld:' .. lane, now) end
    if tokens > TPM then return K.TOO_LARGE, 0 end
    local day = math.floor(now / K.DAY_US)
    if RPD > 0 and tonumber(redis.call('HGET', D, M.fmt(day)) or 0) >= RPD then
      return K.DAY_EXHAUSTED, (day + 1) * K.DAY_US - now
    end
    local factor = K.PPM
    if st.fa ~= 0 then factor = M.effective_factor() end
    local rpm, tpm = M.effective_limits(factor)
    if tokens > tpm then return K.WAIT, math.floor(W / 4) end
    -- Lanes that asked within the last window keep their unused share reserved.
    local used, active = {}, {}
    for _, other in ipairs(share_lanes) do
      if other ~= lane and st['ld:' .. other] > now - W then
        used[other] = {st['lr:' .. other], st['lt:' .. other]}
        table.insert(active, other)
      end
    end
    local requests, charged = st.rq, st.tk
    local tolerance = math.floor((W + rpm - 1) / rpm)
    local t = math.max(now, st.pu, st.tr, st.tt - tolerance)
    local i = 0
    local lane_blocked = false
    local function fits()
      if requests + 1 > rpm or charged + tokens > tpm then return false end
      local reserve_r, reserve_t = 0, 0
      for _, other in ipairs(active) do
        reserve_r = reserve_r + math.max(0, math.floor(shares[other] * rpm / K.PPM) - used[other][1])
        reserve_t = reserve_t + math.max(0, math.floor(shares[other] * tpm / K.PPM) - used[other][2])
      end
      return rpm - requests - 1 >= reserve_r and tpm - charged - tokens >= reserve_t
    end
    -- Reading the log costs more than all the rest: skip it when the request fits at t
    -- before any entry leaves the window (an entry leaving can only make more room).
    while t - now > HORIZON or (latest and t > latest) or not fits() do
      if t - now > HORIZON then return K.WAIT, math.max(1000, t - now - HORIZON) end
      if latest and t > latest then return K.WAIT, t - now end
      local e = entry(i)
      while e ~= nil and i < K.WALK_LIMIT and e[1] <= t - W do
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
      if e == nil or i >= K.WALK_LIMIT then
        if e == nil and lane_blocked then
          local earliest = nil
          for _, other in ipairs(active) do
            local seen = st['ld:' .. other]
            if earliest == nil or seen < earliest then earliest = seen end
          end
          t = math.max(t, earliest + W)
        end
        return K.WAIT, math.max(1000, t - now)
      end
      t = math.max(t, e[1] + W)
    end
    if lane_blocked then return K.WAIT, math.max(1000, t - now) end
    M.add(id, t, 1, tokens, lane)
    M.put('tr', t + math.floor((W + rpm - 1) / rpm))
    M.put('tt', math.max(st.tt, t) + math.floor((tokens * W + tpm - 1) / tpm))
    if redis.call('HINCRBY', D, M.fmt(day), 1) == 1 then
      -- A new day: the counts of the days before are of no more use.
      for _, other in ipairs(redis.call('HKEYS', D)) do
        if other ~= M.fmt(day) then redis.call('HDEL', D, other) end
      end
      redis.call('EXPIRE', D, 2 * 86400)
    end
    return K.ADMIT, t
  end

  -- ARGV[5..] are (id, tokens) pairs admitted in order until one is not (see
  -- admit_many): the reply is kind, value for each request decided, then now.
  result = {}
  local latest = nil
  for k = 5, #ARGV, 2 do
    local kind, value = admit(ARGV[k], tonumber(ARGV[k + 1]), latest)
    result[#result + 1] = kind
    result[#result + 1] = value
    if kind ~= K.ADMIT then break end
    latest = latest or value + K.BATCH_SPAN_US
  end
  result[#result + 1] = now
elseif op == 'settle' then
  -- ARGV[4..7]: id, estimate, actual, lane.
  local id, estimate, actual, lane = ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6]), ARGV[7]
  M.expire()
  local booked = M.member(id, 1, estimate, lane)
  local at = redis.call('ZSCORE', L, booked)
  if at then
    redis.call('ZREM', L, booked)
    redis.call('ZADD', L, at, M.member(id, 1, actual, lane))
    M.put('tk', st.tk + actual - estimate)
    if lane ~= '' then M.put('lt:' .. lane, st['lt:' .. lane] + actual - estimate) end
    result = {actual - estimate, now}
  elseif actual <= estimate or st.init == 0
      or redis.call('ZSCORE', L, M.member(id .. '+', 0, actual - estimate, lane)) then
    result = {0, now}
  else
    M.add(id .. '+', now, 0, actual - estimate, lane)
    result = {actual - estimate, now}
  end
elseif op == 'release' then
  -- ARGV[4..6]: id, tokens, lane (the grant as booked).
  local tokens, lane = tonumber(ARGV[5]), ARGV[6]
  M.expire()
  if redis.call('ZREM', L, M.member(ARGV[4], 1, tokens, lane)) == 0 then
    result = {0, now}
  else
    M.subtract(1, tokens, lane)
    local day = M.fmt(math.floor(now / K.DAY_US))
    if tonumber(redis.call('HGET', D, day) or 0) > 0 then redis.call('HINCRBY', D, day, -1) end
    result = {1, now}
  end
elseif op == 'report' then
  -- ARGV[4..5]: retry delay (µs), '1' when the 429 teaches.
  if st.init == 0 then M.seed() end
  M.expire()
  M.put('pu', math.max(st.pu, now + tonumber(ARGV[4])))
  if ARGV[5] == '1' and (st.fa == 0 or now - st.fa >= math.floor(W / 4)) then
    local PPM, CUT = K.PPM, K.FACTOR_CUT_PPM
    local factor = M.effective_factor()
    local booked_r, booked_t = M.booked_ahead()
    local used = math.max(math.floor((st.rq - booked_r) * PPM / RPM),
      math.floor((st.tk - booked_t) * PPM / TPM))
    local base = math.min(factor, math.max(used, math.floor(factor * CUT / PPM)))
    local cut = math.max(K.FACTOR_FLOOR_PPM, math.floor(base * CUT / PPM))
    local lowest = math.floor(cut * PPM / K.KNEE_PPM)
    if factor < PPM then M.put('fc', math.max(lowest, math.min(factor, used))) else M.put('fc', 0) end
    M.put('fp', cut)
    M.put('fa', now)
  end
  result = {0, now}
elseif op == 'snapshot' then
  if st.init ~= 0 then M.expire() end
  local today = tonumber(redis.call('HGET', D, M.fmt(math.floor(now / K.DAY_US))) or 0)
  -- Bookings ahead of now count apart from the window (now - W, now].
  local booked_r, booked_t, lane_booked = M.booked_ahead()
  result = {now, st.rq - booked_r, st.tk - booked_t, M.effective_factor(), st.pu, today,
    booked_r, booked_t}
  for k, v in pairs(st) do
    local lane = string.match(k, '^lr:(.*)$')
    if lane then
      local ahead = lane_booked[lane] or {0, 0}
      table.insert(result, lane)
      table.insert(result, v - ahead[1])
      table.insert(result, st['lt:' .. lane] - ahead[2])
    end
  end
else
  return redis.error_reply('unknown limiter operation ' .. tostring(op))
end

-- Every key outlives its last entry by at least half a window: a slot is booked up to
-- HORIZON ahead and counts for W after it. The state's TTL is set with each write, the
-- log's every half window (or at once when this call created it), not on every call.
if M.dirty then
  local ttl = math.floor((HORIZON + 2 * W + 999) / 1000)
  if st.xp == 0 or now - st.xp >= math.floor(W / 2) then M.refresh_ttl = true end
  if M.refresh_ttl then
    st.xp = now
    redis.call('PEXPIRE', L, ttl)
  end
  redis.call('SET', S, cmsgpack.pack(setmetatable(st, nil)), 'PX', ttl)
end
return result
