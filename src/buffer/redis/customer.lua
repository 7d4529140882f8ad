-- Counts or drops a customer's dialogs in this shard (erasure).
-- ARGV: 1 prefix, 2 customer, 3 'drop' to drop them ('count' only counts). Returns {dialogs, messages,
-- shard bytes}.
local c, dropping = ARGV[2], ARGV[3] == 'drop'
local dialogs, messages = 0, 0
for _, d in ipairs(redis.call('SMEMBERS', customer(c))) do
  local state = redis.call('HMGET', meta(d), 'c', 'n')
  -- Only the customer's own: a dialog id dropped and reused by another customer is not theirs.
  if state[1] == c then
    dialogs = dialogs + 1
    if dropping then
      messages = messages + drop_dialog(d)
    else
      messages = messages + tonumber(state[2] or '0')
    end
  end
end
if dropping then redis.call('DEL', customer(c)) end
return {dialogs, messages, used_bytes()}
