-- Drops the given dialogs if they are still past the retention period and not being decided.
-- ARGV: 1 prefix, 2 retention ms, 3... dialogs. Returns {dialogs, messages} dropped, and the shard's bytes.
local limit = math.floor(now_us() / 1000) - tonumber(ARGV[2])
local dialogs, messages = 0, 0
for i = 3, #ARGV do
  local d = ARGV[i]
  local started = redis.call('ZSCORE', DUE, d)
  if started and tonumber(started) <= limit and redis.call('EXISTS', lock(d)) == 0
      and not redis.call('ZSCORE', DECIDING, d) and not redis.call('HGET', meta(d), 's') then
    messages = messages + drop_dialog(d)
    dialogs = dialogs + 1
  end
end
return {dialogs, messages, used_bytes()}
