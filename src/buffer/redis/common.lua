-- Shared by every script of one shard (prepended to each). ARGV[1] is the shard's key prefix; every key a
-- script touches starts with it, so it lives in the shard's hash slot (one Redis Cluster node).
--
-- A buffered message is one field of its dialog's message hash: the field is the message's 16-byte id,
-- the value "SEQ LANGUAGE LEN CLIENTID TEXT" (LEN is the byte length of the client's messageId, possibly
-- 0, which is followed directly by the text).
local P = ARGV[1]
local USAGE = P .. 'u'            -- hash: b (estimated bytes), n (messages), d (dialogs) of the shard
local DUE = P .. 'due'            -- zset: dialog -> ms of its first message (the retention index)
local DECIDING = P .. 'deciding'  -- zset: dialog -> ms when its decision lease ends
-- The shard's part of the erasure gate: the decisions in progress (zset: lease token -> ms when the lease
-- ends), and the token of an erasure that holds the shard (string, with the erasure's lease as expiry).
local GATE = P .. 'gate'
local ERASING = P .. 'erasing'
-- hash: c customer, t first ms, q last seq, s sealed, n messages, b estimated bytes
local function meta(d) return P .. 'd:' .. d end
local function msgs(d) return P .. 'm:' .. d end      -- hash: id -> message
local function lock(d) return P .. 'l:' .. d end      -- string: the decision lease's token
local function tomb(d) return P .. 'x:' .. d end      -- string: µs when its decision emptied it
local function customer(c) return P .. 'c:' .. c end  -- set: the customer's dialogs in this shard

-- Estimated memory of one message in Redis: its field and value, and the hash entry around them.
local MESSAGE_OVERHEAD = 64

local function now_us()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end

-- Integers as decimal text: Lua's numbers are doubles, and tostring would write large ones in exponent form.
-- '%d' goes through a 64-bit integer (exact below 2^53, where every value here stays), and costs a fraction
-- of '%.0f', which formats a double digit by digit.
local function num(x) return string.format('%d', x) end

-- Adds `delta` to a counter field (nothing when it is 0: Redis refuses "-0").
local function add(key, field, delta)
  if delta ~= 0 then redis.call('HINCRBY', key, field, num(delta)) end
end

-- Runs COMMAND KEY ITEMS... in parts, so that no call unpacks more values than Lua's stack holds (8000);
-- returns the replies of all parts, in order (for HMGET).
local function in_parts(command, key, items)
  local replies = {}
  for first = 1, #items, 4000 do
    local reply = redis.call(command, key, unpack(items, first, math.min(first + 3999, #items)))
    if type(reply) == 'table' then
      for k = 1, #reply do replies[#replies + 1] = reply[k] end
    end
  end
  return replies
end

-- Whether the decision lease `token` is still the dialog's, or nobody's (ran out, and nobody took it):
-- a decision that lost its lease to another must not touch the dialog.
local function holds(d, token)
  local holder = redis.call('GET', lock(d))
  return not holder or holder == token
end

local function seq_of(value) return tonumber(string.match(value, '^(%d+)')) end

local function cost_of(id, value) return #id + #value + MESSAGE_OVERHEAD end

-- Removes a dialog and its bookkeeping from the shard; returns how many messages it held (as its meta
-- counted them: Redis may have expired the messages themselves already, see push.lua).
local function drop_dialog(d)
  local state = redis.call('HMGET', meta(d), 'c', 'n', 'b')
  if not state[1] then return 0 end
  local n, b = tonumber(state[2] or '0'), tonumber(state[3] or '0')
  redis.call('DEL', meta(d), msgs(d))
  redis.call('SREM', customer(state[1]), d)
  redis.call('ZREM', DUE, d)
  redis.call('ZREM', DECIDING, d)
  add(USAGE, 'd', -1)
  add(USAGE, 'n', -n)
  add(USAGE, 'b', -b)
  return n
end

-- The shard's estimated bytes now, returned by every script that frees some (the caller's view of the budget).
local function used_bytes() return num(tonumber(redis.call('HGET', USAGE, 'b') or '0')) end

-- Ends the decision lease `token`: its place in the gate, and the dialog's lease if it still holds it.
local function release(d, token)
  redis.call('ZREM', GATE, token)
  if redis.call('GET', lock(d)) == token then redis.call('DEL', lock(d)) end
end
