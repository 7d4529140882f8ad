-- Claims (or keeps) a lease held by one replica at a time, such as the sweeper's.
-- KEYS[1] the lease. ARGV: 1 token, 2 lease ms. Returns 1 if this token holds it now.
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
