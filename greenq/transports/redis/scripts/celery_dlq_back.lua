-- DLQ_BACK (celery_broker.py).  KEYS: dead stream, dead counts.  ARGV: dead letter id, the list to
-- push it on.  Reply: 1 when moved.

local found = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1])
if not found[1] then return 0 end
local f, info = found[1][2], {}
for j = 1, #f, 2 do info[f[j]] = f[j + 1] end
if not info['q'] or not info['b'] then return 0 end
redis.call('LPUSH', ARGV[2], info['b'])
redis.call('XDEL', KEYS[1], ARGV[1])
if redis.call('HINCRBY', KEYS[2], info['q'], -1) <= 0 then redis.call('HDEL', KEYS[2], info['q']) end
return 1
