-- Appends one dialog's messages, in order (pushMessage, pushMessages, and the first message of a dialog).
-- ARGV: 1 prefix, 2 '1' to open the dialog if it is not buffered ('0': hand everything back), 3 dialog,
-- 4 messages a dialog may hold, 5 bytes the buffer may hold, 6 bytes held by the other shards (as last
-- seen), 7 retention ms, 8 grace ms after it, 9 µs (this server's clock) at which the caller found the
-- dialog not buffered, 10 estimated bytes of a dialog's own bookkeeping; then 5 per message: customer, id,
-- language, client messageId ('' if none), text.
-- Returns {0, now} when the dialog is not taken (not buffered and not to be opened, sealed by a decision,
-- or emptied by a decision since the caller looked), else {1, now, shard bytes, code, seq, code, seq, ...}
-- with per message: 1 added, 2 already there (a retry; seq as first recorded), 3 messageId conflict,
-- 4 the dialog is full, 5 the budget is full, 6 another customer's dialog (seq 0 but for 1 and 2).
local d = ARGV[3]
local max_messages, max_bytes, others = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local ttl, grace, observed, dialog_overhead = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[10])
local now = now_us()
local usage = redis.call('HMGET', USAGE, 'b', 'n')
local used, used_count = tonumber(usage[1] or '0'), tonumber(usage[2] or '0')
local state = redis.call('HMGET', meta(d), 'c', 's', 'q', 'n', 'b', 't')
-- Past its retention period and the grace after it, Redis has dropped its messages by itself (no sweeper
-- ran in time): the dialog is gone, only its bookkeeping is left.
if state[1] and tonumber(state[6]) + ttl + grace <= math.floor(now / 1000) then
  drop_dialog(d)
  state = {false, false, false, false, false, false}
  usage = redis.call('HMGET', USAGE, 'b', 'n')
  used, used_count = tonumber(usage[1] or '0'), tonumber(usage[2] or '0')
end
local creating = not state[1]
if creating then
  if ARGV[2] ~= '1' then return {0, now} end
  -- Its decision emptied it after the caller looked the decision up: the caller looks again.
  local emptied = redis.call('GET', tomb(d))
  if emptied and tonumber(emptied) >= observed then return {0, now} end
elseif state[2] then
  return {0, now}
end
local owner = state[1]
local last = tonumber(state[3] or '0')
local count = tonumber(state[4] or '0')
local bytes = tonumber(state[5] or '0')

-- The messages already buffered under the ids that carry a client messageId: one read for all.
local keyed = {}
for i = 11, #ARGV, 5 do
  if ARGV[i + 3] ~= '' then keyed[#keyed + 1] = ARGV[i + 1] end
end
local existing = {}
if #keyed > 0 and not creating then
  local values = redis.call('HMGET', msgs(d), unpack(keyed))
  for k = 1, #keyed do
    if values[k] then existing[keyed[k]] = values[k] end
  end
end

local reply = {1, now, 0}
local new = {}
local added = 0
for i = 11, #ARGV, 5 do
  local customer_id, id, language, client, text = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4]
  if creating and added == 0 then owner = customer_id end
  local code, seq = 0, 0
  local before = existing[id]
  if customer_id ~= owner then
    code = 6
  elseif before then
    -- A retry of the same message, or another message under a messageId already used.
    local first, lang, len, rest = string.match(before, '^(%d+) (%S+) (%d+) (.*)$')
    if lang == language and string.sub(rest, tonumber(len) + 1) == text then
      code, seq = 2, tonumber(first)
    else
      code = 3
    end
  elseif count >= max_messages then
    code = 4
  else
    seq = math.max(now, last + 1)
    local value = num(seq) .. ' ' .. language .. ' ' .. #client .. ' ' .. client .. text
    local cost = cost_of(id, value)
    if creating and added == 0 then cost = cost + dialog_overhead end
    if others + used + cost > max_bytes then
      code, seq = 5, 0
    else
      new[#new + 1] = id
      new[#new + 1] = value
      -- A second message with this messageId in the same call is a retry of this one.
      if client ~= '' then existing[id] = value end
      code = 1
      last = seq
      count = count + 1
      bytes = bytes + cost
      used = used + cost
      added = added + 1
    end
  end
  reply[#reply + 1] = code
  reply[#reply + 1] = seq
end
if added > 0 then
  redis.call('HSET', msgs(d), unpack(new))
  if creating then
    local started = math.floor(now / 1000)
    redis.call('HSET', meta(d), 'c', owner, 't', num(started), 'q', num(last), 'n', count, 'b', num(bytes))
    redis.call('ZADD', DUE, num(started), d)
    redis.call('SADD', customer(owner), d)
    -- If no sweeper drops the dialog in time (no replica running), Redis drops its messages, and the
    -- customer's set, by itself. The meta stays: it is what the budget counts, for the next sweeper.
    local ends = started + ttl + grace
    redis.call('PEXPIREAT', msgs(d), num(ends))
    if redis.call('PEXPIRETIME', customer(owner)) < ends then
      redis.call('PEXPIREAT', customer(owner), num(ends))
    end
    add(USAGE, 'd', 1)
  else
    redis.call('HSET', meta(d), 'q', num(last), 'n', count, 'b', num(bytes))
  end
  redis.call('HSET', USAGE, 'b', num(used), 'n', num(used_count + added))
end
reply[3] = used
return reply
