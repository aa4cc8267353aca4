-- STATS.  KEYS, per queue: its ten streams then its delayed zset; last, the
-- dead counts hash.  ARGV: group, parking consumer, then queue names.  Returns 4
-- values per queue: ready, delayed, held, dead.

local group, parked = ARGV[1], ARGV[2]
local out = {}
for q = 0, #ARGV - 3 do
  local base = q * 11
  local ready, held = 0, 0
  for b = 1, 10 do
    local key = KEYS[base + b]
    local len = redis.call('XLEN', key)
    if len > 0 then
      local pending, back = 0, 0
      local s = redis.pcall('XPENDING', key, group)
      if type(s) == 'table' and not s.err then
        pending = s[1]
        if s[4] then
          for _, c in ipairs(s[4]) do if c[1] == parked then back = tonumber(c[2]) end end
        end
      end
      ready = ready + len - pending + back
      held = held + pending - back
    end
  end
  local n = #out
  out[n + 1] = ready
  out[n + 2] = redis.call('ZCARD', KEYS[base + 11])
  out[n + 3] = held
  out[n + 4] = tonumber(redis.call('HGET', KEYS[#KEYS], ARGV[q + 3]) or '0')
end
return out
