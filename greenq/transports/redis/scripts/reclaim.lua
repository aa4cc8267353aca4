-- RECLAIM (after claimed.lua): claim entries whose lease ran out (idle >= min
-- idle).  KEYS: streams.  ARGV: group, consumer, min idle (ms), count, forget
-- consumers idle longer than this (ms; 0 = don't), parking consumer, size
-- limit, preview length.  Returns 6 values per message: key index (from 1),
-- entry id, body, message id and size as split gives them, deliveries.

local group, consumer, min_idle = ARGV[1], ARGV[2], ARGV[3]
local want = tonumber(ARGV[4])
local forget_after = tonumber(ARGV[5])
local parked = ARGV[6]
local limit, preview = tonumber(ARGV[7]), tonumber(ARGV[8])
local out = {}
for i, key in ipairs(KEYS) do
  if redis.call('EXISTS', key) == 1 then
    if want > 0 then
      local pend = redis.pcall('XPENDING', key, group, 'IDLE', min_idle, '-', '+', want)
      if type(pend) == 'table' and not pend.err then
        for _, p in ipairs(pend) do
          local e = redis.call('XCLAIM', key, group, consumer, min_idle, p[1])[1]
          local f = claimed_fields(key, group, e)
          if f then
            local n = #out
            out[n + 1] = i; out[n + 2] = e[1]; out[n + 3], out[n + 4], out[n + 5] = split(f, limit, preview)
            out[n + 6] = p[4] + 1
            want = want - 1
          end
        end
      end
    end
    if forget_after > 0 then
      local consumers = redis.pcall('XINFO', 'CONSUMERS', key, group)
      if type(consumers) == 'table' and not consumers.err then
        for _, c in ipairs(consumers) do
          local info = {}
          for j = 1, #c, 2 do info[c[j]] = c[j + 1] end
          if info['pending'] == 0 and info['idle'] > forget_after
             and info['name'] ~= consumer and info['name'] ~= parked then
            redis.call('XGROUP', 'DELCONSUMER', key, group, info['name'])
          end
        end
      end
    end
  end
end
return out
