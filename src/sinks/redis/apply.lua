-- skusync apply script: applies folded pieces to per-SKU hashes, exactly once.
--
-- KEYS[1] = meta hash; KEYS[2..] = SKU hashes referenced by index.
-- ARGV[1] = JSON: {keep, low, quiet, counters, end, p = [piece...]}
--   piece = {l = commit LSN (decimal string), p = piece number, t = commit unix ms,
--            last = bool, tk = [key index...] (truncate: keys to clear tables `x` from),
--            x = [table...], s = [[key index, entry]...], e = [key index...] (alert eval)}
--   entry = {r = [[field, loc|false, on|false, res|false, thr|false|""]...] (a 2-element
--            row is a delete), c = [[counter, n]...], b = [[counter, minute, n]...],
--            u = [[counter, minute, [hmac...]]...]}
-- Every piece is fenced per SKU by (commit LSN, piece): a replay changes nothing.
-- The semantics are those of `fold::model` (a property-tested Rust twin).
-- Numbers travel as strings: Lua numbers are doubles and LSNs need 64 bits.

if redis.call('EXISTS', KEYS[1]) == 0 then
  return redis.error_reply('SKUSYNC_NOMETA meta hash missing: Redis lost its data; a resync is needed')
end

local args = cjson.decode(ARGV[1])
local keep = tonumber(args.keep)
local low = tonumber(args.low)

-- Integers as Redis wants them (Lua would print -0 or 1e+15).
local function int(x)
  return string.format('%d', x)
end

local function lsn_lt(a, b)
  if #a ~= #b then return #a < #b end
  return a < b
end

local function geti(key, f)
  return tonumber(redis.call('HGET', key, f) or '0') or 0
end

local function fenced(key, l, p)
  local cur = redis.call('HMGET', key, 'lsn', 'piece')
  if not cur[1] then return false end
  if lsn_lt(l, cur[1]) then return true end
  return cur[1] == l and (tonumber(cur[2] or '0') or 0) >= p
end

local function remove_row(key, field)
  local old = redis.call('HGET', key, field)
  if not old then return nil end
  redis.call('HDEL', key, field)
  local o = cjson.decode(old)
  local loc, on, res = o[1], tonumber(o[2]), tonumber(o[3])
  redis.call('HINCRBY', key, 'on_hand', int(-on))
  redis.call('HINCRBY', key, 'reserved', int(-res))
  redis.call('HINCRBY', key, 'rows', -1)
  if loc ~= '' then
    redis.call('HINCRBY', key, 'loc:' .. loc .. ':on_hand', int(-on))
    redis.call('HINCRBY', key, 'loc:' .. loc .. ':reserved', int(-res))
    if redis.call('HINCRBY', key, 'loc:' .. loc .. ':rows', -1) <= 0 then
      redis.call('HDEL', key, 'loc:' .. loc .. ':on_hand', 'loc:' .. loc .. ':reserved', 'loc:' .. loc .. ':rows')
    end
  end
  return {loc, on, res}
end

local function add_row(key, field, loc, on, res)
  redis.call('HSET', key, field, cjson.encode({loc, int(on), int(res)}))
  redis.call('HINCRBY', key, 'on_hand', int(on))
  redis.call('HINCRBY', key, 'reserved', int(res))
  redis.call('HINCRBY', key, 'rows', 1)
  if loc ~= '' then
    redis.call('HINCRBY', key, 'loc:' .. loc .. ':on_hand', int(on))
    redis.call('HINCRBY', key, 'loc:' .. loc .. ':reserved', int(res))
    redis.call('HINCRBY', key, 'loc:' .. loc .. ':rows', 1)
  end
end

local function finish(key, pc)
  redis.call('HSET', key, 'lsn', pc.l, 'piece', pc.p, 'ts', pc.t)
  local has_stock = redis.call('HEXISTS', key, 'rows') == 1
  if has_stock then
    redis.call('HSET', key, 'available', int(geti(key, 'on_hand') - geti(key, 'reserved')))
  end
  local any_counter = false
  for _, c in ipairs(args.counters) do
    if geti(key, c) ~= 0 then any_counter = true break end
  end
  if geti(key, 'rows') <= 0 and not any_counter then
    redis.call('HSET', key, 'gone', '1')
  else
    redis.call('HDEL', key, 'gone')
  end
end

local alerts_raised = 0

local function evaluate(key, pc)
  if redis.call('HEXISTS', key, 'rows') == 0 then return end
  local avail = geti(key, 'available')
  local thr = tonumber(redis.call('HGET', key, 'threshold') or '') or low
  local prev = redis.call('HGET', key, 'alert_state')
  local state
  if avail <= 0 then state = 'out' elseif avail <= thr then state = 'low' else state = 'ok' end
  local hyst = math.max(1, math.floor(thr / 5))
  if prev == 'low' and state == 'ok' and avail <= thr + hyst then state = 'low' end
  local kind = nil
  if prev then
    if state == 'out' and prev ~= 'out' then kind = 'out_of_stock'
    elseif prev == 'out' and state ~= 'out' then kind = 'back_in_stock'
    elseif prev == 'ok' and state == 'low' then kind = 'low_stock' end
  end
  redis.call('HSET', key, 'alert_state', state)
  if kind and not args.quiet then
    local raw = redis.call('HGET', key, 'alerts')
    local list = {}
    if raw then list = cjson.decode(raw) end
    table.insert(list, {type = kind, available = avail, threshold = thr, lsn = pc.l, ts = tonumber(pc.t)})
    if #list > 50 then table.remove(list, 1) end
    redis.call('HSET', key, 'alerts', cjson.encode(list))
    alerts_raised = alerts_raised + 1
  end
end

local applied, skipped = 0, 0

for _, pc in ipairs(args.p) do
  local l, p = pc.l, tonumber(pc.p)
  -- Truncates: clear the tables' rows from each listed SKU.
  if pc.tk then
    for _, ki in ipairs(pc.tk) do
      local key = KEYS[ki]
      if not fenced(key, l, p) then
        local touched = false
        for _, t in ipairs(pc.x) do
          local pre = 'r:' .. t .. ':'
          local fields = redis.call('HKEYS', key)
          for _, f in ipairs(fields) do
            if string.sub(f, 1, #pre) == pre then
              remove_row(key, f)
              touched = true
            end
          end
        end
        if touched then
          finish(key, pc)
          evaluate(key, pc)
        end
      end
    end
  end
  local in_piece = {}
  for _, se in ipairs(pc.s or {}) do
    local key, e = KEYS[se[1]], se[2]
    in_piece[se[1]] = true
    if fenced(key, l, p) then
      skipped = skipped + 1
    else
      applied = applied + 1
      local rows = e.r or {}
      if #rows > 0 then
        redis.call('HSETNX', key, 'rows', '0')
        redis.call('HSETNX', key, 'on_hand', '0')
        redis.call('HSETNX', key, 'reserved', '0')
      end
      for _, r in ipairs(rows) do
        local old = remove_row(key, r[1])
        if #r > 2 then
          local ol, oo, orr = '', 0, 0
          if old then ol, oo, orr = old[1], old[2], old[3] end
          local loc = r[2]; if loc == false then loc = ol end
          local on = r[3]; if on == false then on = oo else on = tonumber(on) end
          local res = r[4]; if res == false then res = orr else res = tonumber(res) end
          add_row(key, r[1], loc, on, res)
          local thr = r[5]
          if thr == '' then redis.call('HDEL', key, 'threshold')
          elseif thr ~= false and thr ~= nil then redis.call('HSET', key, 'threshold', thr) end
        end
      end
      for _, c in ipairs(e.c or {}) do
        redis.call('HINCRBY', key, c[1], c[2])
      end
      -- Window buckets, grouped by counter (the list is sorted by counter, minute).
      local cutoffs = {}
      local b = e.b or {}
      local i = 1
      while keep > 0 and i <= #b do
        local c = b[i][1]
        local j = i
        local newmax = nil
        while j <= #b and b[j][1] == c do
          local m = tonumber(b[j][2])
          if not newmax or m > newmax then newmax = m end
          j = j + 1
        end
        local wmax = tonumber(redis.call('HGET', key, 'wmax:' .. c) or '')
        if wmax and wmax > newmax then newmax = wmax end
        local cutoff = newmax - keep + 1
        if wmax then
          -- Buckets only exist in [old cutoff, old max]: at most `keep` deletions.
          local upto = math.min(cutoff - 1, wmax)
          for x = wmax - keep + 1, upto do
            redis.call('HDEL', key, 'w:' .. c .. ':' .. x)
          end
        end
        redis.call('HSET', key, 'wmax:' .. c, int(newmax))
        for k = i, j - 1 do
          local m = tonumber(b[k][2])
          if m >= cutoff then
            redis.call('HINCRBY', key, 'w:' .. c .. ':' .. b[k][2], b[k][3])
          end
        end
        cutoffs[c] = cutoff
        i = j
      end
      for _, u in ipairs(e.u or {}) do
        local c, m = u[1], tonumber(u[2])
        redis.call('PFADD', '{' .. key .. '}:u:' .. c, unpack(u[3]))
        if cutoffs[c] and m >= cutoffs[c] then
          local hk = '{' .. key .. '}:u:' .. c .. ':' .. u[2]
          redis.call('PFADD', hk, unpack(u[3]))
          redis.call('EXPIREAT', hk, (m + keep + 1) * 60)
        end
      end
      finish(key, pc)
    end
  end
  if pc.last then
    for _, ki in ipairs(pc.e or {}) do
      local key = KEYS[ki]
      if in_piece[ki] then
        evaluate(key, pc)
      elseif not fenced(key, l, p) then
        finish(key, pc)
        evaluate(key, pc)
      end
    end
  end
end

if args['end'] then
  local cur = redis.call('HGET', KEYS[1], 'applied_lsn')
  if not cur or lsn_lt(cur, args['end']) then
    redis.call('HSET', KEYS[1], 'applied_lsn', args['end'])
  end
end

return {applied, skipped, alerts_raised}
