-- What the retention sweeper must look at in this shard: dialogs past the retention period that are not
-- being decided (nor waiting for a sweeper to finish their decision), and decisions whose lease ran out
-- (their holder went away, or could not tell whether its decision was written).
-- ARGV: 1 prefix, 2 retention ms, 3 at most this many of each. Returns {expired, abandoned}.
local now_ms = math.floor(now_us() / 1000)
local limit = tonumber(ARGV[3])
local expired, abandoned = {}, {}
-- Dialogs being decided stay in the retention index: look past them, but not forever.
local offset = 0
while #expired < limit and offset < 10 * limit do
  local old = redis.call('ZRANGEBYSCORE', DUE, '-inf', num(now_ms - tonumber(ARGV[2])), 'LIMIT', offset, limit)
  for _, d in ipairs(old) do
    if redis.call('EXISTS', lock(d)) == 0 and not redis.call('ZSCORE', DECIDING, d)
        and not redis.call('HGET', meta(d), 's') then
      expired[#expired + 1] = d
    end
  end
  if #old < limit then break end
  offset = offset + limit
end
for _, d in ipairs(redis.call('ZRANGEBYSCORE', DECIDING, '-inf', num(now_ms), 'LIMIT', 0, limit)) do
  if redis.call('EXISTS', lock(d)) == 0 then abandoned[#abandoned + 1] = d end
end
return {expired, abandoned}
