-- SETTLE (celery_broker.py).  KEYS: unacked, unacked_index, dead stream, dead counts, queue registry.
-- ARGV: action (ack|renew|requeue|unstarted|dead), consumer, held prefix, count
-- prefix, lease ms, score, now, then per message: tag, list key, queue, element,
-- reason.  Acts only on messages this consumer holds; reply: how many.

local action, consumer, held, counted = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local lease, score, now = ARGV[5], ARGV[6], ARGV[7]
local done = 0
for i = 8, #ARGV, 5 do
  local tag, list, queue, item, reason = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4]
  if redis.call('GET', held .. tag) == consumer then
    done = done + 1
    if action == 'renew' then
      redis.call('PEXPIRE', held .. tag, lease)
      redis.call('ZADD', KEYS[2], 'XX', score, tag)
    else
      redis.call('ZREM', KEYS[2], tag)
      redis.call('HDEL', KEYS[1], tag)
      redis.call('DEL', held .. tag)
      if action == 'ack' or action == 'dead' then
        redis.call('DEL', counted .. tag)
      end
      if action == 'unstarted' then
        if redis.call('DECR', counted .. tag) <= 0 then redis.call('DEL', counted .. tag) end
      end
      if action == 'requeue' or action == 'unstarted' then
        redis.call('RPUSH', list, item)
      end
      if action == 'dead' then
        redis.call('XADD', KEYS[3], '*', 'q', queue, 'p', 0, 'm', tag, 'r', reason, 't', now, 'b', item)
        redis.call('HINCRBY', KEYS[4], queue, 1)
        redis.call('SADD', KEYS[5], queue)
      end
    end
  end
end
return done
