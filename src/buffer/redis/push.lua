-- Appends messages to dialogs of this shard, each dialog's in order: pushMessage, pushMessages, and first
-- messages (all of one request's dialogs in this shard, in one call).
-- ARGV: 1 prefix, 2 messages a dialog may hold, 3 bytes the buffer may hold, 4 bytes held by the other shards
-- (as last seen), 5 retention ms, 6 grace ms after it; then per dialog: its id, '1' to open it if it is not
-- buffered ('0': hand its messages back), the µs (this server's clock) at which the caller found it not
-- buffered, the estimated bytes of its own bookkeeping, its message count N, and 5 per message: customer,
-- id, language, client messageId ('' if none), text.
-- Returns {now, shard bytes, then per dialog: 0 if its messages are handed back (not buffered and not to be
-- opened, sealed by a decision, or emptied by a decision since the caller looked), else 1 followed by
-- code, seq per message}: 1 added, 2 already there (a retry; seq as first recorded), 3 messageId conflict,
-- 4 the dialog is full, 5 the budget is full, 6 another customer's dialog (seq 0 but for 1 and 2).
local max_messages, max_bytes, others = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local ttl, grace = tonumber(ARGV[5]), tonumber(ARGV[6])
local now = now_us()
local now_ms = math.floor(now / 1000)
-- The shard's usage as Redis holds it, and what this call adds to it (written once, at the end).
local usage = redis.call('HMGET', USAGE, 'b', 'n')
local base_bytes, base_count = tonumber(usage[1] or '0'), tonumber(usage[2] or '0')
local added_bytes, added_count = 0, 0
local reply = {now, 0}

-- One dialog's messages, ARGV[first] to ARGV[first + 5 * count - 1].
local function push_dialog(d, open, observed, dialog_overhead, first, count)
  local state = redis.call('HMGET', meta(d), 'c', 's', 'q', 'n', 'b', 't')
  -- Past its retention period and the grace after it, and not being decided, Redis has dropped its
  -- messages by itself (no sweeper ran in time): the dialog is gone, only its bookkeeping is left.
  if state[1] and tonumber(state[6]) + ttl + grace <= now_ms and not state[2]
      and redis.call('EXISTS', lock(d), msgs(d)) == 0 then
    drop_dialog(d)
    state = {false, false, false, false, false, false}
    usage = redis.call('HMGET', USAGE, 'b', 'n')
    base_bytes, base_count = tonumber(usage[1] or '0'), tonumber(usage[2] or '0')
  end
  local creating = not state[1]
  if creating then
    if not open then reply[#reply + 1] = 0 return end
    -- Its decision emptied it after the caller looked the decision up: the caller looks again.
    local emptied = redis.call('GET', tomb(d))
    if emptied and tonumber(emptied) >= observed then reply[#reply + 1] = 0 return end
  elseif state[2] then
    reply[#reply + 1] = 0
    return
  end
  reply[#reply + 1] = 1
  local owner = state[1]
  local last = tonumber(state[3] or '0')
  local count_now = tonumber(state[4] or '0')
  local bytes = tonumber(state[5] or '0')
  local stop = first + 5 * count - 1

  -- The messages already buffered under the ids that carry a client messageId: one read for all.
  local keyed = {}
  for i = first, stop, 5 do
    if ARGV[i + 3] ~= '' then keyed[#keyed + 1] = ARGV[i + 1] end
  end
  local existing = {}
  if #keyed > 0 and not creating then
    local values = in_parts('HMGET', msgs(d), keyed)
    for k = 1, #keyed do
      if values[k] then existing[keyed[k]] = values[k] end
    end
  end

  local new = {}
  local added = 0
  for i = first, stop, 5 do
    local customer_id, id, language, client, text = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4]
    if creating and added == 0 then owner = customer_id end
    local code, seq = 0, 0
    local before = existing[id]
    if customer_id ~= owner then
      code = 6
    elseif before then
      -- A retry of the same message, or another message under a messageId already used.
      local recorded, lang, len, rest = string.match(before, '^(%d+) (%S+) (%d+) (.*)$')
      if lang == language and string.sub(rest, tonumber(len) + 1) == text then
        code, seq = 2, tonumber(recorded)
      else
        code = 3
      end
    elseif count_now >= max_messages then
      code = 4
    else
      seq = math.max(now, last + 1)
      local value = num(seq) .. ' ' .. language .. ' ' .. #client .. ' ' .. client .. text
      local cost = cost_of(id, value)
      if creating and added == 0 then cost = cost + dialog_overhead end
      if others + base_bytes + added_bytes + cost > max_bytes then
        code, seq = 5, 0
      else
        new[#new + 1] = id
        new[#new + 1] = value
        -- A second message with this messageId in the same call is a retry of this one.
        if client ~= '' then existing[id] = value end
        code = 1
        last = seq
        count_now = count_now + 1
        bytes = bytes + cost
        added_bytes = added_bytes + cost
        added = added + 1
      end
    end
    reply[#reply + 1] = code
    reply[#reply + 1] = seq
  end
  if added == 0 then return end
  in_parts('HSET', msgs(d), new)
  if creating then
    local started = now_ms
    redis.call('HSET', meta(d), 'c', owner, 't', num(started), 'q', num(last), 'n', count_now, 'b', num(bytes))
    redis.call('ZADD', DUE, num(started), d)
    redis.call('SADD', customer(owner), d)
    -- If no sweeper drops the dialog in time (no replica running), Redis drops its messages by itself.
    -- Its meta and its place in the customer's set stay, for the next sweeper: the budget counts the one,
    -- an erasure finds the dialog through the other.
    redis.call('PEXPIREAT', msgs(d), num(started + ttl + grace))
    add(USAGE, 'd', 1)
  else
    redis.call('HSET', meta(d), 'q', num(last), 'n', count_now, 'b', num(bytes))
  end
  added_count = added_count + added
end

local i = 7
while i <= #ARGV do
  local count = tonumber(ARGV[i + 4])
  push_dialog(ARGV[i], ARGV[i + 1] == '1', tonumber(ARGV[i + 2]), tonumber(ARGV[i + 3]), i + 5, count)
  i = i + 5 + 5 * count
end
if added_count > 0 then
  redis.call('HSET', USAGE, 'b', num(base_bytes + added_bytes), 'n', num(base_count + added_count))
end
reply[2] = base_bytes + added_bytes
return reply
