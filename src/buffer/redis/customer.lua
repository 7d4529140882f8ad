-- Counts or drops a customer's dialogs in this shard (erasure).
-- ARGV: 1 prefix, 2 customer, 3 'drop' to drop them ('count' only counts). Returns {dialogs, messages,
-- shard bytes}.
local c, dropping = ARGV[2], ARGV[3] == 'drop'
local dialogs, messages = 0, 0
for _, d in ipairs(redis.call('SMEMBERS', customer(c))) do
  local owner = redis.call('HGET', meta(d), 'c')
  -- A member whose dialog Redis expired by itself is dropped too; one reused by another customer is not.
  if owner == c or (not owner and redis.call('ZSCORE', DUE, d)) then
    dialogs = dialogs + 1
    if dropping then
      messages = messages + drop_dialog(d)
    else
      messages = messages + tonumber(redis.call('HGET', COUNTS, d) or '0')
    end
  end
end
if dropping then redis.call('DEL', customer(c)) end
return {dialogs, messages, used_bytes()}
