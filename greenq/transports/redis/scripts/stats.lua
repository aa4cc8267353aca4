-- STATS.  KEYS, per queue: its ten streams then its delayed zset; last, the
-- dead counts hash.  ARGV: group, parking consumer, now (epoch s, the clock
-- delayed scores are written in), then queue names.  Returns 5 values per
-- queue: ready, delayed, held, dead, and the age in ms of the oldest ready
-- message.  Ready: entries not yet delivered to the group, entries parked on
-- the parking consumer (requeued) and delayed members already due (moved by
-- the next fetch).  Age: from a new entry's id (its XADD, Redis's clock), a
-- parked entry's idle time (since it was parked) or a due member's eta.

local group, parked = ARGV[1], ARGV[2]
local now = tonumber(ARGV[3])
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {}
local function id_ms(id)
  return tonumber(string.match(id, '^(%d+)-')) or now_ms
end
for q = 0, #ARGV - 4 do
  local base = q * 11
  local ready, held, age = 0, 0, 0
  for b = 1, 10 do
    local key = KEYS[base + b]
    local len = redis.call('XLEN', key)
    if len > 0 then
      local pending, back = 0, 0
      local last = nil
      local s = redis.pcall('XPENDING', key, group)
      if type(s) == 'table' and not s.err then
        pending = s[1]
        if s[4] then
          for _, c in ipairs(s[4]) do if c[1] == parked then back = tonumber(c[2]) end end
        end
        local groups = redis.call('XINFO', 'GROUPS', key)
        for _, g in ipairs(groups) do
          local name, delivered = nil, nil
          for i = 1, #g, 2 do
            if g[i] == 'name' then name = g[i + 1] elseif g[i] == 'last-delivered-id' then delivered = g[i + 1] end
          end
          if name == group then last = delivered end
        end
      end
      ready = ready + len - pending + back
      held = held + pending - back
      -- the first entry the group has not been given (all of them without a group)
      local first = redis.call('XRANGE', key, last or '-', '+', 'COUNT', 2)
      for _, e in ipairs(first) do
        if e[1] ~= last then
          age = math.max(age, now_ms - id_ms(e[1]))
          break
        end
      end
      if back > 0 then  -- (the idlest of the first 100 by id)
        local p = redis.call('XPENDING', key, group, '-', '+', math.min(back, 100), parked)
        for _, e in ipairs(p) do age = math.max(age, tonumber(e[3])) end
      end
    end
  end
  local dkey = KEYS[base + 11]
  local due = redis.call('ZCOUNT', dkey, '-inf', ARGV[3])
  if due > 0 then
    local head = redis.call('ZRANGE', dkey, 0, 0, 'WITHSCORES')
    age = math.max(age, math.floor((now - tonumber(head[2])) * 1000))
  end
  local n = #out
  out[n + 1] = ready + due
  out[n + 2] = redis.call('ZCARD', dkey) - due
  out[n + 3] = held
  out[n + 4] = tonumber(redis.call('HGET', KEYS[#KEYS], ARGV[q + 4]) or '0')
  out[n + 5] = math.max(0, age)
end
return out
