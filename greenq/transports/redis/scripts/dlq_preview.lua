-- DLQ_PREVIEW: the first ARGV[2] dead letters of stream KEYS[1] from ARGV[1] (an
-- XRANGE start), one entry read at a time, each field 'b' (the body) cut to its
-- first ARGV[3] bytes: a listing never sends big bodies whole.  Returns XRANGE's
-- shape: {{id, {field, value, ...}}, ...}.

local out, start = {}, ARGV[1]
local n = tonumber(ARGV[3])
for _ = 1, tonumber(ARGV[2]) do
  local found = redis.call('XRANGE', KEYS[1], start, '+', 'COUNT', 1)
  if not found[1] then break end
  local f = found[1][2]
  for j = 1, #f, 2 do
    if f[j] == 'b' then f[j + 1] = string.sub(f[j + 1], 1, n) end
  end
  out[#out + 1] = found[1]
  start = '(' .. found[1][1]
end
return out
