"""The Lua scripts of the Redis broker (see the key layout in ``redis.py``).

Each script runs atomically on the server: a message moved from the delayed
set to its stream, claimed, parked or dead-lettered by one script is never seen
half-moved by another consumer.  Scripts return flat arrays (fixed strides) to
keep the Python side's parsing cheap.  Keys are passed in KEYS, except where
a script computes them (dead letters going back to their queue's stream).

Sizes: the reading scripts get the longest entry a worker reads whole (the
sum of its field values' lengths, ``limit``) and the length of a preview.  An
entry over the limit is never returned whole: its body field (or first value)
is cut to the preview and its size is returned beside it, so a 30 MiB entry
costs the worker a few KB (the worker dead-letters it with the preview).
FETCH also gets a byte budget: it stops once the bodies it returns would pass
it (always returning at least one), and parks what it read past that on the
parking consumer with its delivery count unchanged, so those come next in order.

Stream entries have the fields ``b`` (body) and ``m`` (message id); an entry
made from a malformed delayed member has ``b`` (the whole member) and ``e``
(the reason) instead.  The reading scripts never judge an entry: they return
its body and message id, or its whole field list when its shape is not the
usual one, and ``entry_delivery`` in ``redis.py`` checks them (so a bad entry
becomes a dead letter rather than an error after the batch was leased).  A
delayed member that does not parse is not an error either.  A delayed member is
``<8 random chars><priority digit><len(id)>:<id><body>``.
"""

# Shared by the reading scripts.  ``claimed_fields``: the fields of a claimed
# entry, or nil when the entry was deleted while pending (its pending entry is
# dropped).  ``split(f, limit, preview)``: body, message id and size of an
# entry.  Size 0: the entry is within ``limit``; one of the shape greenq writes
# (``b``, then ``m``) comes as its body and message id, any other as its whole
# field list and 0, for the Python side to check (``entry_delivery`` in
# redis.py).  Size > 0: the entry is over ``limit``: the first ``preview``
# bytes of its ``b`` field (or of its first value), its ``m`` field when it is
# a short one (else 0), and its size (the body's, when the body alone is
# over).  A fourth value says how many bytes the reply carries (the entry's
# size, or the preview's).
_CLAIMED = """
local function claimed_fields(key, group, e)
  if type(e) ~= 'table' then return nil end
  if type(e[2]) ~= 'table' then
    redis.call('XACK', key, group, e[1])
    return nil
  end
  return e[2]
end
local function split(f, limit, preview)
  if #f == 4 and f[1] == 'b' and f[3] == 'm' then
    local size = #f[2] + #f[4]
    if size <= limit then return f[2], f[4], 0, size end
  end
  local size = 0
  for i = 2, #f, 2 do size = size + #f[i] end
  if size > limit then
    local body, mid = f[2] or '', 0
    for i = 1, #f - 1, 2 do
      if f[i] == 'b' then body = f[i + 1] elseif f[i] == 'm' and #f[i + 1] <= 255 then mid = f[i + 1] end
    end
    if #body > limit then size = #body end
    return string.sub(body, 1, preview), mid, size, preview
  end
  if #f == 4 and f[1] == 'b' and f[3] == 'm' then return f[2], f[4], 0, size end
  return f, 0, 0, size
end
"""

#: KEYS: registry set, then streams.  ARGV: group, then queue names.
DECLARE = """
for i = 2, #KEYS do
  local ok = redis.pcall('XGROUP', 'CREATE', KEYS[i], ARGV[1], '0', 'MKSTREAM')
  if type(ok) == 'table' and ok.err and not string.find(ok.err, 'BUSYGROUP', 1, true) then
    return redis.error_reply(ok.err)
  end
end
if #ARGV > 1 then redis.call('SADD', KEYS[1], unpack(ARGV, 2)) end
return #KEYS - 1
"""

#: Publish.  KEYS: the registry, then the streams and delayed zsets written to.
#: ARGV: n, then n queue names to register; then 4 values per message: key
#: index, '' (ready: XADD) or eta (delayed: ZADD), message id or delayed
#: member, body or ''.  Returns how many messages were written.
PUBLISH = """
local n = tonumber(ARGV[1])
if n > 0 then redis.call('SADD', KEYS[1], unpack(ARGV, 2, n + 1)) end
local written = 0
for i = n + 2, #ARGV, 4 do
  if ARGV[i + 1] == '' then
    redis.call('XADD', KEYS[tonumber(ARGV[i])], '*', 'b', ARGV[i + 3], 'm', ARGV[i + 2])
  else
    redis.call('ZADD', KEYS[tonumber(ARGV[i])], ARGV[i + 1], ARGV[i + 2])
  end
  written = written + 1
end
return written
"""

#: Move due delayed messages, then read.  KEYS, per queue: its delayed zset and
#: its ten streams, priority 9 first.  ARGV: group, consumer, parking consumer,
#: count, now (epoch s), number of queues, most delayed messages moved per queue,
#: size limit, preview length, byte budget (0: none).
#: Returns {next_due, groups...}: next_due is the earliest remaining eta as a
#: string ('' when none); each group of messages from one stream is: queue
#: index (from 0), priority, n, then 5 values per message (entry id, body,
#: message id and size as ``split`` gives them, deliveries).  A delayed member that does not
#: parse goes to the queue's priority-0 stream as ``b``=member, ``e``=reason.
#: With a byte budget, new entries are read a few at a time (READ_STEP first,
#: then as many as the budget left holds at the average size read so far, plus
#: one), so what is read past the budget, and parked again, stays small while
#: small messages still come in one read.
FETCH = _CLAIMED + """
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
  out[n + 1] = id; out[n + 2] = body; out[n + 3] = mid; out[n + 4] = size; out[n + 5] = deliveries
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
"""

#: Claim entries whose lease ran out (idle >= min idle).  KEYS: streams.
#: ARGV: group, consumer, min idle (ms), count, forget consumers idle longer
#: than this (ms; 0 = don't), parking consumer, size limit, preview length.
#: Returns 6 values per message: key index (from 1), entry id, body, message
#: id and size as ``split`` gives them, deliveries.
RECLAIM = _CLAIMED + """
local group, consumer, min_idle = ARGV[1], ARGV[2], ARGV[3]
local want = tonumber(ARGV[4])
local forget_after = tonumber(ARGV[5])
local parked = ARGV[6]
local limit, preview = tonumber(ARGV[7]), tonumber(ARGV[8])
local out = {}
for i, key in ipairs(KEYS) do
  if redis.call('EXISTS', key) == 1 then
    if want > 0 then
      local pend = redis.pcall('XPENDING', key, group, 'IDLE', min_idle, '-', '+', want)
      if type(pend) == 'table' and not pend.err then
        for _, p in ipairs(pend) do
          local e = redis.call('XCLAIM', key, group, consumer, min_idle, p[1])[1]
          local f = claimed_fields(key, group, e)
          if f then
            local n = #out
            out[n + 1] = i; out[n + 2] = e[1]; out[n + 3], out[n + 4], out[n + 5] = split(f, limit, preview)
            out[n + 6] = p[4] + 1
            want = want - 1
          end
        end
      end
    end
    if forget_after > 0 then
      local consumers = redis.pcall('XINFO', 'CONSUMERS', key, group)
      if type(consumers) == 'table' and not consumers.err then
        for _, c in ipairs(consumers) do
          local info = {}
          for j = 1, #c, 2 do info[c[j]] = c[j + 1] end
          if info['pending'] == 0 and info['idle'] > forget_after
             and info['name'] ~= consumer and info['name'] ~= parked then
            redis.call('XGROUP', 'DELCONSUMER', key, group, info['name'])
          end
        end
      end
    end
  end
end
return out
"""

# Shared by the scripts that act on held entries: whether ``owner`` holds the
# entry (it is in the group's pending list under that consumer).  A stale
# holder (its lease ran out and another consumer claimed the entry) does not.
_OWNED = """
local function owned(key, group, id, owner)
  local p = redis.pcall('XPENDING', key, group, id, id, 1, owner)
  if type(p) == 'table' and not p.err and p[1] then return p[1] end
  return nil
end
"""

#: Move held entries still owned by a consumer to a target consumer: the
#: target is the owner itself (renew: resets the idle time, i.e. the lease) or
#: the parking consumer (requeue).  KEYS: streams.  ARGV: group, owner,
#: target, uncount ('1': the delivery count is lowered by one, so the next
#: hand-out counts the same delivery again; '0': unchanged), then per key: n,
#: n entry ids.  Returns how many entries moved.
TRANSFER = _OWNED + """
local group, owner, target = ARGV[1], ARGV[2], ARGV[3]
local uncount = ARGV[4] == '1'
local pos, moved = 5, 0
for _, key in ipairs(KEYS) do
  local n = tonumber(ARGV[pos])
  local args = {key, group, target, 0}
  for j = pos + 1, pos + n do
    local p = owned(key, group, ARGV[j], owner)
    if p and uncount then
      local count = math.max(0, p[4] - 1)
      moved = moved + #redis.call('XCLAIM', key, group, target, 0, ARGV[j], 'RETRYCOUNT', count, 'JUSTID')
    elseif p then
      args[#args + 1] = ARGV[j]
    end
  end
  pos = pos + n + 1
  if #args > 4 then
    args[#args + 1] = 'JUSTID'
    moved = moved + #redis.call('XCLAIM', unpack(args))
  end
end
return moved
"""

#: Acknowledge (XACK + XDEL) the entries still owned by a consumer; a stale
#: holder's ack is a no-op.  KEYS: streams.  ARGV: group, owner, then per
#: key: n, n entry ids.  Returns how many entries were removed.
ACK = _OWNED + """
local group, owner = ARGV[1], ARGV[2]
local pos, acked = 3, 0
for _, key in ipairs(KEYS) do
  local n = tonumber(ARGV[pos])
  local ids = {}
  for j = pos + 1, pos + n do
    if owned(key, group, ARGV[j], owner) then ids[#ids + 1] = ARGV[j] end
  end
  pos = pos + n + 1
  if #ids > 0 then
    redis.call('XACK', key, group, unpack(ids))
    redis.call('XDEL', key, unpack(ids))
    acked = acked + #ids
  end
end
return acked
"""

#: Move one held entry to the dead letters, if ``owner`` still holds it (else
#: a no-op returning 0).  KEYS: stream, dead stream, dead counts hash,
#: registry.  ARGV: group, entry id, queue, priority, message id, reason, now,
#: body, owner.
DEAD_LETTER = _OWNED + """
if not owned(KEYS[1], ARGV[1], ARGV[2], ARGV[9]) then return 0 end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
redis.call('XADD', KEYS[2], '*', 'q', ARGV[3], 'p', ARGV[4], 'm', ARGV[5], 'r', ARGV[6],
           't', ARGV[7], 'b', ARGV[8])
redis.call('HINCRBY', KEYS[3], ARGV[3], 1)
redis.call('SADD', KEYS[4], ARGV[3])
return 1
"""

#: Publish dead letters back to their queue's stream with a fresh delivery
#: count.  KEYS: dead stream, dead counts hash.  ARGV: key prefix, then
#: either dead ids, or '>' and where to scan from (an XRANGE start): the next
#: 500 dead letters.  A dead letter without a queue, a priority digit, a body
#: or a message id (written by hand) stays where it is.  Returns {how many
#: moved, the last id scanned when the scan may go on, else ''}.
DLQ_REQUEUE = """
local ids, last = {}, ''
if ARGV[2] == '>' then
  local batch = redis.call('XRANGE', KEYS[1], ARGV[3], '+', 'COUNT', 500)
  for _, e in ipairs(batch) do ids[#ids + 1] = e[1] end
  if #batch == 500 then last = ids[500] end
else
  for i = 2, #ARGV do ids[#ids + 1] = ARGV[i] end
end
local moved = 0
for _, id in ipairs(ids) do
  local found = redis.call('XRANGE', KEYS[1], id, id)
  if found[1] then
    local info = {}
    local f = found[1][2]
    for j = 1, #f, 2 do info[f[j]] = f[j + 1] end
    local p = info['p']
    if info['q'] and info['b'] and info['m'] and p and #p == 1 and string.find('0123456789', p, 1, true) then
      redis.call('XADD', ARGV[1] .. ':q:' .. info['q'] .. ':' .. p, '*', 'b', info['b'], 'm', info['m'])
      redis.call('XDEL', KEYS[1], id)
      if redis.call('HINCRBY', KEYS[2], info['q'], -1) <= 0 then redis.call('HDEL', KEYS[2], info['q']) end
      moved = moved + 1
    end
  end
end
return {moved, last}
"""

#: The first ARGV[2] dead letters of stream KEYS[1] from ARGV[1] (an XRANGE
#: start), one entry read at a time, each field 'b' (the body) cut to its
#: first ARGV[3] bytes: a listing never sends big bodies whole.  Returns
#: XRANGE's shape: {{id, {field, value, ...}}, ...}.
DLQ_PREVIEW = """
local out, start = {}, ARGV[1]
local n = tonumber(ARGV[3])
for _ = 1, tonumber(ARGV[2]) do
  local found = redis.call('XRANGE', KEYS[1], start, '+', 'COUNT', 1)
  if not found[1] then break end
  local f = found[1][2]
  for j = 1, #f, 2 do
    if f[j] == 'b' then f[j + 1] = string.sub(f[j + 1], 1, n) end
  end
  out[#out + 1] = found[1]
  start = '(' .. found[1][1]
end
return out
"""

#: KEYS, per queue: its ten streams then its delayed zset; last, the dead
#: counts hash.  ARGV: group, parking consumer, then queue names.  Returns 4
#: values per queue: ready, delayed, held, dead.
STATS = """
local group, parked = ARGV[1], ARGV[2]
local out = {}
for q = 0, #ARGV - 3 do
  local base = q * 11
  local ready, held = 0, 0
  for b = 1, 10 do
    local key = KEYS[base + b]
    local len = redis.call('XLEN', key)
    if len > 0 then
      local pending, back = 0, 0
      local s = redis.pcall('XPENDING', key, group)
      if type(s) == 'table' and not s.err then
        pending = s[1]
        if s[4] then
          for _, c in ipairs(s[4]) do if c[1] == parked then back = tonumber(c[2]) end end
        end
      end
      ready = ready + len - pending + back
      held = held + pending - back
    end
  end
  local n = #out
  out[n + 1] = ready
  out[n + 2] = redis.call('ZCARD', KEYS[base + 11])
  out[n + 3] = held
  out[n + 4] = tonumber(redis.call('HGET', KEYS[#KEYS], ARGV[q + 3]) or '0')
end
return out
"""

#: Delete up to ``limit`` ready messages (new and requeued, not held ones) and
#: every delayed one.  KEYS: the queue's ten streams, then its delayed zset.
#: ARGV: group, parking consumer, limit.  Returns {deleted, 1 if more remain}.
PURGE = """
local group, parked = ARGV[1], ARGV[2]
local left = tonumber(ARGV[3])
local deleted = 0
local function drop(key, ids)
  if #ids > 0 then
    redis.call('XACK', key, group, unpack(ids))
    redis.call('XDEL', key, unpack(ids))
    deleted = deleted + #ids
    left = left - #ids
  end
end
for b = 1, 10 do
  local key = KEYS[b]
  if left > 0 and redis.call('XLEN', key) > 0 then
    local back = redis.pcall('XPENDING', key, group, '-', '+', left, parked)
    if type(back) == 'table' and back.err then
      redis.call('XGROUP', 'CREATE', key, group, '0')
      back = {}
    end
    local ids = {}
    for i, p in ipairs(back) do ids[i] = p[1] end
    drop(key, ids)
    if left > 0 then
      local r = redis.call('XREADGROUP', 'GROUP', group, '~purge', 'COUNT', left, 'STREAMS', key, '>')
      ids = {}
      if r then for i, e in ipairs(r[1][2]) do ids[i] = e[1] end end
      drop(key, ids)
      redis.call('XGROUP', 'DELCONSUMER', key, group, '~purge')
    end
  end
end
if left <= 0 then return {deleted, 1} end
deleted = deleted + redis.call('ZCARD', KEYS[11])
redis.call('DEL', KEYS[11])
return {deleted, 0}
"""
