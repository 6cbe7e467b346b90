-- skusync apply script: applies a batch of per-SKU entries, exactly once.
--
-- KEYS[1] = meta hash; KEYS[2..n-2] = SKU hashes referenced by index; KEYS[n-1] = the
-- change index (sorted set: SKU hash key -> commit LSN of its last change, for the
-- clients' catch-up, `/v1/changes`); KEYS[n] = the alert history (stream). A SKU's
-- distinct-user keys are its hash key plus ':u:...' (same hash tag, see sinks/layout.rs).
-- On a Redis Cluster (`indexed` not '') every key of a call is in one slot: KEYS[1] is that
-- slot's copy of the meta hash (writer, applied_lsn), then the SKU hashes, then the
-- distinct-user keys the call may PFADD (declared for the cluster's routing only), and
-- the change index and alert history (other slots) are written by the caller from the
-- reply. A skipped entry reports again what the caller may not have written: its hash's
-- LSN, and the alerts its hash's `alert_history` holds past `indexed`.
-- ARGV is one flat list of strings, read front to back (no JSON: in Redis' Lua every
-- decoded value is a new string or table, which cost more than everything else):
--   keep, low, quiet ('1'|'0'), end LSN ('' for none), writer token ('' unfenced),
--   floor (LSN, '' unchecked; or chained, see below), scale, alert history count, alert history age (ms),
--   indexed ('' on a standalone Redis; on a Redis Cluster the LSN through which every
--   alert raised is in the alert history), ncounters, counter..., entry...
--     scale: quantities (stock values, counters, buckets, low and thresholds) travel as
--     integers in units of 10^-scale and are stored in the hash as decimals ('12.5');
--     with scale 0 (no [[inventory]]/[[activity]] `scale`) they are whole numbers.
--   entry = k, f, fp, l, p, t, nx, table..., nr, row..., trace, nc, (counter, n)...,
--           nb, (counter, minute, n)..., nu, (counter, minute, nids, hmac...)...
--     k: key index; f/fp and l/p: first and last (commit LSN, piece) merged into the
--     entry; t: commit unix ms of the last; tables: row field prefixes of the stock tables
--     to clear first (TRUNCATE)
--   row = field, flags, loc, on, res: a stock row's final state; flags 'D' deletes it,
--     otherwise one letter each for loc, on, res: 'v' value, 'k' keep what Redis holds
--   trace = packed records '<BI4ddddd' (flags, row index 0-based, on, res, threshold,
--     LSN minus f, commit ms): every stock change in commit order, to evaluate low-stock
--     alerts after each transaction. Flags: 1 delete, 2 keep on, 4 keep res,
--     8 set threshold, 16 clear threshold (on any record: a piece's threshold, in change
--     order, rides on its last), 32 evaluate after it, 64 no row.
-- A counter name starting with '?' (from an [[activity]] table with known_skus_only)
-- counts, under the name without it, only when the SKU has stock rows once the entry's
-- rows are applied; an entry holding nothing else does not create a missing hash.
-- An entry is fenced per SKU by its range: skipped when the hash holds `l/p` or later,
-- applied when it holds less than `f/fp`; anything in between refuses the whole call
-- (SKUSYNC_SPLIT) before writing. The semantics are those of `fold::model` (a
-- property-tested Rust twin). Numbers travel as strings: LSNs need 64 bits.
--
-- Cost model: each SKU hash is read once (one HMGET of its totals, counters, and the
-- rows, locations and buckets the batch touches), changed in Lua tables, and written
-- back once (one HSET, one HDEL where fields disappear).

if redis.call('EXISTS', KEYS[1]) == 0 then
  return redis.error_reply('SKUSYNC_NOMETA meta hash missing: Redis lost its data; a resync is needed')
end

local keep = tonumber(ARGV[1])
local low = tonumber(ARGV[2])
local quiet = ARGV[3] == '1'
local batch_end = ARGV[4]
-- The floor argument: an LSN ('' unchecked), or on a standalone Redis 'LSN|last|this',
-- the numbers of the writer's last call that returned ('' none) and of this call.
local writer = ARGV[5]
local floor, chain_last, chain_this = string.match(ARGV[6], '^([^|]*)|?([^|]*)|?([^|]*)$')
local scale = tonumber(ARGV[7])
local history, history_ms = ARGV[8], tonumber(ARGV[9])
local indexed = ARGV[10]
local cluster = indexed ~= ''
local ncounters = tonumber(ARGV[11])
local counters = {}
for i = 1, ncounters do counters[i] = ARGV[11 + i] end
local first_entry = 12 + ncounters
local changes_key, alerts_key = KEYS[#KEYS - 1], KEYS[#KEYS]
-- cluster: alerts raised, for the caller to add to the history (key, type, available,
-- threshold, lsn, ts per alert)
local raised = {}
local nargv = #ARGV

-- Integers as Redis wants them (Lua would print -0 or 1e+15).
local function int(x)
  return string.format('%d', x)
end

-- Quantities: `qty` reads a stored decimal into units of 10^-scale, exactly (never
-- through a fractional double); `dec` writes units back as a decimal. With scale 0 they
-- are tonumber and int.
local unit = 1
local qty, dec = tonumber, int
if scale > 0 then
  unit = 10 ^ scale
  qty = function(s)
    if not s then return nil end
    local sign, i, f = string.match(s, '^(-?)(%d*)%.?(%d*)$')
    if not sign then return nil end
    f = string.sub(f .. string.rep('0', scale), 1, scale)
    local v = (tonumber(i) or 0) * unit + (tonumber(f) or 0)
    if sign == '-' then v = -v end
    return v
  end
  dec = function(x)
    local sign = ''
    if x < 0 then sign = '-'; x = -x end
    local i = math.floor(x / unit)
    local f = x - i * unit
    if f == 0 then return sign .. string.format('%d', i) end
    local fs = string.gsub(string.format('%0' .. scale .. 'd', f), '0+$', '')
    return sign .. string.format('%d', i) .. '.' .. fs
  end
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

-- At most one writer, and a Redis that lost writes is noticed before anything is written:
-- the writer's token must be meta `writer`, and `applied_lsn` must not be below what this
-- writer saw Redis hold.
if writer ~= '' then
  local m = redis.call('HMGET', KEYS[1], 'writer', 'applied_lsn')
  if m[1] ~= writer then
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
end

-- Lua's unpack has a stack limit: long argument lists go in chunks.
local CHUNK = 4000
local function call_chunked(cmd, key, list)
  local i = 1
  while i <= #list do
    local j = math.min(#list, i + CHUNK - 1)
    redis.call(cmd, key, unpack(list, i, j))
    i = j + 1
  end
end

-- Pass 0: index the entries and collect, per hash, the extra fields worth reading with
-- it (rows, locations, window buckets the batch touches).
local entries = {}
local want = {}
local function want_field(k, f)
  local w = want[k]
  if not w then w = {}; want[k] = w end
  if not w[f] then w[f] = true; w[#w + 1] = f end
end
local a = first_entry
while a <= nargv do
  local k, f, fp, l, p, t = tonumber(ARGV[a]), ARGV[a + 1], tonumber(ARGV[a + 2]), ARGV[a + 3],
    tonumber(ARGV[a + 4]), ARGV[a + 5]
  local nx = tonumber(ARGV[a + 6])
  a = a + 7
  local x = nil
  if nx > 0 then
    x = {}
    for i = 1, nx do x[i] = ARGV[a + i - 1] end
    a = a + nx
  end
  local nr = tonumber(ARGV[a])
  local r = a + 1
  a = a + 1
  for _ = 1, nr do
    want_field(k, ARGV[a])
    local flags = ARGV[a + 1]
    if flags ~= 'D' and string.byte(flags, 1) == 118 and ARGV[a + 2] ~= '' then
      local pre = 'loc:' .. ARGV[a + 2] .. ':'
      want_field(k, pre .. 'on_hand'); want_field(k, pre .. 'reserved'); want_field(k, pre .. 'rows')
    end
    a = a + 5
  end
  local trace = ARGV[a]
  a = a + 1
  local guarded = 0
  local nc = tonumber(ARGV[a])
  local c0 = a + 1
  for i = 0, nc - 1 do
    if string.byte(ARGV[c0 + 2 * i], 1) == 63 then guarded = guarded + 1 end
  end
  a = a + 1 + 2 * nc
  local nb = tonumber(ARGV[a])
  local b0 = a + 1
  for i = 0, nb - 1 do
    local c = ARGV[b0 + 3 * i]
    if string.byte(c, 1) == 63 then
      guarded = guarded + 1
      c = string.sub(c, 2)
    end
    want_field(k, 'w:' .. c .. ':' .. ARGV[b0 + 3 * i + 1])
  end
  a = a + 1 + 3 * nb
  local nu = tonumber(ARGV[a])
  local u0 = a + 1
  a = a + 1
  for _ = 1, nu do
    if string.byte(ARGV[a], 1) == 63 then guarded = guarded + 1 end
    a = a + 3 + tonumber(ARGV[a + 2])
  end
  entries[#entries + 1] = {k = k, f = f, fp = fp, l = l, p = p, t = t, x = x, r = r, nr = nr,
    trace = trace, c = c0, nc = nc, b = b0, nb = nb, u = u0, nu = nu,
    only_guarded = x == nil and nr == 0 and trace == '' and guarded > 0
      and guarded == nc + nb + nu}
end

local base_fields = {'lsn', 'piece', 'rows', 'on_hand', 'reserved', 'gone', 'threshold', 'alert_state'}
local nbase = #base_fields

-- The fields every hash is read with, built once per call.
local fixed = {}
for i = 1, nbase do fixed[i] = base_fields[i] end
for i = 1, ncounters do
  fixed[nbase + 2 * i - 1] = counters[i]
  fixed[nbase + 2 * i] = 'wmax:' .. counters[i]
end
local nfixed = #fixed

-- Read-only stand-in for a table not made yet (never written to).
local NONE = {}

-- A hash's state in the call. Tables most entries never need are made on first use (a
-- Lua table costs more than the HMGET's fields): rowt (row field -> {loc, on, res} or
-- false), roworder (rows changed, in order, and as keys), loc (locations changed, in
-- order, and location -> {on, res, rows} deltas), bucket (bucket fields, in order, and
-- field -> increment), cdirty, wdirty, del (fields to delete).
local function load(key, w)
  local nextra = w and #w <= CHUNK and #w or 0
  local v
  if nextra == 0 then
    v = redis.call('HMGET', key, unpack(fixed))
  else
    local q = {unpack(fixed)}
    for i = 1, nextra do q[nfixed + i] = w[i] end
    v = redis.call('HMGET', key, unpack(q))
  end
  local t = v[7] or nil
  local cs, wm, pre = {}, {}, {}
  for i = 1, ncounters do
    local c = counters[i]
    cs[c] = qty(v[nbase + 2 * i - 1]) or 0
    wm[c] = tonumber(v[nbase + 2 * i])
  end
  -- fields read with the hash (false: absent)
  for i = 1, nextra do pre[w[i]] = v[nfixed + i] end
  return {lsn = v[1], piece = tonumber(v[2] or '0') or 0, has_stock = v[3] ~= false,
          rows = tonumber(v[3]) or 0, on = qty(v[4]) or 0, res = qty(v[5]) or 0,
          was_gone = v[6] == '1', threshold = t, had_threshold = t ~= nil,
          alert_state = v[8] or nil, counters = cs, wmax = wm, pre = pre, written = false}
end

-- A field read with the hash, or read now.
local function field(key, h, f)
  local v = h.pre[f]
  if v == nil then
    v = redis.call('HGET', key, f)
    h.pre[f] = v
  end
  return v
end

-- The row's current contribution {loc, on, res}, or false.
local function row_get(key, h, f)
  local rt = h.rowt
  if rt then
    local t = rt[f]
    if t ~= nil then return t end
  else
    rt = {}
    h.rowt = rt
  end
  local t
  local raw = field(key, h, f)
  if raw then
    -- The common shape without escapes is matched directly (cjson costs more).
    local l, o, r = string.match(raw, '^%["([^"\\]*)","(-?[%d.]+)","(-?[%d.]+)"%]$')
    if l then
      t = {l, qty(o), qty(r)}
    else
      local d = cjson.decode(raw)
      t = {d[1], qty(d[2]), qty(d[3])}
    end
  else
    t = false
  end
  rt[f] = t
  return t
end

local function row_put(h, f, t)
  local ro = h.roworder
  if not ro then ro = {}; h.roworder = ro end
  if not ro[f] then
    ro[f] = true
    ro[#ro + 1] = f
  end
  local rt = h.rowt
  if not rt then rt = {}; h.rowt = rt end
  rt[f] = t
end

local function loc_add(h, loc, on, res, rows)
  if loc == '' then return end
  local lt = h.loc
  if not lt then lt = {}; h.loc = lt end
  local d = lt[loc]
  if not d then d = {0, 0, 0}; lt[loc] = d; lt[#lt + 1] = loc end
  d[1] = d[1] + on; d[2] = d[2] + res; d[3] = d[3] + rows
end

local function remove_row(key, h, f)
  local old = row_get(key, h, f)
  if not old then return false end
  h.on = h.on - old[2]; h.res = h.res - old[3]; h.rows = h.rows - 1
  loc_add(h, old[1], -old[2], -old[3], -1)
  row_put(h, f, false)
  return old
end

-- LSN (decimal string) plus a small delta, exactly.
local function lsn_add(base, delta)
  if delta == 0 then return base end
  if #base < 16 then return string.format('%d', tonumber(base) + delta) end
  local digits, carry, d = {}, delta, #base
  while d >= 1 or carry > 0 do
    local x = (d >= 1 and tonumber(string.sub(base, d, d)) or 0) + carry % 10
    carry = math.floor(carry / 10)
    if x >= 10 then x = x - 10; carry = carry + 1 end
    table.insert(digits, 1, tostring(x))
    d = d - 1
  end
  return table.concat(digits)
end

-- Cluster: the alerts of the hash's `alert_history` that may not be in the history yet
-- (past `indexed`), each {type, available, threshold, lsn, ts}.
local function unindexed_alerts(key, h)
  local raw = field(key, h, 'alert_history')
  local out = {}
  if raw then
    for _, a in ipairs(cjson.decode(raw)) do
      if lsn_lt(indexed, a[4]) then out[#out + 1] = a end
    end
  end
  return out
end

-- Cluster: a skipped entry reports them again (its caller may have died before adding
-- them to the history).
local function report_again(key, h)
  for _, a in ipairs(h.hist or unindexed_alerts(key, h)) do
    local n = #raised
    raised[n + 1] = key; raised[n + 2] = a[1]; raised[n + 3] = a[2]; raised[n + 4] = a[3]
    raised[n + 5] = a[4]; raised[n + 6] = a[5]
  end
end

-- Trim the alert history exactly (at most `keep` entries; none older than `cutoff` unix
-- ms, 0 for no age limit) and record the greatest id dropped as the stream's
-- max-deleted-entry-id (XSETID): Redis' own trimming records none, and readers
-- (`/v1/alerts?since=`, webhooks) compare their position with it to learn they missed
-- alerts.
local function trim_history(key, keep, cutoff)
  local dropped
  local over = redis.call('XLEN', key) - keep
  if over > 0 then
    local r = redis.call('XRANGE', key, '-', '+', 'COUNT', over)
    dropped = r[#r][1]
    redis.call('XTRIM', key, 'MAXLEN', keep)
  end
  if cutoff > 0 then
    local c = string.format('%d', cutoff)
    local r = redis.call('XREVRANGE', key, '(' .. c .. '-0', '-', 'COUNT', 1)
    if #r > 0 then
      -- newer than any dropped by count (those were the oldest)
      dropped = r[1][1]
      redis.call('XTRIM', key, 'MINID', c)
    end
  end
  if dropped then
    local info = redis.call('XINFO', 'STREAM', key)
    for i = 1, #info, 2 do
      if info[i] == 'last-generated-id' then
        redis.call('XSETID', key, info[i + 1], 'MAXDELETEDID', dropped)
      end
    end
  end
end

local alerts_raised = 0

-- Low-stock alert detection after a transaction, at level `avail` (see
-- fold::model::evaluate).
-- `lsn` and `ms` are strings, or `lsn` is a base LSN and `ms` a number with `dl` the
-- offset: formatting them costs more than the evaluation, so it happens only for alerts.
local function evaluate(key, h, has_stock, avail, lsn, ms, dl)
  if not has_stock then return end
  local thr = qty(h.threshold) or low
  local prev = h.alert_state
  local state
  if avail <= 0 then state = 'out' elseif avail <= thr then state = 'low' else state = 'ok' end
  local hyst = math.max(unit, math.floor(thr / 5))
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
    if dl then lsn = lsn_add(lsn, dl); ms = int(ms) end
    -- Decimals as strings: cjson prints numbers with 14 significant digits.
    local av, th = avail, thr
    if scale > 0 then av, th = dec(avail), dec(thr) end
    -- The history (a stream: its ids order alerts for `/v1/alerts?since=` and webhooks)
    -- gets the alert exactly once, like the hash: the entry is fenced with it.
    local avs, ths = scale > 0 and av or int(av), scale > 0 and th or int(th)
    local seq
    if cluster then
      local n, mss = #raised, tostring(ms)
      raised[n + 1] = key; raised[n + 2] = kind; raised[n + 3] = avs; raised[n + 4] = ths
      raised[n + 5] = lsn; raised[n + 6] = mss
      -- kept in the hash (with those not yet in the history) until a later call finds it
      -- in the history: a replay of this entry (skipped by the fence) reports it again, in
      -- case the caller died before adding it (the history skips what it holds)
      if not h.hist then h.hist = unindexed_alerts(key, h) end
      h.hist[#h.hist + 1] = {kind, avs, ths, lsn, mss}
    else
      seq = redis.call('XADD', alerts_key, '*', 'key', key,
        'type', kind, 'available', avs, 'threshold', ths, 'lsn', lsn, 'ts', tostring(ms))
    end
    list[#list + 1] = {type = kind, available = av, threshold = th, lsn = lsn, ts = tonumber(ms),
      seq = seq}
    if #list > 50 then table.remove(list, 1) end
    h.alerts_dirty = true
    alerts_raised = alerts_raised + 1
  end
end

-- An entry's final rows, starting at ARGV[a].
local function apply_rows(key, h, a, nr)
  h.has_stock = true
  for _ = 1, nr do
    local f, flags = ARGV[a], ARGV[a + 1]
    local old = remove_row(key, h, f)
    if flags ~= 'D' then
      local ol, oo, orr = '', 0, 0
      if old then ol, oo, orr = old[1], old[2], old[3] end
      local loc, on, res = ol, oo, orr
      if string.sub(flags, 1, 1) == 'v' then loc = ARGV[a + 2] end
      if string.sub(flags, 2, 2) == 'v' then on = tonumber(ARGV[a + 3]) end
      if string.sub(flags, 3, 3) == 'v' then res = tonumber(ARGV[a + 4]) end
      row_put(h, f, {loc, on, res})
      h.on = h.on + on; h.res = h.res + res; h.rows = h.rows + 1
      loc_add(h, loc, on, res, 1)
    end
    a = a + 5
  end
end

-- Walk an entry's trace: the level after each change, alerts where a transaction ends.
local band, sunpack = bit.band, struct.unpack

local function run_trace(key, h, e)
  local tr = e.trace
  local avail = h.on - h.res
  local has = h.has_stock
  -- each row's level so far (on, res; both false: no row), row index -> value
  local con, cres = {}, {}
  local pos, n = 1, #tr
  while pos <= n do
    local flags, idx, on, res, thr, dl, ms
    flags, idx, on, res, thr, dl, ms, pos = sunpack('<BI4ddddd', tr, pos)
    if band(flags, 64) == 0 then
      has = true
      local oo, orr = con[idx], cres[idx]
      if oo == nil then
        local t = row_get(key, h, ARGV[e.r + 5 * idx])
        if t then oo, orr = t[2], t[3] else oo, orr = false, false end
      end
      if band(flags, 1) ~= 0 then
        if oo then avail = avail - (oo - orr) end
        con[idx] = false; cres[idx] = false
      else
        if not oo then oo, orr = 0, 0 end
        if band(flags, 2) ~= 0 then on = oo end
        if band(flags, 4) ~= 0 then res = orr end
        avail = avail + (on - res) - (oo - orr)
        con[idx] = on; cres[idx] = res
      end
    end
    -- any record may write the threshold (a piece's rides on its last)
    if band(flags, 8) ~= 0 then
      h.threshold = dec(thr); h.thr_dirty = true
    elseif band(flags, 16) ~= 0 then
      h.threshold = nil; h.thr_dirty = true
    end
    if band(flags, 32) ~= 0 then
      evaluate(key, h, has, avail, e.f, ms, dl)
    end
  end
end

local function bucket_add(h, f, n)
  local bt = h.bucket
  if not bt then bt = {}; h.bucket = bt end
  local v = bt[f]
  if v == nil then v = 0; bt[#bt + 1] = f end
  bt[f] = v + n
end

-- The counter a name counts under: itself, or for a guarded '?name' the name when the
-- SKU has stock rows, else nil (not counted).
local function counted(c, stocked)
  if string.byte(c, 1) ~= 63 then return c end
  if stocked then return string.sub(c, 2) end
  return nil
end

-- Window buckets and distinct users (buckets are sorted by counter, minute; a guarded
-- group is a group of its own, applied after or before the plain one: the same result).
local function apply_windows(key, e, h)
  local stocked = h.rows > 0
  local cutoffs = {}
  local i = 0
  while keep > 0 and i < e.nb do
    local raw = ARGV[e.b + 3 * i]
    local c = counted(raw, stocked)
    local j = i
    local newmax = nil
    while j < e.nb and ARGV[e.b + 3 * j] == raw do
      local m = tonumber(ARGV[e.b + 3 * j + 1])
      if not newmax or m > newmax then newmax = m end
      j = j + 1
    end
    if c then
      local wmax = h.wmax[c]
      if wmax and wmax > newmax then newmax = wmax end
      local cutoff = newmax - keep + 1
      if wmax then
        -- Buckets only exist in [old cutoff, old max]: at most `keep` deletions.
        local upto = math.min(cutoff - 1, wmax)
        for x = wmax - keep + 1, upto do
          local bf = 'w:' .. c .. ':' .. x
          local del = h.del
          if not del then del = {}; h.del = del end
          del[#del + 1] = bf
          if h.bucket then h.bucket[bf] = nil end
          h.pre[bf] = false
          -- (on a cluster the key is left to its EXPIREAT: the caller declares the keys
          -- the call writes, and cannot know these)
          if not cluster then redis.call('DEL', key .. ':u:' .. c .. ':' .. x) end
        end
      end
      if newmax ~= wmax then
        h.wmax[c] = newmax
        if not h.wdirty then h.wdirty = {} end
        h.wdirty[c] = true
      end
      for k = i, j - 1 do
        local ms = ARGV[e.b + 3 * k + 1]
        if tonumber(ms) >= cutoff then
          bucket_add(h, 'w:' .. c .. ':' .. ms, tonumber(ARGV[e.b + 3 * k + 2]))
        end
      end
      cutoffs[c] = cutoff
    end
    i = j
  end
  local a = e.u
  for _ = 1, e.nu do
    local c, ms, n = counted(ARGV[a], stocked), ARGV[a + 1], tonumber(ARGV[a + 2])
    local m = tonumber(ms)
    if c then
      redis.call('PFADD', key .. ':u:' .. c, unpack(ARGV, a + 3, a + 2 + n))
      if cutoffs[c] and m >= cutoffs[c] then
        local hk = key .. ':u:' .. c .. ':' .. ms
        redis.call('PFADD', hk, unpack(ARGV, a + 3, a + 2 + n))
        redis.call('EXPIREAT', hk, (m + keep + 1) * 60)
      end
    end
    a = a + 3 + n
  end
end

-- Write a changed hash back: one HSET, one HDEL for fields that disappear.
local function write(key, h)
  local w = {'lsn', h.lsn, 'piece', tostring(h.piece), 'ts', h.ts}
  local del = h.del or {}
  local ro, rt = h.roworder or NONE, h.rowt
  for i = 1, #ro do
    local f = ro[i]
    local t = rt[f]
    if t then
      local l = t[1]
      w[#w + 1] = f
      if string.find(l, '[%c"\\\128-\255/]') then
        w[#w + 1] = cjson.encode({l, dec(t[2]), dec(t[3])})
      else
        w[#w + 1] = '["' .. l .. '","' .. dec(t[2]) .. '","' .. dec(t[3]) .. '"]'
      end
    else
      del[#del + 1] = f
    end
  end
  local lt = h.loc or NONE
  for i = 1, #lt do
    local loc = lt[i]
    local d = lt[loc]
    local pre = 'loc:' .. loc .. ':'
    local fo, fr, fn = pre .. 'on_hand', pre .. 'reserved', pre .. 'rows'
    local rows = (tonumber(field(key, h, fn)) or 0) + d[3]
    if rows <= 0 then
      del[#del + 1] = fo; del[#del + 1] = fr; del[#del + 1] = fn
    else
      -- A changed row count may mean a new location: write every field then.
      if d[1] ~= 0 or d[3] ~= 0 then
        w[#w + 1] = fo; w[#w + 1] = dec((qty(field(key, h, fo)) or 0) + d[1])
      end
      if d[2] ~= 0 or d[3] ~= 0 then
        w[#w + 1] = fr; w[#w + 1] = dec((qty(field(key, h, fr)) or 0) + d[2])
      end
      if d[3] ~= 0 then
        w[#w + 1] = fn; w[#w + 1] = int(rows)
      end
    end
  end
  local bt = h.bucket or NONE
  for i = 1, #bt do
    local f = bt[i]
    local n = bt[f]
    if n then
      w[#w + 1] = f; w[#w + 1] = dec((qty(field(key, h, f)) or 0) + n)
    end
  end
  if h.has_stock then
    w[#w + 1] = 'rows'; w[#w + 1] = int(h.rows)
    w[#w + 1] = 'on_hand'; w[#w + 1] = dec(h.on)
    w[#w + 1] = 'reserved'; w[#w + 1] = dec(h.res)
    w[#w + 1] = 'available'; w[#w + 1] = dec(h.on - h.res)
  end
  for c, _ in pairs(h.cdirty or NONE) do
    w[#w + 1] = c; w[#w + 1] = dec(h.counters[c])
  end
  for c, _ in pairs(h.wdirty or NONE) do
    w[#w + 1] = 'wmax:' .. c; w[#w + 1] = int(h.wmax[c])
  end
  if h.thr_dirty then
    if h.threshold then
      w[#w + 1] = 'threshold'; w[#w + 1] = h.threshold
    elseif h.had_threshold then
      del[#del + 1] = 'threshold'
    end
  end
  if h.state_dirty then
    w[#w + 1] = 'alert_state'; w[#w + 1] = h.alert_state
  end
  if h.alerts_dirty then
    w[#w + 1] = 'alerts'; w[#w + 1] = cjson.encode(h.alerts)
  end
  if h.hist then
    w[#w + 1] = 'alert_history'; w[#w + 1] = cjson.encode(h.hist)
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
  call_chunked('HDEL', key, del)
  call_chunked('HSET', key, w)
end

-- Pass 1: read each hash once; refuse if an entry's range straddles the fence.
local hs, order = {}, {}
for i = 1, #entries do
  local e = entries[i]
  local h = hs[e.k]
  if not h then
    h = load(KEYS[e.k], want[e.k])
    hs[e.k] = h
    order[#order + 1] = e.k
  end
  if h.lsn and (e.f ~= e.l or e.fp ~= e.p)
      and not before(h.lsn, h.piece, e.f, e.fp) and before(h.lsn, h.piece, e.l, e.p) then
    return redis.error_reply('SKUSYNC_SPLIT ' .. KEYS[e.k] .. ' holds part of a merged entry')
  end
end

-- Pass 2: apply in order, in memory.
local applied, skipped = 0, 0
for i = 1, #entries do
  local e = entries[i]
  local key, h = KEYS[e.k], hs[e.k]
  if h.lsn and not before(h.lsn, h.piece, e.l, e.p) then
    skipped = skipped + 1
    if cluster then report_again(key, h) end
  else
    applied = applied + 1
    local changed = e.x == nil
    if e.x then
      -- Truncate: clear the tables' rows (those in Redis and those set in this call).
      local fields = redis.call('HKEYS', key)
      for f, t in pairs(h.rowt or NONE) do
        if t then fields[#fields + 1] = f end
      end
      for _, pre in ipairs(e.x) do
        for _, f in ipairs(fields) do
          if string.sub(f, 1, #pre) == pre and remove_row(key, h, f) then changed = true end
        end
      end
      -- No alert here: the transaction may refill the table. Its final piece evaluates
      -- every SKU once (the daemon sends evaluation-only entries after a TRUNCATE).
    end
    if e.trace ~= '' then run_trace(key, h, e) end
    if e.nr > 0 then apply_rows(key, h, e.r, e.nr) end
    local stocked = h.rows > 0
    if e.only_guarded and not stocked and not h.lsn then
      -- Nothing counts, and an unknown SKU gets no hash.
      changed = false
    end
    for i = 0, e.nc - 1 do
      local c = counted(ARGV[e.c + 2 * i], stocked)
      local n = tonumber(ARGV[e.c + 2 * i + 1])
      if c then
        if h.counters[c] == nil then
          h.counters[c] = qty(redis.call('HGET', key, c)) or 0
        end
        h.counters[c] = h.counters[c] + n
        if not h.cdirty then h.cdirty = {} end
        h.cdirty[c] = true
      end
    end
    if e.nb > 0 or e.nu > 0 then apply_windows(key, e, h) end
    if changed then
      h.lsn = e.l; h.piece = e.p; h.ts = e.t
      h.written = true
    end
  end
end

-- Pass 3: write back, and index what changed (score: the commit LSN; only ever raised,
-- so a replay changes nothing; doubles are exact below 2^53 bytes of WAL).
local changed_list = {}
for i = 1, #order do
  local ki = order[i]
  local h = hs[ki]
  if h.written then
    write(KEYS[ki], h)
  end
  if cluster then
    -- every fenced hash's LSN, in KEYS order ('' for none): written now or by an earlier
    -- call whose caller crashed before indexing it (its replay is skipped here)
    changed_list[#changed_list + 1] = h.lsn or ''
  elseif h.written then
    changed_list[#changed_list + 1] = h.lsn
    changed_list[#changed_list + 1] = KEYS[ki]
  end
end
if not cluster then
  local ci = 1
  while ci <= #changed_list do
    local cj = math.min(#changed_list, ci + CHUNK - 1)
    redis.call('ZADD', changes_key, 'GT', unpack(changed_list, ci, cj))
    ci = cj + 1
  end
  if alerts_raised > 0 then
    local cutoff = 0
    if history_ms > 0 then
      local t = redis.call('TIME')
      cutoff = math.max(0, tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) - history_ms)
    end
    trim_history(alerts_key, tonumber(history), cutoff)
  end
end

if batch_end ~= '' then
  local cur = redis.call('HGET', KEYS[1], 'applied_lsn')
  if not cur or lsn_lt(cur, batch_end) then
    redis.call('HSET', KEYS[1], 'applied_lsn', batch_end)
  end
end

if cluster then
  return {applied, skipped, alerts_raised, changed_list, raised}
end
return {applied, skipped, alerts_raised}
