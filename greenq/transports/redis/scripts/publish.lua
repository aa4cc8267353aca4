-- PUBLISH.  KEYS: the registry, then the streams and delayed zsets written to.
-- ARGV: n, then n queue names to register; then 4 values per message: key
-- index, '' (ready: XADD) or eta (delayed: ZADD), message id or delayed member,
-- body or ''.  Returns how many messages were written.  The arguments are made
-- by publish_calls in broker.py (broker_cluster.py for a cluster).

local n = tonumber(ARGV[1])
if n > 0 then redis.call('SADD', KEYS[1], unpack(ARGV, 2, n + 1)) end
local written = 0
for i = n + 2, #ARGV, 4 do
  if ARGV[i + 1] == '' then
    redis.call('XADD', KEYS[tonumber(ARGV[i])], '*', 'b', ARGV[i + 3], 'm', ARGV[i + 2])
  else
    redis.call('ZADD', KEYS[tonumber(ARGV[i])], ARGV[i + 1], ARGV[i + 2])
  end
  written = written + 1
end
return written
