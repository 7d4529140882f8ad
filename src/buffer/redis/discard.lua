-- Consent false is written: drops the dialog, with a mark of when (see seal).
-- ARGV: 1 prefix, 2 dialog, 3 token, 4 mark ms. Returns {messages it held, shard bytes, 1}, or {0, bytes, 0}
-- when another decision holds the dialog's lease (this one lost it): nothing is touched.
local d = ARGV[2]
if not holds(d, ARGV[3]) then return {0, used_bytes(), 0} end
local n = drop_dialog(d)
release(d, ARGV[3])
redis.call('SET', tomb(d), num(now_us()), 'PX', ARGV[4])
return {n, used_bytes(), 1}
