-- Ends a decision. A dialog still buffered and not sealed (its decision was not written) ages again; a
-- sealed one (written, but its last messages not stored), or one whose decision may have been written
-- (unsettled), is left to the sweeper at once: it asks the store.
-- ARGV: 1 prefix, 2 dialog, 3 token, 4 retention ms, 5 grace ms, 6 '1' if settled.
local d, token = ARGV[2], ARGV[3]
redis.call('ZREM', GATE, token)
if redis.call('GET', lock(d)) ~= token then return 0 end
redis.call('DEL', lock(d))
local state = redis.call('HMGET', meta(d), 't', 's')
if state[1] and (state[2] or ARGV[6] ~= '1') then
  redis.call('ZADD', DECIDING, num(math.floor(now_us() / 1000)), d)
  return 1
end
redis.call('ZREM', DECIDING, d)
if state[1] then
  local ends = tonumber(state[1]) + tonumber(ARGV[4]) + tonumber(ARGV[5])
  redis.call('PEXPIREAT', msgs(d), num(ends))
end
return 1
