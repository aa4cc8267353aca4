-- Coordination: replace a record (a hash, P:<name>) if it is what the writer read.
-- KEYS: the record.  ARGV: ttl (ms; 0: none), n, then n expected field/value
-- pairs, then the new record's field/value pairs (none: delete it).
-- A key of another type counts as an empty record.  Returns 1 when written, else 0.
local current, count = {}, 0
if redis.call('TYPE', KEYS[1]).ok == 'hash' then
  local flat = redis.call('HGETALL', KEYS[1])
  for i = 1, #flat, 2 do
    current[flat[i]] = flat[i + 1]
    count = count + 1
  end
end
local n = tonumber(ARGV[2])
if n ~= count then return 0 end
for i = 0, n - 1 do
  if current[ARGV[3 + 2 * i]] ~= ARGV[4 + 2 * i] then return 0 end
end
redis.call('DEL', KEYS[1])
local first = 3 + 2 * n
if #ARGV >= first then
  redis.call('HSET', KEYS[1], unpack(ARGV, first))
  if tonumber(ARGV[1]) > 0 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
end
return 1
