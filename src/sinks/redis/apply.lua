-- skusync apply script: applies a batch of per-SKU entries, exactly once.
--
-- KEYS[1] = meta hash; KEYS[2..] = SKU hashes referenced by index.
-- ARGV[1] = JSON: {keep, low, quiet, counters, end, e = [entry...]}
--   entry = {k = key index, f/fp = first (commit LSN, piece) merged, l/p = last, t = commit
--            unix ms of the last, x = [table...] (truncate: clear these tables' rows first),
--            s = [step...], c = [[counter, n]...], b = [[counter, minute, n]...],
--            u = [[counter, minute, [hmac...]]...]}
--   step = [commit LSN, commit ms, rows|false, eval (1: evaluate alerts after it)]
--   row = [field, loc|false, on|false, res|false, thr|false|""] (a 1-element row deletes)
-- An entry is fenced per SKU by its range: skipped when the hash holds `l/p` or later,
-- applied when it holds less than `f/fp`; anything in between refuses the whole call
-- (SKUSYNC_SPLIT) before writing. The semantics are those of `fold::model` (a
-- property-tested Rust twin). Numbers travel as strings: Lua numbers are doubles and LSNs
-- need 64 bits.
--
-- Cost model: each SKU hash is read once (HMGET of its totals, counters and the stock
-- rows the batch touches), changed in Lua tables, and written back once (one HSET, plus
-- HDEL/HINCRBY only where fields disappear or locations change). Window buckets and
-- distinct-user sets are written as they come.

if redis.call('EXISTS', KEYS[1]) == 0 then
  return redis.error_reply('SKUSYNC_NOMETA meta hash missing: Redis lost its data; a resync is needed')
end

local args = cjson.decode(ARGV[1])
local keep = tonumber(args.keep)
local low = tonumber(args.low)
local quiet = args.quiet
local entries = args.e or {}
local counters = args.counters

-- Integers as Redis wants them (Lua would print -0 or 1e+15).
local function int(x)
  return string.format('%d', x)
end

local function lsn_lt(a, b)
  if #a ~= #b then return #a < #b end
  return a < b
end

-- (al, ap) < (bl, bp)
local function before(al, ap, bl, bp)
  if al == bl then return ap < bp end
  return lsn_lt(al, bl)
end

local base_fields = {'lsn', 'piece', 'rows', 'on_hand', 'reserved', 'gone', 'threshold', 'alert_state'}
local nbase = #base_fields

-- Pass 0: the stock rows each hash's entries touch, to read them with the hash.
local rowf = {}
for _, e in ipairs(entries) do
  if e.s then
    local rf = rowf[e.k]
    if not rf then rf = {list = {}, set = {}}; rowf[e.k] = rf end
    for _, st in ipairs(e.s) do
      local rows = st[3]
      if rows then
        for _, r in ipairs(rows) do
          if not rf.set[r[1]] then rf.set[r[1]] = true; rf.list[#rf.list + 1] = r[1] end
        end
      end
    end
  end
end

local function load(key, rf)
  local q = {}
  for i, f in ipairs(base_fields) do q[i] = f end
  for _, c in ipairs(counters) do
    q[#q + 1] = c
    q[#q + 1] = 'wmax:' .. c
  end
  local nfixed = #q
  if rf then
    for _, f in ipairs(rf.list) do q[#q + 1] = f end
  end
  local v = redis.call('HMGET', key, unpack(q))
  local h = {lsn = v[1], piece = tonumber(v[2] or '0') or 0, has_stock = v[3] ~= false,
             rows = tonumber(v[3]) or 0, on = tonumber(v[4]) or 0, res = tonumber(v[5]) or 0,
             was_gone = v[6] == '1', threshold = v[7] or nil, alert_state = v[8] or nil,
             counters = {}, wmax = {}, cdirty = {}, wdirty = {}, loc = {},
             -- field -> {loc, on, res} or false (absent); raw strings until first use
             rowt = {}, rowraw = {}, rowdirty = {}, roworder = {},
             written = false}
  for i, c in ipairs(counters) do
    h.counters[c] = tonumber(v[nbase + 2 * i - 1]) or 0
    h.wmax[c] = tonumber(v[nbase + 2 * i])
  end
  if rf then
    for i, f in ipairs(rf.list) do h.rowraw[f] = v[nfixed + i] end
  end
  return h
end

-- The row's current contribution {loc, on, res}, or false.
local function row_get(key, h, field)
  local t = h.rowt[field]
  if t ~= nil then return t end
  local raw = h.rowraw[field]
  if raw == nil then raw = redis.call('HGET', key, field) end
  if raw then
    local o = cjson.decode(raw)
    t = {o[1], tonumber(o[2]), tonumber(o[3])}
  else
    t = false
  end
  h.rowt[field] = t
  return t
end

local function row_put(h, field, t)
  if not h.rowdirty[field] then
    h.rowdirty[field] = true
    h.roworder[#h.roworder + 1] = field
  end
  h.rowt[field] = t
end

-- Per-location deltas, written once per hash.
local function loc_add(h, loc, on, res, rows)
  if loc == '' then return end
  local d = h.loc[loc]
  if not d then d = {0, 0, 0}; h.loc[loc] = d end
  d[1] = d[1] + on; d[2] = d[2] + res; d[3] = d[3] + rows
end

local function remove_row(key, h, field)
  local old = row_get(key, h, field)
  if not old then return false end
  h.on = h.on - old[2]; h.res = h.res - old[3]; h.rows = h.rows - 1
  loc_add(h, old[1], -old[2], -old[3], -1)
  row_put(h, field, false)
  return old
end

local alerts_raised = 0

-- Low-stock alert detection after a transaction (see fold::model::evaluate).
local function evaluate(key, h, lsn, ms)
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
    h.alert_state = state
    h.state_dirty = true
  end
  if kind and not quiet then
    if not h.alerts then
      local raw = redis.call('HGET', key, 'alerts')
      h.alerts = raw and cjson.decode(raw) or {}
    end
    local list = h.alerts
    list[#list + 1] = {type = kind, available = avail, threshold = thr, lsn = lsn, ts = tonumber(ms)}
    if #list > 50 then table.remove(list, 1) end
    h.alerts_dirty = true
    alerts_raised = alerts_raised + 1
  end
end

local function apply_rows(key, h, rows)
  h.has_stock = true
  for _, r in ipairs(rows) do
    local old = remove_row(key, h, r[1])
    if #r > 1 then
      local ol, oo, orr = '', 0, 0
      if old then ol, oo, orr = old[1], old[2], old[3] end
      local loc = r[2]; if loc == false then loc = ol end
      local on = r[3]; if on == false then on = oo else on = tonumber(on) end
      local res = r[4]; if res == false then res = orr else res = tonumber(res) end
      row_put(h, r[1], {loc, on, res})
      h.on = h.on + on; h.res = h.res + res; h.rows = h.rows + 1
      loc_add(h, loc, on, res, 1)
      local thr = r[5]
      if thr == '' then
        h.threshold = nil
        h.thr_dirty = true
      elseif thr ~= false and thr ~= nil then
        h.threshold = thr
        h.thr_dirty = true
      end
    end
  end
end

-- Window buckets and distinct users (the bucket list is sorted by counter, minute).
local function apply_windows(key, e, h)
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
    local wmax = h.wmax[c]
    if wmax and wmax > newmax then newmax = wmax end
    local cutoff = newmax - keep + 1
    if wmax then
      -- Buckets only exist in [old cutoff, old max]: at most `keep` deletions.
      local upto = math.min(cutoff - 1, wmax)
      for x = wmax - keep + 1, upto do
        redis.call('HDEL', key, 'w:' .. c .. ':' .. x)
        redis.call('DEL', '{' .. key .. '}:u:' .. c .. ':' .. x)
      end
    end
    if newmax ~= wmax then
      h.wmax[c] = newmax
      h.wdirty[c] = true
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
end

-- Write a changed hash back: one HSET, HDEL for fields that disappear.
local function write(key, h)
  local w = {'lsn', h.lsn, 'piece', tostring(h.piece), 'ts', h.ts}
  local del = {}
  for _, f in ipairs(h.roworder) do
    local t = h.rowt[f]
    if t then
      w[#w + 1] = f; w[#w + 1] = cjson.encode({t[1], int(t[2]), int(t[3])})
    else
      del[#del + 1] = f
    end
  end
  for loc, d in pairs(h.loc) do
    local pre = 'loc:' .. loc .. ':'
    -- A changed row count may mean a new or an emptied location: write both fields then.
    if d[1] ~= 0 or d[3] ~= 0 then redis.call('HINCRBY', key, pre .. 'on_hand', int(d[1])) end
    if d[2] ~= 0 or d[3] ~= 0 then redis.call('HINCRBY', key, pre .. 'reserved', int(d[2])) end
    if d[3] ~= 0 then
      local rows = redis.call('HINCRBY', key, pre .. 'rows', int(d[3]))
      if rows <= 0 then
        del[#del + 1] = pre .. 'on_hand'; del[#del + 1] = pre .. 'reserved'; del[#del + 1] = pre .. 'rows'
      end
    end
  end
  if h.has_stock then
    w[#w + 1] = 'rows'; w[#w + 1] = int(h.rows)
    w[#w + 1] = 'on_hand'; w[#w + 1] = int(h.on)
    w[#w + 1] = 'reserved'; w[#w + 1] = int(h.res)
    w[#w + 1] = 'available'; w[#w + 1] = int(h.on - h.res)
  end
  for c, _ in pairs(h.cdirty) do
    w[#w + 1] = c; w[#w + 1] = int(h.counters[c])
  end
  for c, _ in pairs(h.wdirty) do
    w[#w + 1] = 'wmax:' .. c; w[#w + 1] = int(h.wmax[c])
  end
  if h.thr_dirty then
    if h.threshold then
      w[#w + 1] = 'threshold'; w[#w + 1] = h.threshold
    else
      del[#del + 1] = 'threshold'
    end
  end
  if h.state_dirty then
    w[#w + 1] = 'alert_state'; w[#w + 1] = h.alert_state
  end
  if h.alerts_dirty then
    w[#w + 1] = 'alerts'; w[#w + 1] = cjson.encode(h.alerts)
  end
  local any_counter = false
  for _, v in pairs(h.counters) do
    if v ~= 0 then any_counter = true break end
  end
  if h.rows <= 0 and not any_counter then
    w[#w + 1] = 'gone'; w[#w + 1] = '1'
  elseif h.was_gone then
    del[#del + 1] = 'gone'
  end
  if #del > 0 then redis.call('HDEL', key, unpack(del)) end
  redis.call('HSET', key, unpack(w))
end

-- Pass 1: read each hash once; refuse if an entry's range straddles the fence.
local hs, order = {}, {}
for _, e in ipairs(entries) do
  local h = hs[e.k]
  if not h then
    h = load(KEYS[e.k], rowf[e.k])
    hs[e.k] = h
    order[#order + 1] = e.k
  end
  local fp, p = tonumber(e.fp), tonumber(e.p)
  if h.lsn and (e.f ~= e.l or fp ~= p)
      and not before(h.lsn, h.piece, e.f, fp) and before(h.lsn, h.piece, e.l, p) then
    return redis.error_reply('SKUSYNC_SPLIT ' .. KEYS[e.k] .. ' holds part of a merged entry')
  end
end

-- Pass 2: apply in order, in memory.
local applied, skipped = 0, 0
for _, e in ipairs(entries) do
  local key, h = KEYS[e.k], hs[e.k]
  local p = tonumber(e.p)
  if h.lsn and not before(h.lsn, h.piece, e.l, p) then
    skipped = skipped + 1
  else
    applied = applied + 1
    local changed = e.x == nil
    if e.x then
      -- Truncate: clear the tables' rows (those in Redis and those set in this call).
      local fields = redis.call('HKEYS', key)
      for f, t in pairs(h.rowt) do
        if t then fields[#fields + 1] = f end
      end
      for _, tbl in ipairs(e.x) do
        local pre = 'r:' .. tbl .. ':'
        for _, f in ipairs(fields) do
          if string.sub(f, 1, #pre) == pre and remove_row(key, h, f) then changed = true end
        end
      end
      if changed then evaluate(key, h, e.l, e.t) end
    end
    for _, st in ipairs(e.s or {}) do
      if st[3] then apply_rows(key, h, st[3]) end
      if st[4] == 1 then evaluate(key, h, st[1], st[2]) end
    end
    for _, c in ipairs(e.c or {}) do
      h.counters[c[1]] = (h.counters[c[1]] or 0) + tonumber(c[2])
      h.cdirty[c[1]] = true
    end
    if e.b or e.u then apply_windows(key, e, h) end
    if changed then
      h.lsn = e.l; h.piece = p; h.ts = e.t
      h.written = true
    end
  end
end

-- Pass 3: write back.
for _, ki in ipairs(order) do
  local h = hs[ki]
  if h.written then write(KEYS[ki], h) end
end

if args['end'] then
  local cur = redis.call('HGET', KEYS[1], 'applied_lsn')
  if not cur or lsn_lt(cur, args['end']) then
    redis.call('HSET', KEYS[1], 'applied_lsn', args['end'])
  end
end

return {applied, skipped, alerts_raised}
