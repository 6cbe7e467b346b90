-- skusync thin apply: writes entries worked out by skusync (sinks/redis/thin.rs),
-- each only if its SKU hash still holds the fence skusync read.
--
-- KEYS[1] = meta hash; KEYS[2..n-1] = SKU hashes; KEYS[n] = the change index. On a Redis
-- Cluster (cluster = '1') every key is in one slot: KEYS[1] is the slot's meta copy,
-- then the SKU hashes, then the distinct-user keys the entries write (declared for the
-- cluster's routing only), and the caller indexes the changes (another slot).
-- ARGV: end LSN ('' for none; on a cluster the slot's mark), writer token ('' unfenced),
-- floor LSN ('' unchecked), cluster ('1'|'0'), then per entry: k (key index), expected
-- lsn, expected piece ('' where the read found none), new lsn, nset, (field, value)...,
-- ndel, field..., nkeyargs, then the SKU's distinct-user keys (suffixes to the SKU
-- key, so in its slot), nkeyargs arguments of: 'd' suffix (DEL), 'p' suffix n id...
-- (PFADD), 'e' suffix unix-seconds (EXPIREAT).
-- An entry whose hash holds another fence is not written: its position (0-based) is
-- returned, and skusync applies it with the apply script. `end` is recorded only when
-- every entry was written. Reply: {written, {missed position...}}.

-- The floor argument: an LSN ('' unchecked), or on a standalone Redis 'LSN|last|this',
-- the numbers of the writer's last call that returned ('' none) and of this call.
local batch_end, writer = ARGV[1], ARGV[2]
local floor, chain_last, chain_this = string.match(ARGV[3], '^([^|]*)|?([^|]*)|?([^|]*)$')
local cluster = ARGV[4] == '1'

local function lsn_lt(a, b)
  if #a ~= #b then return #a < #b end
  return a < b
end

local function no_meta()
  return redis.error_reply('SKUSYNC_NOMETA meta hash missing: Redis lost its data; a resync is needed')
end

-- The writer fence, as in apply.lua. A missing meta hash has no writer either, so the
-- common case reads the meta hash once (a call per slot on a cluster makes that count),
-- and `applied_lsn` as read here is what the batch end is compared with below: nothing
-- in this call writes it before then.
local applied, read = false, false
if writer ~= '' then
  local m = redis.call('HMGET', KEYS[1], 'writer', 'applied_lsn')
  if m[1] ~= writer then
    if redis.call('EXISTS', KEYS[1]) == 0 then return no_meta() end
    return redis.error_reply('SKUSYNC_FENCED ' .. tostring(m[1] or 'none'))
  end
  if floor ~= '' and (not m[2] or lsn_lt(m[2], floor)) then
    return redis.error_reply('SKUSYNC_ROLLBACK ' .. tostring(m[2] or 'none'))
  end
  -- the stream's call chain on a standalone Redis (see `CallChain` in mod.rs): Redis must
  -- hold the writer's last call that returned; this call's number is kept at the highest
  if chain_this ~= '' then
    local held = tonumber(redis.call('HGET', KEYS[1], 'chain') or '')
    if chain_last ~= '' and (not held or held < tonumber(chain_last)) then
      return redis.error_reply('SKUSYNC_ROLLBACK ' .. tostring(m[2] or 'none'))
    end
    if chain_last == '' or not held or held < tonumber(chain_this) then
      redis.call('HSET', KEYS[1], 'chain', chain_this)
    end
  end
  applied, read = m[2], true
elseif redis.call('EXISTS', KEYS[1]) == 0 then
  return no_meta()
end

-- Every fence is read before anything is written (as in apply.lua): a refused read
-- leaves the whole call unwritten.
-- (each entry's key and counts are kept from this pass for the writes)
local missed, ok, oks, ons, ond = {}, {}, {}, {}, {}
local a, pos, nargv = 5, 0, #ARGV
while a <= nargv do
  local key = KEYS[tonumber(ARGV[a])]
  local el, ep = ARGV[a + 1], ARGV[a + 2]
  local ns = tonumber(ARGV[a + 4])
  local nd = tonumber(ARGV[a + 5 + 2 * ns])
  local nk = tonumber(ARGV[a + 6 + 2 * ns + nd])
  local v = redis.call('HMGET', key, 'lsn', 'piece')
  if (v[1] or '') == el and (v[2] or '') == ep then
    local n = #ok + 1
    ok[n], oks[n], ons[n], ond[n] = a, key, ns, nd
  else
    missed[#missed + 1] = pos
  end
  a = a + 7 + 2 * ns + nd + nk
  pos = pos + 1
end

local changed, nc = {}, 0
for i, e in ipairs(ok) do
  local key, ns, nd = oks[i], ons[i], ond[i]
  local s0 = e + 5
  local d0 = s0 + 2 * ns + 1
  -- The distinct-user keys first: on a cluster a new key of a slot being migrated
  -- fails the script (a live reshard), and these ops can be sent again; the hash write,
  -- which moves the fence, comes after them.
  local p = d0 + nd
  local stop = p + tonumber(ARGV[p])
  p = p + 1
  while p <= stop do
    local op, uk = ARGV[p], key .. ARGV[p + 1]
    if op == 'p' then
      local n = tonumber(ARGV[p + 2])
      redis.call('PFADD', uk, unpack(ARGV, p + 3, p + 2 + n))
      p = p + 3 + n
    elseif op == 'e' then
      redis.call('EXPIREAT', uk, ARGV[p + 2])
      p = p + 3
    else
      redis.call('DEL', uk)
      p = p + 2
    end
  end
  if nd > 0 then redis.call('HDEL', key, unpack(ARGV, d0, d0 + nd - 1)) end
  redis.call('HSET', key, unpack(ARGV, s0, s0 + 2 * ns - 1))
  changed[nc + 1], changed[nc + 2] = ARGV[e + 3], key
  nc = nc + 2
end

-- The change index (score: the commit LSN; only ever raised), in chunks for unpack.
local i = 1
while not cluster and i <= nc do
  local j = math.min(nc, i + 3999)
  redis.call('ZADD', KEYS[#KEYS], 'GT', unpack(changed, i, j))
  i = j + 1
end

if batch_end ~= '' and #missed == 0 then
  if not read then applied = redis.call('HGET', KEYS[1], 'applied_lsn') end
  if not applied or lsn_lt(applied, batch_end) then
    redis.call('HSET', KEYS[1], 'applied_lsn', batch_end)
  end
end

return {nc / 2, missed}
