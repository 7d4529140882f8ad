-- Consent false is written: drops the dialog, with a mark of when (see seal).
-- ARGV: 1 prefix, 2 dialog, 3 token, 4 mark ms. Returns {messages it held, shard bytes}.
local d = ARGV[2]
local n = drop_dialog(d)
release(d, ARGV[3])
redis.call('SET', tomb(d), num(now_us()), 'PX', ARGV[4])
return {n, used_bytes()}
