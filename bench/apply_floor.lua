-- The floor of a "thin" apply, for `bench/apply_cost.py --script bench/apply_floor.lua`:
-- per entry, read the fence and write the fields apply.lua writes for a catch-up entry
-- (a row and its location, totals, two counters, two buckets), then index the changes.
-- Nothing is worked out here: the values are fixed, as skusync would send them.
if redis.call('EXISTS', KEYS[1]) == 0 then return redis.error_reply('x') end
local ch = {}
for i = 2, #KEYS - 2 do
  local k = KEYS[i]
  local v = redis.call('HMGET', k, 'lsn', 'piece')
  -- (the fence fields under other names: apply.lua runs on the same hashes in between)
  redis.call('HSET', k, 'floor_lsn', ARGV[4], 'floor_piece', '0', 'ts', '1796054937663',
    'r:16:public.inventory:8:SKU-12344:WH-1', '["WH-1","999983","0"]',
    'loc:WH-1:on_hand', '999983', 'loc:WH-1:reserved', '0', 'loc:WH-1:rows', '1',
    'rows', '1', 'on_hand', '999983', 'reserved', '0', 'available', '999983',
    'purchases', '123', 'views', '456', 'w:purchases:29938000', '3', 'w:views:29938000', '3')
  ch[#ch + 1] = ARGV[4]; ch[#ch + 1] = k
end
redis.call('ZADD', KEYS[#KEYS - 1], 'GT', unpack(ch))
return {0, 0, 0}
