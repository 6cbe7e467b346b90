-- skusync thin apply: writes entries worked out by skusync (sinks/redis/thin.rs),
-- each only if its SKU hash still holds the fence skusync read.
--
-- Three shapes, by ARGV[4]:
-- '0' (a standalone Redis): KEYS[1] = meta hash; KEYS[2..n-1] = SKU hashes; KEYS[n] =
--   the change index.
-- '1' (one slot of a Redis Cluster): every key is in one slot: KEYS[1] is the slot's
--   meta copy, KEYS[2..n] the SKU hashes, and the caller indexes the changes (another
--   slot).
-- '2' (several slots of one cluster node): KEYS[1] is the first slot's meta copy (it
--   routes the call); the slots follow in ARGV as groups, each fenced by its own meta
--   copy and recording its own mark, as if each were a call of shape '1'. A node that
--   does not serve one of them refuses the call before anything is written (Redis checks
--   every key a script touches, and every meta copy and SKU hash is read first), and the
--   caller sends the groups again one slot per call.
-- ARGV: end LSN ('' for none; on a cluster the slot's mark), writer token ('' unfenced),
-- floor LSN ('' unchecked), shape, then per entry: k (key index; in shape '2' the key
-- itself), expected lsn, expected piece ('' where the read found none), new lsn, nset,
-- (field, value)..., ndel, field..., nkeyargs, then the SKU's distinct-user keys
-- (suffixes to the SKU key, so in its slot), nkeyargs arguments of: 'd' suffix (DEL),
-- 'p' suffix n id... (PFADD), 'e' suffix unix-seconds (EXPIREAT). In shape '2' the
-- entries come in groups instead: meta copy, mark ('' for none), floor ('' unchecked),
-- the number of entries, then the entries.
-- An entry whose hash holds another fence is not written: its position (0-based, in its
-- group) is returned, and skusync applies it with the apply script. `end` is recorded
-- only when every entry (of the group) was written. Reply: {written, {missed
-- position...}}; in shape '2' one such reply per group.

local writer = ARGV[2]
local shape = ARGV[4]

local function lsn_lt(a, b)
  if #a ~= #b then return #a < #b end
  return a < b
end

local function no_meta()
  return redis.error_reply('SKUSYNC_NOMETA meta hash missing: Redis lost its data; a resync is needed')
end

-- The writer fence, as in apply.lua: nil and the applied LSN (or false) and whether it
-- was read, or the error. A missing meta hash has no writer either, so the common case
-- reads the meta hash once (a call per slot on a cluster makes that count), and
-- `applied_lsn` as read here is what the mark is compared with below: nothing in this
-- call writes it before then.
local function fence(meta, floor)
  if writer ~= '' then
    local m = redis.call('HMGET', meta, 'writer', 'applied_lsn')
    if m[1] ~= writer then
      if redis.call('EXISTS', meta) == 0 then return no_meta() end
      return redis.error_reply('SKUSYNC_FENCED ' .. tostring(m[1] or 'none'))
    end
    if floor ~= '' and (not m[2] or lsn_lt(m[2], floor)) then
      return redis.error_reply('SKUSYNC_ROLLBACK ' .. tostring(m[2] or 'none'))
    end
    return nil, m[2], true
  elseif redis.call('EXISTS', meta) == 0 then
    return no_meta()
  end
  return nil, false, false
end

-- The groups: {meta, mark, applied, read, first entry, missed} (one for shapes '0'/'1').
-- Every fence is read before anything is written (as in apply.lua): a refused read
-- leaves the whole call unwritten. Each entry's key and counts are kept from this pass
-- for the writes.
local groups = {}
local ok, oks, ons, ond = {}, {}, {}, {}
local nargv = #ARGV

-- Reads the fences of the entries from ARGV[a] on (`count` of them, or to the end):
-- returns where the next argument is and how many entries it read.
local function scan(a, count, missed, keyed)
  local pos = 0
  while (count and pos < count) or (not count and a <= nargv) do
    local key = keyed and ARGV[a] or KEYS[tonumber(ARGV[a])]
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
  return a, pos
end

if shape == '2' then
  -- every group's fence first, then its entries: a slot the node does not serve fails
  -- here, before any write
  local a = 5
  while a <= nargv do
    local g = {meta = ARGV[a], mark = ARGV[a + 1], missed = {}}
    local err, applied, read = fence(g.meta, ARGV[a + 2])
    if err then return err end
    g.applied, g.read = applied, read
    a, g.count = scan(a + 4, tonumber(ARGV[a + 3]), g.missed, true)
    groups[#groups + 1] = g
  end
else
  local g = {meta = KEYS[1], mark = ARGV[1], missed = {}}
  local err, applied, read = fence(g.meta, ARGV[3])
  if err then return err end
  g.applied, g.read = applied, read
  local _, n = scan(5, nil, g.missed, false)
  g.count = n
  groups[1] = g
end

local changed, nc = {}, 0
for i, e in ipairs(ok) do
  local key, ns, nd = oks[i], ons[i], ond[i]
  local s0 = e + 5
  local d0 = s0 + 2 * ns + 1
  if nd > 0 then redis.call('HDEL', key, unpack(ARGV, d0, d0 + nd - 1)) end
  redis.call('HSET', key, unpack(ARGV, s0, s0 + 2 * ns - 1))
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
  changed[nc + 1], changed[nc + 2] = ARGV[e + 3], key
  nc = nc + 2
end

-- The change index (score: the commit LSN; only ever raised), in chunks for unpack.
local i = 1
while shape == '0' and i <= nc do
  local j = math.min(nc, i + 3999)
  redis.call('ZADD', KEYS[#KEYS], 'GT', unpack(changed, i, j))
  i = j + 1
end

-- Each group's mark, when it wrote every entry, and what it wrote (every entry not
-- missed).
local replies = {}
for k, g in ipairs(groups) do
  if g.mark ~= '' and #g.missed == 0 then
    local applied = g.applied
    if not g.read then applied = redis.call('HGET', g.meta, 'applied_lsn') end
    if not applied or lsn_lt(applied, g.mark) then
      redis.call('HSET', g.meta, 'applied_lsn', g.mark)
    end
  end
  replies[k] = {g.count - #g.missed, g.missed}
end
if shape ~= '2' then return replies[1] end
return replies
