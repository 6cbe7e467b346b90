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

-- One SKU's hash, read once with HMGET and written back once: a typical entry costs
-- about five redis.call()s instead of thirty.
local base_fields = {'lsn', 'piece', 'rows', 'on_hand', 'reserved', 'gone', 'threshold', 'alert_state'}
local hm_fields = {}
for _, f in ipairs(base_fields) do table.insert(hm_fields, f) end
for _, c in ipairs(args.counters) do
  table.insert(hm_fields, c)
  table.insert(hm_fields, 'wmax:' .. c)
end
local ncounters = #args.counters

local function load(key)
  local v = redis.call('HMGET', key, unpack(hm_fields))
  local h = {lsn = v[1], piece = v[2], has_stock = v[3] ~= false, rows = tonumber(v[3]) or 0,
             on = tonumber(v[4]) or 0, res = tonumber(v[5]) or 0, gone = v[6] == '1',
             threshold = v[7], alert_state = v[8], counters = {}, wmax = {}, loc = {}, set = {}, dirty = false}
  if v[7] == false then h.threshold = nil end
  if v[8] == false then h.alert_state = nil end
  for i, c in ipairs(args.counters) do
    h.counters[c] = tonumber(v[8 + 2 * i - 1]) or 0
    h.wmax[c] = tonumber(v[8 + 2 * i])
  end
  return h
end

local function is_fenced(h, l, p)
  if not h.lsn then return false end
  if lsn_lt(l, h.lsn) then return true end
  return h.lsn == l and (tonumber(h.piece or '0') or 0) >= p
end

-- Per-location deltas, applied once per entry.
local function loc_add(h, loc, on, res, rows)
  if loc == '' then return end
  local d = h.loc[loc]
  if not d then d = {0, 0, 0}; h.loc[loc] = d end
  d[1] = d[1] + on; d[2] = d[2] + res; d[3] = d[3] + rows
end

local function remove_row(key, h, field)
  local old = redis.call('HGET', key, field)
  if not old then return nil end
  local o = cjson.decode(old)
  local loc, on, res = o[1], tonumber(o[2]), tonumber(o[3])
  h.on = h.on - on; h.res = h.res - res; h.rows = h.rows - 1
  loc_add(h, loc, -on, -res, -1)
  return {loc, on, res}
end

local function flush_locs(key, h)
  for loc, d in pairs(h.loc) do
    local pre = 'loc:' .. loc .. ':'
    -- A changed row count may mean a new location: write both fields then.
    if d[1] ~= 0 or d[3] ~= 0 then redis.call('HINCRBY', key, pre .. 'on_hand', int(d[1])) end
    if d[2] ~= 0 or d[3] ~= 0 then redis.call('HINCRBY', key, pre .. 'reserved', int(d[2])) end
    local rows = redis.call('HINCRBY', key, pre .. 'rows', int(d[3]))
    if rows <= 0 then
      redis.call('HDEL', key, pre .. 'on_hand', pre .. 'reserved', pre .. 'rows')
    end
  end
  h.loc = {}
end

-- Totals, fence and `gone`, written with one HSET.
local function finish(key, h, pc)
  flush_locs(key, h)
  local w = {'lsn', pc.l, 'piece', tostring(pc.p), 'ts', pc.t}
  if h.has_stock then
    table.insert(w, 'rows'); table.insert(w, int(h.rows))
    table.insert(w, 'on_hand'); table.insert(w, int(h.on))
    table.insert(w, 'reserved'); table.insert(w, int(h.res))
    table.insert(w, 'available'); table.insert(w, int(h.on - h.res))
  end
  for c, m in pairs(h.wmax_new or {}) do
    table.insert(w, 'wmax:' .. c); table.insert(w, int(m))
  end
  h.wmax_new = nil
  local any_counter = false
  for _, v in pairs(h.counters) do
    if v ~= 0 then any_counter = true break end
  end
  local gone = h.rows <= 0 and not any_counter
  if gone then
    table.insert(w, 'gone'); table.insert(w, '1')
  elseif h.gone then
    redis.call('HDEL', key, 'gone')
  end
  h.gone = gone
  h.lsn = pc.l; h.piece = tostring(pc.p)
  redis.call('HSET', key, unpack(w))
end

local alerts_raised = 0

-- Low-stock alert detection, once per transaction (see fold::model::evaluate).
local function evaluate(key, h, pc)
  if not h.has_stock then return end
  local avail = h.on - h.res
  local thr = tonumber(h.threshold or '') or low
  local prev = h.alert_state
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
  if state ~= prev then
    redis.call('HSET', key, 'alert_state', state)
    h.alert_state = state
  end
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
      local h = load(key)
      if not is_fenced(h, l, p) then
        local touched = false
        local fields = redis.call('HKEYS', key)
        for _, t in ipairs(pc.x) do
          local pre = 'r:' .. t .. ':'
          for _, f in ipairs(fields) do
            if string.sub(f, 1, #pre) == pre then
              remove_row(key, h, f)
              redis.call('HDEL', key, f)
              touched = true
            end
          end
        end
        if touched then
          finish(key, h, pc)
          evaluate(key, h, pc)
        end
      end
    end
  end
  local in_piece = {}
  for _, se in ipairs(pc.s or {}) do
    local key, e = KEYS[se[1]], se[2]
    local h = load(key)
    in_piece[se[1]] = h
    if is_fenced(h, l, p) then
      skipped = skipped + 1
    else
      applied = applied + 1
      local rows = e.r or {}
      if #rows > 0 then h.has_stock = true end
      for _, r in ipairs(rows) do
        local old = remove_row(key, h, r[1])
        if #r > 2 then
          local ol, oo, orr = '', 0, 0
          if old then ol, oo, orr = old[1], old[2], old[3] end
          local loc = r[2]; if loc == false then loc = ol end
          local on = r[3]; if on == false then on = oo else on = tonumber(on) end
          local res = r[4]; if res == false then res = orr else res = tonumber(res) end
          redis.call('HSET', key, r[1], cjson.encode({loc, int(on), int(res)}))
          h.on = h.on + on; h.res = h.res + res; h.rows = h.rows + 1
          loc_add(h, loc, on, res, 1)
          local thr = r[5]
          if thr == '' then
            if h.threshold then redis.call('HDEL', key, 'threshold') end
            h.threshold = nil
          elseif thr ~= false and thr ~= nil then
            redis.call('HSET', key, 'threshold', thr)
            h.threshold = thr
          end
        elseif old then
          redis.call('HDEL', key, r[1])
        end
      end
      for _, c in ipairs(e.c or {}) do
        h.counters[c[1]] = redis.call('HINCRBY', key, c[1], c[2])
      end
      -- Window buckets, grouped by counter (the list is sorted by counter, minute).
      local cutoffs = {}
      local b = e.b or {}
      local i = 1
      h.wmax_new = {}
      while keep > 0 and i <= #b do
        local c = b[i][1]
        local j = i
        local newmax = nil
        while j <= #b and b[j][1] == c do
          local m = tonumber(b[j][2])
          if not newmax or m > newmax then newmax = m end
          j = j + 1
        end
        local wmax = h.wmax[c]
        if wmax and wmax > newmax then newmax = wmax end
        local cutoff = newmax - keep + 1
        if wmax then
          -- Buckets only exist in [old cutoff, old max]: at most `keep` deletions.
          local upto = math.min(cutoff - 1, wmax)
          for x = wmax - keep + 1, upto do
            redis.call('HDEL', key, 'w:' .. c .. ':' .. x)
          end
        end
        if newmax ~= wmax then
          h.wmax[c] = newmax
          h.wmax_new[c] = newmax
        end
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
      finish(key, h, pc)
    end
  end
  if pc.last then
    for _, ki in ipairs(pc.e or {}) do
      local key = KEYS[ki]
      local h = in_piece[ki]
      if h then
        evaluate(key, h, pc)
      else
        h = load(key)
        if not is_fenced(h, l, p) then
          finish(key, h, pc)
          evaluate(key, h, pc)
        end
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
