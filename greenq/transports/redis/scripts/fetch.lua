-- FETCH (after claimed.lua): move due delayed messages, then read.
-- KEYS, per queue: its delayed zset and its ten streams, priority 9 first.
-- ARGV: group, consumer, parking consumer, count, now (epoch s), number of
-- queues, most delayed messages moved per queue, size limit, preview length,
-- byte budget (0: none).
-- Returns {next_due, groups...}: next_due is the earliest remaining eta as a
-- string ('' when none); each group of messages from one stream is: queue index
-- (from 0), priority, n, then each of the n messages: an entry of the shape
-- greenq writes (b, then m; not over the size limit) as one string, 'ID COUNT
-- LEN MID' then the body (COUNT: deliveries, LEN: the message id's length:
-- one bulk reply a message for the client to parse, not five), any other as
-- 0 and the 5 values entry id, body, message id and size as split gives them,
-- deliveries.  A delayed member that does not
-- parse goes to the queue's priority-0 stream as b=member, e=reason.
-- With a byte budget, new entries are read a few at a time (READ_STEP first,
-- then as many as the budget left holds at the average size read so far, plus
-- one), so what is read past the budget, and parked again, stays small while
-- small messages still come in one read.

local READ_STEP = 16
local group, consumer, parked = ARGV[1], ARGV[2], ARGV[3]
local want = tonumber(ARGV[4])
local now = ARGV[5]
local nq = tonumber(ARGV[6])
local move = tonumber(ARGV[7])
local limit, preview = tonumber(ARGV[8]), tonumber(ARGV[9])
local budget = tonumber(ARGV[10])
local metered = budget > 0
local out = {''}
local next_due = nil
local head = 0
local taken = 0
local seen_n, seen_bytes = 0, 0
local function step()
  if not metered then return want end
  if seen_n == 0 then return math.min(want, READ_STEP) end
  if seen_bytes == 0 then return want end
  return math.min(want, math.max(1, math.floor(budget * seen_n / seen_bytes) + 1))
end
local function start(q, prio)
  head = #out + 1
  out[head] = q; out[head + 1] = prio; out[head + 2] = 0
end
-- Add one entry unless the budget is spent (then false: the caller parks it).
local function emit(id, f, deliveries)
  local body, mid, size, cost = split(f, limit, preview)
  seen_n, seen_bytes = seen_n + 1, seen_bytes + cost
  if metered and taken > 0 and cost > budget then
    budget = 0
    return false
  end
  budget = budget - cost
  taken = taken + 1
  local n = #out
  if size == 0 and type(mid) == 'string' then
    out[n + 1] = id .. ' ' .. deliveries .. ' ' .. #mid .. ' ' .. mid .. body
  else
    out[n + 1] = 0
    out[n + 2] = id; out[n + 3] = body; out[n + 4] = mid; out[n + 5] = size; out[n + 6] = deliveries
  end
  out[head + 2] = out[head + 2] + 1
  return true
end
for q = 0, nq - 1 do
  local base = q * 11
  local dkey = KEYS[base + 1]
  local due = redis.call('ZRANGEBYSCORE', dkey, '-inf', now, 'LIMIT', 0, move)
  for _, m in ipairs(due) do
    local prio = tonumber(string.sub(m, 9, 9))
    local colon = string.find(m, ':', 10, true)
    local n = colon and tonumber(string.sub(m, 10, colon - 1))
    if prio and n and n >= 0 and n == math.floor(n) and colon + n <= #m then
      redis.call('XADD', KEYS[base + 11 - prio], '*', 'b', string.sub(m, colon + n + 1),
                 'm', string.sub(m, colon + 1, colon + n))
    else
      redis.call('XADD', KEYS[base + 11], '*', 'b', m, 'e', 'malformed delayed entry')
    end
  end
  if #due > 0 then redis.call('ZREM', dkey, unpack(due)) end
  local first = redis.call('ZRANGE', dkey, 0, 0, 'WITHSCORES')
  if first[2] then
    local score = tonumber(first[2])
    if next_due == nil or score < next_due then next_due = score end
  end
end
for q = 0, nq - 1 do
  local base = q * 11
  for b = 0, 9 do
    if want <= 0 then break end
    local key = KEYS[base + 2 + b]
    if redis.call('XLEN', key) > 0 then
      local back = redis.pcall('XPENDING', key, group, '-', '+', want, parked)
      if type(back) == 'table' and back.err then
        if not string.find(back.err, 'NOGROUP', 1, true) then return redis.error_reply(back.err) end
        redis.call('XGROUP', 'CREATE', key, group, '0')
        back = {}
      end
      start(q, 9 - b)
      if #back > 0 then
        local ids, counts = {}, {}
        for i, p in ipairs(back) do ids[i] = p[1]; counts[p[1]] = p[4] end
        local claimed = redis.call('XCLAIM', key, group, consumer, 0, unpack(ids))
        for _, e in ipairs(claimed) do
          local f = claimed_fields(key, group, e)
          if f then
            if want > 0 and emit(e[1], f, counts[e[1]] + 1) then
              want = want - 1
            else   -- over the budget: parked again as it was
              redis.call('XCLAIM', key, group, parked, 0, e[1], 'RETRYCOUNT', counts[e[1]], 'JUSTID')
              want = 0
            end
          end
        end
      end
      while want > 0 do
        local n = step()
        local r = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', n, 'STREAMS', key, '>')
        if not r then break end
        local entries = r[1][2]
        for _, e in ipairs(entries) do
          if want > 0 and emit(e[1], e[2], 1) then
            want = want - 1
          else     -- read past the budget: parked, not counted as a hand-out
            redis.call('XCLAIM', key, group, parked, 0, e[1], 'RETRYCOUNT', 0, 'JUSTID')
            want = 0
          end
        end
        if #entries < n then break end
      end
      if out[head + 2] == 0 then for j = head + 2, head, -1 do out[j] = nil end end
    end
  end
end
if next_due then out[1] = tostring(next_due) end
return out
