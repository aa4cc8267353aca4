-- Shared by TRANSFER, ACK and DEAD_LETTER (the loader puts it before them).
-- owned(key, group, id, owner): whether owner holds the entry (it is in the
-- group's pending list under that consumer).  A stale holder (its lease ran out
-- and another consumer claimed the entry) does not.

local function owned(key, group, id, owner)
  local p = redis.pcall('XPENDING', key, group, id, id, 1, owner)
  if type(p) == 'table' and not p.err and p[1] then return p[1] end
  return nil
end
