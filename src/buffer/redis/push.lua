-- Appends one dialog's messages, in order (pushMessage, pushMessages, and the first message of a dialog).
-- ARGV: 1 prefix, 2 '1' to open the dialog if it is not buffered ('0': hand everything back), 3 dialog,
-- 4 messages a dialog may hold, 5 bytes the buffer may hold, 6 bytes held by the other shards (as last
-- seen), 7 retention ms, 8 grace ms after it, 9 µs (this server's clock) at which the caller found the
-- dialog not buffered, 10 estimated bytes of a dialog's own bookkeeping; then 5 per message: customer, id,
-- language, client messageId ('' if none), text.
-- Returns {0, now} when the dialog is not taken (not buffered and not to be opened, sealed by a decision,
-- or emptied by a decision since the caller looked), else {1, now, shard bytes, results}: per message
-- {1, seq} added, {2, seq} already there (a retry), {3} messageId conflict, {4} the dialog is full,
-- {5} the budget is full, {6} another customer's dialog.
local d = ARGV[3]
local max_messages, max_bytes, others = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local ttl, grace, observed, dialog_overhead = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[10])
local now = now_us()
local used = tonumber(redis.call('HGET', USAGE, 'b') or '0')
local state = redis.call('HMGET', meta(d), 'c', 's', 'q')
local creating = not state[1]
if creating then
  if ARGV[2] ~= '1' then return {0, num(now)} end
  -- Its decision emptied it after the caller looked the decision up: the caller looks again.
  local emptied = redis.call('GET', tomb(d))
  if emptied and tonumber(emptied) >= observed then return {0, num(now)} end
elseif state[2] then
  return {0, num(now)}
end
local owner = state[1]
local last = tonumber(state[3] or '0')
local count = tonumber(redis.call('HGET', COUNTS, d) or '0')
local bytes = tonumber(redis.call('HGET', SIZES, d) or '0')
local added, added_bytes = 0, 0
local results = {}
for i = 11, #ARGV, 5 do
  local customer_id, id, language, client, text = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4]
  if creating and added == 0 then owner = customer_id end
  local existing = false
  if customer_id ~= owner then
    results[#results + 1] = {6}
  else
    if client ~= '' then existing = redis.call('HGET', msgs(d), id) end
    if existing then
      local seq, lang, len, rest = string.match(existing, '^(%d+) (%S+) (%d+) (.*)$')
      if lang == language and string.sub(rest, tonumber(len) + 1) == text then
        results[#results + 1] = {2, seq}
      else
        results[#results + 1] = {3}
      end
    elseif count >= max_messages then
      results[#results + 1] = {4}
    else
      local seq = math.max(now, last + 1)
      local value = num(seq) .. ' ' .. language .. ' ' .. #client .. ' ' .. client .. text
      local cost = cost_of(id, value)
      if creating and added == 0 then cost = cost + dialog_overhead end
      if others + used + cost > max_bytes then
        results[#results + 1] = {5}
      else
        redis.call('HSET', msgs(d), id, value)
        last = seq
        count = count + 1
        bytes = bytes + cost
        used = used + cost
        added = added + 1
        added_bytes = added_bytes + cost
        results[#results + 1] = {1, num(seq)}
      end
    end
  end
end
if added > 0 then
  if creating then
    local started = math.floor(now / 1000)
    redis.call('HSET', meta(d), 'c', owner, 't', num(started), 'q', num(last))
    redis.call('ZADD', DUE, num(started), d)
    redis.call('SADD', customer(owner), d)
    -- Redis drops the dialog by itself if no sweeper did in time (no replica running).
    local ends = started + ttl + grace
    redis.call('PEXPIREAT', meta(d), num(ends))
    redis.call('PEXPIREAT', msgs(d), num(ends))
    if redis.call('PEXPIRETIME', customer(owner)) < ends then
      redis.call('PEXPIREAT', customer(owner), num(ends))
    end
    add(USAGE, 'd', 1)
  else
    redis.call('HSET', meta(d), 'q', num(last))
  end
  redis.call('HSET', COUNTS, d, num(count))
  redis.call('HSET', SIZES, d, num(bytes))
  add(USAGE, 'n', added)
  add(USAGE, 'b', added_bytes)
end
return {1, num(now), num(used), results}
