-- Begins a decision: takes the dialog's lease and copies what it holds.
-- ARGV: 1 prefix, 2 dialog, 3 token, 4 lease ms.
-- Returns {0} while another decision holds the lease; {1, now} when nothing is buffered; else
-- {1, now, customer, {id, message, ...}}.
local d, token, lease = ARGV[2], ARGV[3], tonumber(ARGV[4])
local holder = redis.call('GET', lock(d))
if holder and holder ~= token then return {0} end
redis.call('SET', lock(d), token, 'PX', lease)
local now = now_us()
local owner = redis.call('HGET', meta(d), 'c')
if not owner then return {1, num(now)} end
-- Listed until the decision ends, so that a sweeper finishes it if its holder goes away.
redis.call('ZADD', DECIDING, num(math.floor(now / 1000) + lease), d)
-- A decision in progress is not undecided: Redis must not expire it either.
redis.call('PERSIST', meta(d))
redis.call('PERSIST', msgs(d))
return {1, num(now), owner, redis.call('HGETALL', msgs(d))}
