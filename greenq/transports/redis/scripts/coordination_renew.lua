-- Coordination: renew (or release) a holder's place of a counted lease.
-- KEYS: the place keys where the holder may be (the one it took, when known).
-- ARGV: holder, ttl (ms; 0: release the place).
-- Returns the place's index (1-based), or 0 when the holder has none.
for i, key in ipairs(KEYS) do
  if redis.call('TYPE', key).ok == 'string' and redis.call('GET', key) == ARGV[1] then
    if tonumber(ARGV[2]) > 0 then
      redis.call('PEXPIRE', key, ARGV[2])
    else
      redis.call('DEL', key)
    end
    return i
  end
end
return 0
