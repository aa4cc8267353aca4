-- DLQ_BACK (Redis Cluster only, broker_cluster.py): put dead letters back on
-- their queue.  KEYS: the queue's dead stream, its dead counts hash, then its ten
-- streams, priority 9 first.  ARGV: queue name, then dead entry ids (none: the
-- oldest 500).  Returns how many moved.

local ids = {}
if #ARGV > 1 then
  for i = 2, #ARGV do ids[#ids + 1] = ARGV[i] end
else
  for _, e in ipairs(redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 500)) do ids[#ids + 1] = e[1] end
end
local moved = 0
for _, id in ipairs(ids) do
  local found = redis.call('XRANGE', KEYS[1], id, id)
  if found[1] then
    local info = {}
    local f = found[1][2]
    for j = 1, #f, 2 do info[f[j]] = f[j + 1] end
    redis.call('XADD', KEYS[12 - tonumber(info['p'])], '*', 'b', info['b'], 'm', info['m'])
    redis.call('XDEL', KEYS[1], id)
    if redis.call('HINCRBY', KEYS[2], ARGV[1], -1) <= 0 then redis.call('HDEL', KEYS[2], ARGV[1]) end
    moved = moved + 1
  end
end
return moved
