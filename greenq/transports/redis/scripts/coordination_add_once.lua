-- Coordination: add a member to a set and count it, atomically.
-- KEYS: the set (P:<name>).  ARGV: member, ttl (ms; 0: none).
-- A key of another type is replaced.  Returns {1 when added else 0, members}.
local kind = redis.call('TYPE', KEYS[1]).ok
if kind ~= 'set' and kind ~= 'none' then redis.call('DEL', KEYS[1]) end
local added = redis.call('SADD', KEYS[1], ARGV[1])
if tonumber(ARGV[2]) > 0 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return {added, redis.call('SCARD', KEYS[1])}
