-- The shard's part of the erasure gate, for an erasure.
-- ARGV: 1 prefix, 2 'close' | 'open', 3 the erasure's token, 4 lease ms.
-- close: no decision of the shard begins from now on; returns how many are still in progress (the erasure
-- proceeds at 0 on every shard), or -1 while another erasure holds the shard. open: lets decisions begin
-- again; returns 1.
local op, token = ARGV[2], ARGV[3]
if op == 'open' then
  if redis.call('GET', ERASING) == token then redis.call('DEL', ERASING) end
  return 1
end
local holder = redis.call('GET', ERASING)
if holder and holder ~= token then return -1 end
redis.call('SET', ERASING, token, 'PX', ARGV[4])
-- Decisions whose lease ran out (their holder went away) no longer count.
redis.call('ZREMRANGEBYSCORE', GATE, '-inf', num(math.floor(now_us() / 1000)))
return redis.call('ZCARD', GATE)
