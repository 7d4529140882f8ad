-- What the retention sweeper must look at in this shard: dialogs past the retention period that are not
-- being decided, and decisions whose lease ran out (their holder went away).
-- ARGV: 1 prefix, 2 retention ms, 3 at most this many of each. Returns {expired, abandoned}.
local now_ms = math.floor(now_us() / 1000)
local limit = tonumber(ARGV[3])
local expired, abandoned = {}, {}
local old = redis.call('ZRANGEBYSCORE', DUE, '-inf', num(now_ms - tonumber(ARGV[2])), 'LIMIT', 0, limit)
for _, d in ipairs(old) do
  if redis.call('EXISTS', lock(d)) == 0 and not redis.call('HGET', meta(d), 's') then
    expired[#expired + 1] = d
  end
end
for _, d in ipairs(redis.call('ZRANGEBYSCORE', DECIDING, '-inf', num(now_ms), 'LIMIT', 0, limit)) do
  if redis.call('EXISTS', lock(d)) == 0 then abandoned[#abandoned + 1] = d end
end
return {expired, abandoned}
