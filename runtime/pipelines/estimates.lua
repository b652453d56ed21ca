-- Moving averages of one call kind's real usage, updated atomically for the fleet.
-- Mirrors runtime/pipelines/estimates.py:updated().
-- KEYS[1] = the estimates hash
-- ARGV = kind, alpha, seed mean, seed dev, heuristic input, actual input, actual output, ttl
local key = KEYS[1]
local kind = ARGV[1]
local alpha = tonumber(ARGV[2])
local heuristic_in = tonumber(ARGV[5])
local actual_in = tonumber(ARGV[6])
local actual_out = tonumber(ARGV[7])

local mean = tonumber(redis.call('HGET', key, kind .. ':mean') or ARGV[3])
local dev = tonumber(redis.call('HGET', key, kind .. ':dev') or ARGV[4])
local ratio = tonumber(redis.call('HGET', key, kind .. ':ratio') or '1')

dev = (1 - alpha) * dev + alpha * math.abs(actual_out - mean)
mean = (1 - alpha) * mean + alpha * actual_out
if heuristic_in > 0 and actual_in > 0 then
  ratio = (1 - alpha) * ratio + alpha * (actual_in / heuristic_in)
end

redis.call('HSET', key, kind .. ':mean', tostring(mean), kind .. ':dev', tostring(dev),
           kind .. ':ratio', tostring(ratio))
redis.call('EXPIRE', key, tonumber(ARGV[8]))
return 1
