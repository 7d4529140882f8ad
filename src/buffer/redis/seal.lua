-- Consent true is written with the messages up to SEQ: forgets those and seals the dialog (no more pushes).
-- When nothing is left it leaves the buffer, with a mark of when, for pushes that looked the decision up
-- before it was written; the decision's lease ends with it.
-- ARGV: 1 prefix, 2 dialog, 3 SEQ, 4 token, 5 mark ms.
-- Returns {shard bytes, {id, message, ...} left, 1}; nothing left means the lease is released. {bytes, {}, 0}
-- when another decision holds the dialog's lease (this one lost it): nothing is touched.
local d, through, token = ARGV[2], tonumber(ARGV[3]), ARGV[4]
if not holds(d, token) then return {used_bytes(), {}, 0} end
local state = redis.call('HMGET', meta(d), 'c', 'q')
if state[1] and tonumber(state[2]) > through then
  -- Messages arrived while the decision was written: keep those, forget the others.
  redis.call('HSET', meta(d), 's', '1')
  local all = redis.call('HGETALL', msgs(d))
  local done, left, removed, freed = {}, {}, 0, 0
  for i = 1, #all, 2 do
    local id, value = all[i], all[i + 1]
    if seq_of(value) <= through then
      done[#done + 1] = id
      removed = removed + 1
      freed = freed + cost_of(id, value)
    else
      left[#left + 1] = id
      left[#left + 1] = value
    end
  end
  in_parts('HDEL', msgs(d), done)
  add(meta(d), 'n', -removed)
  add(meta(d), 'b', -freed)
  add(USAGE, 'n', -removed)
  add(USAGE, 'b', -freed)
  if #left > 0 then return {used_bytes(), left, 1} end
end
-- Everything it holds is written (or it was gone already): it leaves the buffer.
drop_dialog(d)
release(d, token)
redis.call('SET', tomb(d), num(now_us()), 'PX', ARGV[5])
return {used_bytes(), {}, 1}
