-- Shared by FETCH and RECLAIM (the loader puts it before them).
-- claimed_fields(key, group, e): the fields of a claimed entry, or nil when the
-- entry was deleted while pending (its pending entry is dropped).
-- split(f, limit, preview): body, message id and size of an entry.  Size 0: the
-- entry is within limit; one of the shape greenq writes (b, then m) comes as its
-- body and message id, any other as its whole field list and 0, for the Python
-- side to check (entry_delivery in broker.py).  Size > 0: the entry is over
-- limit: the first preview bytes of its b field (or of its first value), its m
-- field when it is a short one (else 0), and its size (the body's, when the body
-- alone is over).  A fourth value says how many bytes the reply carries (the
-- entry's size, or the preview's).

local function claimed_fields(key, group, e)
  if type(e) ~= 'table' then return nil end
  if type(e[2]) ~= 'table' then
    redis.call('XACK', key, group, e[1])
    return nil
  end
  return e[2]
end
local function split(f, limit, preview)
  if #f == 4 and f[1] == 'b' and f[3] == 'm' then
    local size = #f[2] + #f[4]
    if size <= limit then return f[2], f[4], 0, size end
  end
  local size = 0
  for i = 2, #f, 2 do size = size + #f[i] end
  if size > limit then
    local body, mid = f[2] or '', 0
    for i = 1, #f - 1, 2 do
      if f[i] == 'b' then body = f[i + 1] elseif f[i] == 'm' and #f[i + 1] <= 255 then mid = f[i + 1] end
    end
    if #body > limit then size = #body end
    return string.sub(body, 1, preview), mid, size, preview
  end
  if #f == 4 and f[1] == 'b' and f[3] == 'm' then return f[2], f[4], 0, size end
  return f, 0, 0, size
end
