-- Coordination: take one place of a counted lease (greenq/transports/redis/coordination.py).
-- KEYS: the lease's place keys, P:<name> then P:<name>:1 ... P:<name>:<limit-1>;
--       each a string holding its holder's id, with an expiry (PX).
-- ARGV: holder, ttl (ms), the longest plausible expiry (ms: ttl + clock slack).
-- A place that is not a string, has no expiry or expires later than that was
-- not written by a holder's renewal: it counts as free.  A holder that has a
-- place keeps it (renewed).  Returns the place's index (1-based), or 0: full.
local free = nil
for i, key in ipairs(KEYS) do
  local kind = redis.call('TYPE', key).ok
  if kind ~= 'none' then
    local left = redis.call('PTTL', key)
    if kind ~= 'string' or left < 0 or left > tonumber(ARGV[3]) then
      redis.call('DEL', key)
      kind = 'none'
    elseif redis.call('GET', key) == ARGV[1] then
      redis.call('PEXPIRE', key, ARGV[2])
      return i
    end
  end
  if kind == 'none' and not free then free = i end
end
if free then
  redis.call('SET', KEYS[free], ARGV[1], 'PX', ARGV[2])
  return free
end
return 0
