-- The erasure gate, shared by all replicas: decisions enter it shared, an erasure exclusively. Each holder
-- has a lease, so one that goes away cannot block the others for longer than that.
-- ARGV: 1 gate prefix, 2 'enter' | 'exit' | 'erase' | 'erased', 3 token, 4 lease ms.
-- enter: 1 if entered, 0 while an erasure holds it. erase: how many decisions are still inside (the
-- erasure may proceed at 0), or -1 while another erasure holds it. exit, erased: 1.
local G, op, token = ARGV[1], ARGV[2], ARGV[3]
local ERASING, HOLDERS = G .. 'erasing', G .. 'holders'
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if op == 'enter' then
  if redis.call('EXISTS', ERASING) == 1 then return 0 end
  redis.call('ZADD', HOLDERS, string.format('%.0f', now_ms + tonumber(ARGV[4])), token)
  return 1
elseif op == 'exit' then
  redis.call('ZREM', HOLDERS, token)
  return 1
elseif op == 'erase' then
  local holder = redis.call('GET', ERASING)
  if holder and holder ~= token then return -1 end
  redis.call('SET', ERASING, token, 'PX', ARGV[4])
  redis.call('ZREMRANGEBYSCORE', HOLDERS, '-inf', string.format('%.0f', now_ms))
  return redis.call('ZCARD', HOLDERS)
else
  if redis.call('GET', ERASING) == token then redis.call('DEL', ERASING) end
  return 1
end
