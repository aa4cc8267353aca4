-- PURGE: delete up to limit ready messages (new and requeued, not held ones) and
-- every delayed one.  KEYS: the queue's ten streams, then its delayed zset.
-- ARGV: group, parking consumer, limit.  Returns {deleted, 1 if more remain}.

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
