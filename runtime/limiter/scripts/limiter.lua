-- The limiter's Redis side: one call per admission, settle, release, 429 report or snapshot.
-- It mirrors runtime/limiter/budget.py (read that docstring for the algorithm and its
-- exactness argument). Times are integer microseconds from Redis TIME.
--
-- KEYS: 1 state (a MessagePack map of integers), 2 log zset (score = slot, member =
--       budget.member: the grant id, a NUL, then "requests:tokens:lane")
-- ARGV: 1 op, 2 now_us ('' = Redis TIME; a number only in tests),
--       3 limits: window_us, rpm, tpm, rpd, horizon_us, headroom, z_milli as big-endian
--       int64, then the lane shares as text "lane=ppm,...", 4.. op arguments
-- A grant id may end in "#V": the variance V of its estimate, which the fleet margin
-- holds until the grant settles, is released or leaves the log.
--
-- The script runs on every admission, and its own work costs as much as its Redis
-- calls: what is common to all operations (seed, expiry, the budget factor) runs once
-- at the top, each operation's code sits in its branch, and functions are few.
local S, L = KEYS[1], KEYS[2]
local op = ARGV[1]
local now
if ARGV[2] ~= '' then
  now = tonumber(ARGV[2])
else
  local clock = redis.call('TIME')
  now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
end
local W, RPM, TPM, RPD, HORIZON, HEADROOM, ZM, rest = struct.unpack('>i8i8i8i8i8i8i8', ARGV[3])
local SPEC = string.sub(ARGV[3], rest)

-- budget.py's constants.
local PPM, DAY_US = 1000000, 86400000000
local FACTOR_FLOOR_PPM, FACTOR_CUT_PPM, RECOVERY_PPM_PER_WINDOW = 100000, 700000, 100000
local KNEE_PPM, SLOW_WINDOWS, RECOVERY_WINDOWS = 800000, 20, 40
local PHANTOM_ENTRIES, WALK_LIMIT, BATCH_SPAN_US, MAX_SPREAD = 100, 128, 10000, 1000000000000
local ADMIT, WAIT, TOO_LARGE, DAY_EXHAUSTED = 0, 1, 2, 3

-- The state: integers by name (rq tk tr tt pu fa fp fc xe xp init; uv, the unsettled
-- variance; lb, the latest booking; dy and dc, the day and its requests; per lane lr: lt:
-- ld:), read in one piece and written back in one piece when changed. A seeded state
-- holds every field but the day's and the lanes' (a state written before uv and lb
-- existed reads them as 0).
local packed = redis.call('GET', S)
local st = packed and cmsgpack.unpack(packed) or {}
local dirty, log_created = false, false

local function fmt(x) return string.format('%d', x) end  -- exact below 2**53, no exponent

-- Requests and tokens stay far below 10**14, which Lua turns into digits exactly.
local function member(id, requests, tokens, lane)
  return id .. '\0' .. requests .. ':' .. tokens .. ':' .. lane
end

local function parse(m)
  local r, t, l = string.match(m, '%z(%d+):(%d+):(.*)$')
  return tonumber(r), tonumber(t), l
end

-- budget.spread_of: the id without its spread mark, and the variance the mark names.
local function spread_of(id)
  local base, v = string.match(id, '^(.*)#(%d+)$')
  if base == nil then return id, 0 end
  return base, math.min(tonumber(v), MAX_SPREAD)
end

local function add(id, at, requests, tokens, lane, spread)
  -- An empty log has no key (Redis deletes an empty zset): this ZADD creates it.
  if st.rq == 0 and st.tk == 0 then log_created = true end
  redis.call('ZADD', L, fmt(at), member(id, requests, tokens, lane))
  st.rq = st.rq + requests
  st.tk = st.tk + tokens
  if spread > 0 then st.uv = (st.uv or 0) + spread end
  if lane ~= '' then
    st['lr:' .. lane] = (st['lr:' .. lane] or 0) + requests
    st['lt:' .. lane] = (st['lt:' .. lane] or 0) + tokens
  end
  dirty = true
end

local function subtract(requests, tokens, lane, spread)
  st.rq = st.rq - requests
  st.tk = st.tk - tokens
  if spread > 0 then st.uv = st.uv - spread end
  if lane ~= '' then
    st['lr:' .. lane] = st['lr:' .. lane] - requests
    st['lt:' .. lane] = st['lt:' .. lane] - tokens
  end
  dirty = true
end

-- A lost state (first use, FLUSHALL, failover, idle expiry) is seeded before an
-- admission or a report; the other operations find nothing to change.
if st.init == nil and (op == 'admit' or op == 'report') then
  redis.call('DEL', L)
  st = {init = 1, rq = 0, tk = 0, tr = now, tt = now, pu = 0, fa = 0, fp = 0, fc = 0, xe = 0,
    xp = 0, uv = 0, lb = 0}
  local n = math.min(RPM, PHANTOM_ENTRIES)
  for k = 1, n do
    local at = now - W + math.floor((k * W + n - 1) / n)
    local requests = math.floor(RPM * k / n) - math.floor(RPM * (k - 1) / n)
    local tokens = math.floor(TPM * k / n) - math.floor(TPM * (k - 1) / n)
    add('~' .. k, at, requests, tokens, '', 0)
  end
end

-- Expiry: entries leave the log from its head, in score order, so ZREMRANGEBYRANK
-- removes exactly the entries just read. An admission expires lazily (budget.py): when
-- its request does not fit at once, and at least every half window.
local function expire()
  local cutoff = fmt(now - W)
  st.xe = now
  dirty = true
  while true do
    local gone = redis.call('ZRANGEBYSCORE', L, '-inf', cutoff, 'LIMIT', 0, 500)
    for _, m in ipairs(gone) do
      local id, r, t, l = string.match(m, '^(.-)%z(%d+):(%d+):(.*)$')
      local _, spread = spread_of(id)
      subtract(tonumber(r), tonumber(t), l, spread)
    end
    if #gone > 0 then redis.call('ZREMRANGEBYRANK', L, 0, #gone - 1) end
    if #gone < 500 then break end
  end
end
if st.init ~= nil and (op ~= 'admit' or now - st.xe >= math.floor(W / 2)) then expire() end

-- The budget factor in force (budget.effective_factor): cut by quota 429s, climbing
-- back when quiet, fast up to the knee, slowly to the ceiling, fast again above it.
local factor = PPM
local fa = st.fa or 0
if fa ~= 0 and now - fa < RECOVERY_WINDOWS * W then
  local elapsed = math.max(0, now - fa)
  local q = math.floor(elapsed / W)  -- elapsed * rate // W, exact below 2**53
  local fast = q * RECOVERY_PPM_PER_WINDOW
    + math.floor((elapsed - q * W) * RECOVERY_PPM_PER_WINDOW / W)
  local base, ceiling = st.fp, st.fc
  factor = nil
  if ceiling > base then
    local knee = math.max(base, math.floor(ceiling * KNEE_PPM / PPM))
    local slow_span = SLOW_WINDOWS * RECOVERY_PPM_PER_WINDOW
    local beyond = fast - (knee - base)
    if base + fast <= knee then
      factor = base + fast
    elseif beyond <= slow_span then
      factor = knee + math.floor(beyond * (ceiling - knee) / slow_span)
    else
      base, fast = ceiling, beyond - slow_span
    end
  end
  factor = factor or math.min(PPM, base + fast)
end
local rpm = math.max(1, math.floor(RPM * factor / PPM))
local tpm = math.max(1, math.floor(TPM * factor / PPM))

-- budget._reschedule: what a settle or a release changed moves the pacing too, back for
-- what was given back (never before now nor the latest booking), forward for a raise.
local function reschedule(tokens, requests)
  local floor = math.max(now, st.lb or 0)
  if tokens < 0 and st.tt > floor then
    st.tt = math.max(floor, st.tt - math.floor(math.min(-tokens, tpm) * W / tpm))
  elseif tokens > 0 then
    st.tt = math.max(st.tt, now) + math.floor((math.min(tokens, tpm) * W + tpm - 1) / tpm)
  end
  if requests < 0 and st.tr > floor then
    st.tr = math.max(floor, st.tr + requests * math.floor((W + rpm - 1) / rpm))
  end
  dirty = true
end

-- Requests and tokens booked after now, in all and by lane: only reports and
-- snapshots need it, so only they define it.
local booked_ahead
if op == 'report' or op == 'snapshot' then
  booked_ahead = function()
    local booked_r, booked_t, lane_booked = 0, 0, {}
    local offset = 0
    while st.init ~= nil do
      local ahead = redis.call('ZRANGEBYSCORE', L, '(' .. fmt(now), '+inf', 'LIMIT', offset, 500)
      if #ahead == 0 then break end
      for _, m in ipairs(ahead) do
        local r, t, l = parse(m)
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
end

local result
if op == 'admit' then
  -- ARGV[4] lane, then (id, tokens) pairs admitted in order until one is not (see
  -- budget.admit_many): the reply is kind, value for each request decided, then now.
  local lane = ARGV[4]
  local shares, share_lanes = {}, {}
  if SPEC ~= '' then
    for other, ppm in string.gmatch(SPEC, '([^,=]+)=(%d+)') do
      shares[other] = tonumber(ppm)
      share_lanes[#share_lanes + 1] = other
    end
  end
  local day = math.floor(now / DAY_US)
  local interval = math.floor((W + rpm - 1) / rpm)  -- the paced gap between two requests

  -- Lanes that asked within the last window keep their unused share reserved.
  local function lanes_in_use()
    local used, active = {}, {}
    for _, other in ipairs(share_lanes) do
      if other ~= lane and (st['ld:' .. other] or 0) > now - W then
        used[other] = {st['lr:' .. other] or 0, st['lt:' .. other] or 0}
        active[#active + 1] = other
      end
    end
    return used, active
  end

  -- Room for one request of c tokens beside the other active lanes' unused shares.
  local function fits(requests, charged, c, used, active)
    if requests + 1 > rpm or charged + c > tpm then return false end
    local reserve_r, reserve_t = 0, 0
    for _, other in ipairs(active) do
      reserve_r = reserve_r + math.max(0, math.floor(shares[other] * rpm / PPM) - used[other][1])
      reserve_t = reserve_t + math.max(0, math.floor(shares[other] * tpm / PPM) - used[other][2])
    end
    return rpm - requests - 1 >= reserve_r and tpm - charged - c >= reserve_t
  end

  result = {}
  local latest = nil
  for k = 5, #ARGV, 2 do
    -- One request (budget.admit), written inline: "break" ends the repeat block with
    -- its decision in kind, value.
    local id, tokens = ARGV[k], tonumber(ARGV[k + 1])
    local _, spread = spread_of(id)
    local kind, value = WAIT, 0
    repeat
      if lane ~= '' then
        st['ld:' .. lane] = now
        dirty = true
      end
      if tokens > TPM then kind = TOO_LARGE; break end
      if RPD > 0 and st.dy == day and st.dc >= RPD then
        kind, value = DAY_EXHAUSTED, (day + 1) * DAY_US - now
        break
      end
      if tokens > tpm then value = math.floor(W / 4); break end
      local used, active = lanes_in_use()
      -- The fleet margin (budget.margin): z * sqrt(unsettled variance), the headroom first.
      local held, variance = 0, (st.uv or 0) + spread
      if ZM > 0 and variance > 0 then
        held = math.ceil(ZM * math.sqrt(variance) / 1000)
          - math.floor(HEADROOM * factor / PPM)
        held = math.max(0, math.min(held, tpm - tokens))
      end
      -- Tokens may run one request interval ahead of their pace.
      local t = math.max(now, st.pu, st.tr, st.tt - interval)
      -- Reading the log costs more than all the rest: skip it when the request fits at t
      -- before any entry leaves the window (an entry leaving can only make more room).
      if t - now > HORIZON or (latest and t > latest)
          or not fits(st.rq, st.tk + held, tokens, used, active) then
        -- Not at once: drop what left the window, then find the earliest slot from t on
        -- by walking the log (read in chunks from its head). Returns kind, value.
        local function walk()
          expire()
          used, active = lanes_in_use()
          local requests, charged, lane_blocked = st.rq, st.tk + held, false
          local entries, i = {}, 0
          local function entry(n)
            if entries[n] == nil then
              local rows = redis.call('ZRANGE', L, n, n + 31, 'WITHSCORES')
              for j = 1, #rows, 2 do
                local r, c, l = parse(rows[j])
                entries[n + (j - 1) / 2] = {tonumber(rows[j + 1]), r, c, l}
              end
            end
            return entries[n]
          end
          while true do
            if t - now > HORIZON then return WAIT, math.max(1000, t - now - HORIZON) end
            if latest and t > latest then return WAIT, t - now end
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
            if fits(requests, charged, tokens, used, active) then break end
            -- Room in the whole budget, but not outside the other lanes' reserves.
            if requests + 1 <= rpm and charged + tokens <= tpm then lane_blocked = true end
            if e == nil or i >= WALK_LIMIT then
              if e == nil and lane_blocked then
                local earliest = nil
                for _, other in ipairs(active) do
                  local seen = st['ld:' .. other]
                  if earliest == nil or seen < earliest then earliest = seen end
                end
                t = math.max(t, earliest + W)
              end
              return WAIT, math.max(1000, t - now)
            end
            t = math.max(t, e[1] + W)
          end
          if lane_blocked then return WAIT, math.max(1000, t - now) end
          return ADMIT, t
        end
        kind, value = walk()
        if kind ~= ADMIT then break end
      end
      add(id, t, 1, tokens, lane, spread)
      st.lb = t
      st.tr = t + interval
      st.tt = math.max(st.tt, t) + math.floor((tokens * W + tpm - 1) / tpm)
      if st.dy ~= day then st.dy, st.dc = day, 0 end
      st.dc = st.dc + 1
      kind, value = ADMIT, t
    until true
    result[#result + 1] = kind
    result[#result + 1] = value
    if kind ~= ADMIT then break end
    latest = latest or value + BATCH_SPAN_US
  end
  result[#result + 1] = now
elseif op == 'settle' then
  -- ARGV[4..7]: id, estimate, actual, lane. The grant is named as booked.
  -- The settled entry loses its spread mark; the difference moves the pacing too.
  local id, estimate, actual, lane = ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6]), ARGV[7]
  local base, spread = spread_of(id)
  local booked = member(id, 1, estimate, lane)
  local at = st.init ~= nil and redis.call('ZSCORE', L, booked)
  if at then
    local settled = member(base, 1, actual, lane)
    if settled ~= booked then
      redis.call('ZADD', L, at, settled)  -- first: the log never empties
      redis.call('ZREM', L, booked)
    end
    st.tk = st.tk + actual - estimate
    if spread > 0 then st.uv = st.uv - spread end
    if lane ~= '' then st['lt:' .. lane] = st['lt:' .. lane] + actual - estimate end
    reschedule(actual - estimate, 0)
    result = {actual - estimate, now}
  elseif actual <= estimate or st.init == nil
      or redis.call('ZSCORE', L, member(base .. '+', 0, actual - estimate, lane)) then
    result = {0, now}  -- a refund after expiry frees nothing; a raise is charged once
  else
    add(base .. '+', now, 0, actual - estimate, lane, 0)
    reschedule(actual - estimate, 0)
    result = {actual - estimate, now}
  end
elseif op == 'release' then
  -- ARGV[4..6]: id, tokens, lane (the grant as booked).
  local tokens, lane = tonumber(ARGV[5]), ARGV[6]
  if st.init == nil or redis.call('ZREM', L, member(ARGV[4], 1, tokens, lane)) == 0 then
    result = {0, now}
  else
    local _, spread = spread_of(ARGV[4])
    subtract(1, tokens, lane, spread)
    if st.dy == math.floor(now / DAY_US) and st.dc > 0 then st.dc = st.dc - 1 end
    reschedule(-tokens, -1)
    result = {1, now}
  end
elseif op == 'report' then
  -- ARGV[4..5]: retry delay (µs), '1' when the 429 teaches.
  st.pu = math.max(st.pu, now + tonumber(ARGV[4]))
  dirty = true
  if ARGV[5] == '1' and (st.fa == 0 or now - st.fa >= math.floor(W / 4)) then
    -- The level that failed: the factor, or what the window held if less.
    local booked_r, booked_t = booked_ahead()
    local used = math.max(math.floor((st.rq - booked_r) * PPM / RPM),
      math.floor((st.tk - booked_t) * PPM / TPM))
    local base = math.min(factor, math.max(used, math.floor(factor * FACTOR_CUT_PPM / PPM)))
    local cut = math.max(FACTOR_FLOOR_PPM, math.floor(base * FACTOR_CUT_PPM / PPM))
    local lowest = math.floor(cut * PPM / KNEE_PPM)
    st.fc = factor < PPM and math.max(lowest, math.min(factor, used)) or 0
    st.fp = cut
    st.fa = now
  end
  result = {0, now}
elseif op == 'snapshot' then
  local today = st.dy == math.floor(now / DAY_US) and st.dc or 0
  -- Bookings ahead of now count apart from the window (now - W, now].
  local booked_r, booked_t, lane_booked = booked_ahead()
  result = {now, (st.rq or 0) - booked_r, (st.tk or 0) - booked_t, factor, st.pu or 0, today,
    booked_r, booked_t, st.uv or 0}
  for k, v in pairs(st) do
    local lane = string.match(k, '^lr:(.*)$')
    if lane then
      local ahead = lane_booked[lane] or {0, 0}
      result[#result + 1] = lane
      result[#result + 1] = v - ahead[1]
      result[#result + 1] = st['lt:' .. lane] - ahead[2]
    end
  end
else
  return redis.error_reply('unknown limiter operation ' .. tostring(op))
end

-- Every key outlives its last entry by at least half a window: a slot is booked up to
-- HORIZON ahead and counts for W after it. The log's TTL is refreshed every half window
-- (st.xp), or at once when this call created it, not on every call; the state, which
-- counts the log's entries, expires at the same moment (never after the log). Both last
-- at least to the end of the day, for the state counts the day's requests.
if dirty then
  local refresh = log_created or now - st.xp >= math.floor(W / 2)
  if refresh then st.xp = now end
  local day_end = (math.floor(st.xp / DAY_US) + 1) * DAY_US
  local expires = math.max(st.xp + HORIZON + 2 * W, day_end)
  if refresh then redis.call('PEXPIRE', L, math.floor((expires - now + 999) / 1000)) end
  local left_ms = math.max(1, math.floor((expires - now) / 1000) - 1)  -- 1 ms early
  redis.call('SET', S, cmsgpack.pack(st), 'PX', left_ms)
end
return result
