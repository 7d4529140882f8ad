-- Begins a decision: takes the dialog's lease and a place in the shard's erasure gate, and copies what the
-- dialog holds. ARGV: 1 prefix, 2 dialog, 3 token, 4 lease ms.
-- Returns {0} while another decision holds the lease or an erasure holds the shard; {1, now} when nothing
-- is buffered; else {1, now, customer, {id, message, ...}, 1 if sealed else 0}.
local d, token, lease = ARGV[2], ARGV[3], tonumber(ARGV[4])
if redis.call('EXISTS', ERASING) == 1 then return {0} end
local holder = redis.call('GET', lock(d))
if holder and holder ~= token then return {0} end
redis.call('SET', lock(d), token, 'PX', lease)
local now = now_us()
local ends = math.floor(now / 1000) + lease
redis.call('ZADD', GATE, num(ends), token)
local state = redis.call('HMGET', meta(d), 'c', 's')
local owner = state[1]
if not owner then return {1, now} end
-- Listed until the decision ends, so that a sweeper finishes it if its holder goes away.
redis.call('ZADD', DECIDING, num(ends), d)
-- A decision in progress is not undecided: Redis must not expire it either.
redis.call('PERSIST', msgs(d))
return {1, now, owner, redis.call('HGETALL', msgs(d)), state[2] and 1 or 0}
