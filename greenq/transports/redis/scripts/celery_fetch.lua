-- FETCH (celery_broker.py).  KEYS: unacked, unacked_index, dead stream, dead counts, queue registry,
-- then the lists.  ARGV: count, score, max_bytes (0: none), body limit, held
-- prefix, count prefix, count ttl, now, preview, consumer, lease ms, then the
-- queue of each list.  Reply: {bad, {list index, tag, element, deliveries}...}

local count, score, maxb, limit = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local held, counted, ttl, now, preview = ARGV[5], ARGV[6], ARGV[7], ARGV[8], tonumber(ARGV[9])
local consumer, lease = ARGV[10], ARGV[11]
local out, bad, taken, bytes = {}, 0, 0, 0
for i = 6, #KEYS do
  local queue = ARGV[6 + i]
  while taken < count do
    local item = redis.call('LINDEX', KEYS[i], -1)
    if not item then break end
    if taken > 0 and maxb > 0 and bytes + #item > maxb then return {bad, out} end
    redis.call('RPOP', KEYS[i])
    local reason, tag, ex, rk = nil, nil, nil, nil
    if #item > limit then
      reason = 'message is ' .. #item .. ' bytes, over max_message_size (not read; the dead letter keeps its first '
               .. preview .. ' bytes)'
      item = string.sub(item, 1, preview)
    else
      local ok, el = pcall(cjson.decode, item)
      if ok and type(el) == 'table' and type(el.properties) == 'table' then
        tag = el.properties.delivery_tag
        local di = el.properties.delivery_info
        if type(di) == 'table' then ex, rk = di.exchange, di.routing_key end
      end
      if type(tag) ~= 'string' or tag == '' then
        reason = 'not a kombu message: ' .. (ok and 'no properties.delivery_tag' or 'not JSON')
      end
    end
    if reason then
      redis.call('XADD', KEYS[3], '*', 'q', queue, 'p', 0, 'm', '', 'r', reason, 't', now, 'b', item)
      redis.call('HINCRBY', KEYS[4], queue, 1)
      redis.call('SADD', KEYS[5], queue)
      bad = bad + 1
    else
      if type(ex) ~= 'string' then ex = '' end
      if type(rk) ~= 'string' then rk = queue end
      redis.call('HSET', KEYS[1], tag, '[' .. item .. ',' .. cjson.encode(ex) .. ',' .. cjson.encode(rk) .. ']')
      redis.call('ZADD', KEYS[2], score, tag)
      redis.call('SET', held .. tag, consumer, 'PX', lease)
      local n = redis.call('INCR', counted .. tag)
      redis.call('EXPIRE', counted .. tag, ttl)
      out[#out + 1] = {i - 5, tag, item, n}
      taken = taken + 1
      bytes = bytes + #item
    end
  end
end
return {bad, out}
