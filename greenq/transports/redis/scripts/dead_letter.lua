-- DEAD_LETTER (after owned.lua): move one held entry to the dead letters, if
-- owner still holds it (else a no-op returning 0).  KEYS: stream, dead stream,
-- dead counts hash, registry.  ARGV: group, entry id, queue, priority, message
-- id, reason, now, body, owner.

if not owned(KEYS[1], ARGV[1], ARGV[2], ARGV[9]) then return 0 end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
redis.call('XADD', KEYS[2], '*', 'q', ARGV[3], 'p', ARGV[4], 'm', ARGV[5], 'r', ARGV[6],
           't', ARGV[7], 'b', ARGV[8])
redis.call('HINCRBY', KEYS[3], ARGV[3], 1)
redis.call('SADD', KEYS[4], ARGV[3])
return 1
