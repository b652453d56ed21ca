-- One observation of a call kind's real usage, added atomically for the fleet.
-- Mirrors runtime/pipelines/estimates.py (Moments.add, Learned.observed).
-- KEYS[1] = the estimates hash
-- ARGV = "model/kind", max calls, heuristic input, actual input, actual output, ttl (s)
-- Returns the kind's figures after the update, as text: n, mean, m2, rn, rmean, rm2.
local key, prefix = KEYS[1], ARGV[1]
local max_calls = tonumber(ARGV[2])
local heuristic_in, actual_in, actual_out = tonumber(ARGV[3]), tonumber(ARGV[4]),
  tonumber(ARGV[5])

local names = {'n', 'mean', 'm2', 'rn', 'rmean', 'rm2'}
local fields = {}
for i, name in ipairs(names) do fields[i] = prefix .. ':' .. name end
local values = redis.call('HMGET', key, unpack(fields))
local v = {}
for i = 1, 6 do v[i] = tonumber(values[i]) or 0 end

-- Welford's update; once max_calls are counted the oldest fade.
local function add(n, mean, m2, x)
  local kept = math.min(n, max_calls - 1)
  if n > 0 then m2 = m2 * kept / n else m2 = 0 end
  n = kept + 1
  local delta = x - mean
  mean = mean + delta / n
  return n, mean, math.max(0, m2 + delta * (x - mean))
end

v[1], v[2], v[3] = add(v[1], v[2], v[3], actual_out)
if heuristic_in > 0 and actual_in > 0 then
  v[4], v[5], v[6] = add(v[4], v[5], v[6], actual_in / heuristic_in)
end

local args, reply = {}, {}
for i = 1, 6 do
  local text = string.format('%.17g', v[i])
  args[#args + 1] = fields[i]
  args[#args + 1] = text
  reply[i] = text
end
redis.call('HSET', key, unpack(args))
redis.call('EXPIRE', key, tonumber(ARGV[6]))
return reply
