-- CELERY_CHORD_PART (celery_results.py).  Counts finished members of Celery chords the way
-- Celery's Redis backend does, so Celery workers and greenq workers can share one chord.
-- KEYS, five per member: the chord's .j (results, sorted set), .t (members added later),
-- .s (size), .d (members counted), .c (the claim of who sends the body).
-- ARGV: expiry (s, 0: none), claim lifetime (s), then per member: its id, its score
-- (group_index, or +inf), its entry, a claim token.
-- Reply, per member: {entries counted (-1: the chord is done already), the chord's total
-- (0: size unknown), 1 when this member claimed the body, else 0}.
-- A member counts once however often it runs (.d holds id:score); the member that finds
-- every entry in and sets the claim first (SET NX) sends the body; the same token finds
-- its own claim again (a sender retrying after an error).

local expires, claim_for = tonumber(ARGV[1]), tonumber(ARGV[2])
local out = {}
for i = 0, #KEYS / 5 - 1 do
  local j, t, s, d, c = KEYS[5 * i + 1], KEYS[5 * i + 2], KEYS[5 * i + 3], KEYS[5 * i + 4], KEYS[5 * i + 5]
  local member, score, entry, token = ARGV[4 * i + 3], ARGV[4 * i + 4], ARGV[4 * i + 5], ARGV[4 * i + 6]
  if redis.call('GET', c) == 'done' then
    out[#out + 1] = {-1, 0, 0}
  else
    if redis.call('SADD', d, member .. ':' .. score) == 1 then
      redis.call('ZADD', j, score, entry)
    end
    if expires > 0 then
      for _, key in ipairs({j, t, s, d}) do redis.call('EXPIRE', key, expires) end
    end
    local count = redis.call('ZCARD', j)
    local size = tonumber(redis.call('GET', s) or '')
    local total = 0
    local claimed = 0
    if size then
      total = size + (tonumber(redis.call('GET', t) or '0') or 0)
      if count == total then
        if redis.call('GET', c) == token or redis.call('SET', c, token, 'NX', 'EX', claim_for) then
          claimed = 1          -- this sender's claim (its own again when it retries)
        end
      end
    end
    out[#out + 1] = {count, total, claimed}
  end
end
return out
