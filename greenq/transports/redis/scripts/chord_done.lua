-- Chord members done (greenq/transports/redis/results.py RedisBackend.chord_members_done):
-- for each member, in one atomic step, store its result (as STORE in results.py
-- does), add it to its chord's member set (as coordination_add_once.lua does)
-- and, when asked to decide, claim the chord for it if the set is full and the
-- chord's state names no completer yet (what ResultBackend.chord_member_done
-- does with a read and a compare-and-set).
-- KEYS: per member, four: its result (P:result:<id>), its waiters
--       (P:waiters:<id>), the chord's member set (P:chord:<group id>) and
--       state record (P:chordstate:<group id>, a hash: completer, sent).
-- ARGV: result expiry (s; 0: none), set and state ttl (ms; 0: none),
--       decide (1: claim here; 0: only count, the caller decides: with a
--       signing key, the set's members must be checked first), then per
--       member, four: its id, its stored value ('F' or 'P' + the record;
--       empty: not stored here), the member as kept in the set, the chord's size.
-- A set or state of another type is replaced / counts as empty.
-- Returns per member {1 when added else 0, members counted, decision}: the
-- decision is 1 when this member completes the chord (again, until the
-- chord is marked sent), else 0 (and always 0 when not deciding).
local ex, ttl, decide = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3] == '1'
local out = {}
for i = 0, #KEYS / 4 - 1 do
  local result, waiters, set, state = KEYS[4 * i + 1], KEYS[4 * i + 2], KEYS[4 * i + 3], KEYS[4 * i + 4]
  local id, value, member, size = ARGV[4 * i + 4], ARGV[4 * i + 5], ARGV[4 * i + 6], tonumber(ARGV[4 * i + 7])
  if value ~= '' then
    if ex > 0 then
      redis.call('SET', result, value, 'EX', ex)
    else
      redis.call('SET', result, value)
    end
    if string.byte(value, 1) == 70 then  -- 'F': final
      local channels = redis.call('SMEMBERS', waiters)
      if #channels > 0 then
        for _, channel in ipairs(channels) do redis.call('PUBLISH', channel, id) end
        redis.call('DEL', waiters)
      end
    end
  end
  local kind = redis.call('TYPE', set).ok
  if kind ~= 'set' and kind ~= 'none' then redis.call('DEL', set) end
  local added = redis.call('SADD', set, member)
  if ttl > 0 then redis.call('PEXPIRE', set, ttl) end
  local count = redis.call('SCARD', set)
  local decision = 0
  if decide and count >= size then
    kind = redis.call('TYPE', state).ok
    if kind ~= 'hash' and kind ~= 'none' then redis.call('DEL', state) end
    local sent = redis.call('HGET', state, 'sent')
    local completer = redis.call('HGET', state, 'completer')
    if sent and sent ~= '' then
      decision = 0
    elseif completer then
      if completer == id then decision = 1 end
    else
      redis.call('HSET', state, 'completer', id)
      if ttl > 0 then redis.call('PEXPIRE', state, ttl) end
      decision = 1
    end
  end
  out[#out + 1] = {added, count, decision}
end
return out
