-- ACK (after owned.lua): acknowledge (XACK + XDEL) the entries still owned by a
-- consumer; a stale holder's ack is a no-op.  KEYS: streams.  ARGV: group,
-- owner, then per key: n, n entry ids.  Returns how many entries were removed.

local group, owner = ARGV[1], ARGV[2]
local pos, acked = 3, 0
for _, key in ipairs(KEYS) do
  local n = tonumber(ARGV[pos])
  local ids = {}
  for j = pos + 1, pos + n do
    if owned(key, group, ARGV[j], owner) then ids[#ids + 1] = ARGV[j] end
  end
  pos = pos + n + 1
  if #ids > 0 then
    redis.call('XACK', key, group, unpack(ids))
    redis.call('XDEL', key, unpack(ids))
    acked = acked + #ids
  end
end
return acked
