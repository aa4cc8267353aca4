-- DLQ_REQUEUE: publish dead letters back to their queue's stream with a fresh
-- delivery count.  KEYS: dead stream, dead counts hash.  ARGV: key prefix, then
-- either dead ids, or '>' and where to scan from (an XRANGE start): the next 500
-- dead letters.  A dead letter without a queue, a priority digit, a body or a
-- message id (written by hand) stays where it is.  Returns {how many moved, the
-- last id scanned when the scan may go on, else ''}.

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
