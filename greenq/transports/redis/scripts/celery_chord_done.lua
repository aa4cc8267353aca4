-- CELERY_CHORD_DONE (celery_results.py).  The body of a Celery chord was sent (or its failure
-- stored): while KEYS[5] (.c) still holds this sender's claim, delete the chord's counting keys
-- and mark it done, so a member run again later neither counts nor sends the body again.
-- KEYS: .j, .t, .s, .d, .c.  ARGV: claim token, how long the done mark lives (s).
-- Reply: 1 when cleaned up, 0 when the claim was lost (the keys are left to expire).

if redis.call('GET', KEYS[5]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4])
redis.call('SET', KEYS[5], 'done', 'EX', tonumber(ARGV[2]))
return 1
