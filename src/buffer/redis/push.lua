-- Appends messages to dialogs of this shard, each dialog's in order: pushMessage, pushMessages, and first
-- messages (all of one request's dialogs in this shard, in one call).
-- ARGV: 1 prefix, 2 messages a dialog may hold, 3 bytes the buffer may hold, 4 bytes held by the other shards
-- (as last seen), 5 retention ms, 6 grace ms after it; then per dialog: its id, '1' to open it if it is not
-- buffered ('0': hand its messages back), the µs (this server's clock) at which the caller found it not
-- buffered, the estimated bytes of its own bookkeeping, its message count N, '1' if any of them carries a
-- client messageId (else '0'), and 3 per message: customer, id, and the message's value without its seq,
-- "LANGUAGE LEN CLIENTID TEXT" (see common.lua), built by the caller: a retry compares it whole, and storing
-- a message puts its seq in front of it (Lua's string building was most of a batch's cost per message).
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

-- One dialog's messages, ARGV[first] to ARGV[first + 3 * count - 1].
local function push_dialog(d, open, observed, dialog_overhead, keyed, first, count)
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
  local stop = first + 3 * count - 1

  -- The messages already buffered under these ids, one read for all when any carries a client messageId
  -- (a retry); the random ids of messages without one are simply not found (the call passes no flag per
  -- message, to keep its arguments and its Lua strings few).
  local existing = {}
  if keyed and not creating then
    local ids = {}
    for i = first, stop, 3 do ids[#ids + 1] = ARGV[i + 1] end
    local values = in_parts('HMGET', msgs(d), ids)
    for k = 1, #ids do
      if values[k] then existing[ids[k]] = values[k] end
    end
  end

  local new = {}
  local added = 0
  for i = first, stop, 3 do
    local customer_id, id, unsequenced = ARGV[i], ARGV[i + 1], ARGV[i + 2]
    if creating and added == 0 then owner = customer_id end
    local code, seq = 0, 0
    local before = existing[id]
    if customer_id ~= owner then
      code = 6
    elseif before then
      -- A retry of the same message, or another message under a messageId already used.
      local space = string.find(before, ' ', 1, true)
      if space and string.sub(before, space + 1) == unsequenced then
        code, seq = 2, tonumber(string.sub(before, 1, space - 1))
      else
        code = 3
      end
    elseif count_now >= max_messages then
      code = 4
    else
      seq = math.max(now, last + 1)
      local value = num(seq) .. ' ' .. unsequenced
      local cost = cost_of(id, value)
      if creating and added == 0 then cost = cost + dialog_overhead end
      if others + base_bytes + added_bytes + cost > max_bytes then
        code, seq = 5, 0
      else
        new[#new + 1] = id
        new[#new + 1] = value
        -- A second message with this messageId in the same call is a retry of this one.
        existing[id] = value
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
  push_dialog(ARGV[i], ARGV[i + 1] == '1', tonumber(ARGV[i + 2]), tonumber(ARGV[i + 3]), ARGV[i + 5] == '1',
    i + 6, count)
  i = i + 6 + 3 * count
end
if added_count > 0 then
  redis.call('HSET', USAGE, 'b', num(base_bytes + added_bytes), 'n', num(base_count + added_count))
end
reply[2] = base_bytes + added_bytes
return reply
