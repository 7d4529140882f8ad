-- Consent true is written with the messages up to SEQ: forgets those and seals the dialog (no more pushes).
-- When nothing is left it leaves the buffer, with a mark of when, for pushes that looked the decision up
-- before it was written.
-- ARGV: 1 prefix, 2 dialog, 3 SEQ, 4 token, 5 mark ms. Returns {shard bytes, {id, message, ...} left}.
-- Whenever it returns nothing, the dialog has left the buffer and the lease is released.
local d, through = ARGV[2], tonumber(ARGV[3])
if not redis.call('HGET', meta(d), 'c') then
  release_lock(d, ARGV[4])
  return {used_bytes(), {}}
end
redis.call('HSET', meta(d), 's', '1')
local all = redis.call('HGETALL', msgs(d))
local left, removed, freed = {}, 0, 0
for i = 1, #all, 2 do
  local id, value = all[i], all[i + 1]
  if seq_of(value) <= through then
    redis.call('HDEL', msgs(d), id)
    removed = removed + 1
    freed = freed + cost_of(id, value)
  else
    left[#left + 1] = id
    left[#left + 1] = value
  end
end
if #left == 0 then
  drop_dialog(d)
  release_lock(d, ARGV[4])
  redis.call('SET', tomb(d), num(now_us()), 'PX', ARGV[5])
else
  add(COUNTS, d, -removed)
  add(SIZES, d, -freed)
  add(USAGE, 'n', -removed)
  add(USAGE, 'b', -freed)
end
return {used_bytes(), left}
