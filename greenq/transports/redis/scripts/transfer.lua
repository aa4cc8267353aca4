-- TRANSFER (after owned.lua): move held entries still owned by a consumer to a
-- target consumer: the target is the owner itself (renew: resets the idle time,
-- i.e. the lease) or the parking consumer (requeue).  KEYS: streams.  ARGV:
-- group, owner, target, uncount ('1': the delivery count is lowered by one, so
-- the next hand-out counts the same delivery again; '0': unchanged), then per
-- key: n, n entry ids.  Returns how many entries moved.

local group, owner, target = ARGV[1], ARGV[2], ARGV[3]
local uncount = ARGV[4] == '1'
local pos, moved = 5, 0
for _, key in ipairs(KEYS) do
  local n = tonumber(ARGV[pos])
  local args = {key, group, target, 0}
  for j = pos + 1, pos + n do
    local p = owned(key, group, ARGV[j], owner)
    if p and uncount then
      local count = math.max(0, p[4] - 1)
      moved = moved + #redis.call('XCLAIM', key, group, target, 0, ARGV[j], 'RETRYCOUNT', count, 'JUSTID')
    elseif p then
      args[#args + 1] = ARGV[j]
    end
  end
  pos = pos + n + 1
  if #args > 4 then
    args[#args + 1] = 'JUSTID'
    moved = moved + #redis.call('XCLAIM', unpack(args))
  end
end
return moved
