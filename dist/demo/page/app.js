// skusync live page. The first part is a complete, minimal MQTT consumer of skusync's
// topics, written to be read as a sample by mobile developers; the rest only draws it.
'use strict';

const { url, prefix } = window.SKUSYNC_DEMO; // from config.js, e.g. "ws://127.0.0.1:9001", "shop"

// ============================ MQTT consumer (the sample) ============================
//
// Topics (see skusync's src/sinks/mqtt/mod.rs):
//   <prefix>/sku/<SKU>     retained JSON state of one SKU; an empty payload = SKU deleted
//   <prefix>/alerts/<SKU>  low_stock / out_of_stock / back_in_stock events (at least once)
//   <prefix>/status        retained "online" / "offline" (skusync's last will)

// A topic level holds the SKU percent-encoded: "%XX" is one byte, everything else is
// printable ASCII, and "%" alone is the empty SKU. The bytes are UTF-8.
function decodeSku(level) {
  if (level === '%') return '';
  const bytes = [];
  for (let i = 0; i < level.length; i++) {
    if (level[i] === '%') { bytes.push(parseInt(level.slice(i + 1, i + 3), 16)); i += 2; }
    else bytes.push(level.charCodeAt(i));
  }
  return new TextDecoder().decode(new Uint8Array(bytes));
}

// LSNs "X/Y" (two hex halves) order messages; compare them as 64-bit numbers.
const lsnValue = (s) => { const [hi, lo] = s.split('/'); return (BigInt('0x' + hi) << 32n) | BigInt('0x' + lo); };

const held = new Map(); // SKU -> { lsn: BigInt, state: the last JSON payload }
const seenAlerts = new Set(); // alert ids (alerts may be delivered twice)

const client = mqtt.connect(url, { clean: true, reconnectPeriod: 1000 });
client.on('connect', () => {
  onConnection('connected');
  // One retained message per SKU arrives right after subscribing: thousands at once. At
  // QoS 1 the broker queues them per client (mosquitto: max_queued_messages, default
  // 1000, drops the rest), so size that limit for your catalogue.
  client.subscribe([`${prefix}/status`, `${prefix}/sku/+`, `${prefix}/alerts/+`], { qos: 1 });
});
client.on('close', () => onConnection('offline'));

client.on('message', (topic, payload) => {
  const text = new TextDecoder().decode(payload);
  const [kind, level] = topic.slice(prefix.length + 1).split('/');
  if (kind === 'status') return onStatus(text);
  const sku = decodeSku(level);
  if (kind === 'alerts') {
    const alert = JSON.parse(text);
    if (seenAlerts.has(alert.id)) return; // duplicate delivery
    seenAlerts.add(alert.id);
    return onAlert(sku, alert);
  }
  if (kind !== 'sku') return;
  if (text === '') { held.delete(sku); return onDeleted(sku); } // retained state cleared
  const state = JSON.parse(text);
  const before = held.get(sku);
  const lsn = lsnValue(state.lsn);
  if (before && lsn < before.lsn) return; // older than what we show: a late redelivery
  // Values are absolute, so a message is always safe to take as is. Its `delta` is
  // relative to `prev_lsn`: only meaningful when that is the state we hold.
  const delta = before && state.prev_lsn && lsnValue(state.prev_lsn) === before.lsn ? state.delta : null;
  held.set(sku, { lsn, state });
  onState(sku, state, before ? before.state : null, delta);
});

// ================================== drawing ==================================

const $ = (sel) => document.querySelector(sel);
const TOP = 20; // busiest SKUs shown below the pinned ones
const names = {}; // SKU -> product name (products.json, optional)
const pins = [];
const rows = new Map(); // SKU -> <tr> currently in the table
const alertState = new Map(); // SKU -> low | out | ok, from alerts
let locations = []; // warehouse columns
let messages = 0;
const lags = []; // commit -> page latencies of recent messages (ms)

$('#topics').textContent = `${prefix}/sku/+, ${prefix}/alerts/+, ${prefix}/status`;
fetch('products.json').then((r) => r.json()).then((m) => { Object.assign(names, m || {}); relabel(); }).catch(() => {});

function onConnection(state) {
  const el = $('#conn');
  el.dataset.state = state;
  el.textContent = state === 'connected' ? `broker: connected (${url})` : 'broker: offline, reconnecting…';
}
function onStatus(text) {
  const el = $('#daemon');
  el.dataset.state = text;
  el.textContent = `skusync: ${text}`;
}

function onState(sku, state, before, delta) {
  messages++;
  if (!state.as_of && state.ts && state.prev_lsn) { lags.push(Date.now() - Date.parse(state.ts)); if (lags.length > 50) lags.shift(); }
  let newLoc = false;
  for (const loc of Object.keys(state.locations || {})) {
    if (!locations.includes(loc)) { locations.push(loc); newLoc = true; }
  }
  if (newLoc) { locations.sort(); rebuild(); }
  const tr = rows.get(sku);
  if (tr) fill(tr, state, before, delta);
  else if (rows.size < TOP + pins.length && !arrangeSoon) arrangeSoon = setTimeout(() => { arrangeSoon = null; arrange(); }, 300);
}
let arrangeSoon = null;

function onDeleted(sku) {
  const tr = rows.get(sku);
  if (tr && !pins.includes(sku)) { tr.remove(); rows.delete(sku); }
  else if (tr) fill(tr, null, null, null);
}

function onAlert(sku, a) {
  alertState.set(sku, { low_stock: 'low', out_of_stock: 'out', back_in_stock: 'ok' }[a.type] || 'ok');
  const tr = rows.get(sku);
  if (tr) tr.dataset.alert = alertState.get(sku);
  const li = document.createElement('li');
  li.className = a.type;
  const label = { low_stock: 'low stock', out_of_stock: 'out of stock', back_in_stock: 'back in stock' }[a.type] || a.type;
  li.innerHTML = `<span class="t"></span> <span class="s"></span><small></small>`;
  li.querySelector('.t').textContent = label;
  li.querySelector('.s').textContent = `${a.sku}${names[a.sku] ? ' · ' + names[a.sku] : ''}`;
  li.querySelector('small').textContent =
    `available ${a.available}${a.threshold != null ? ` (threshold ${a.threshold})` : ''} · ${time(a.ts)}`;
  const list = $('#alerts');
  list.prepend(li);
  while (list.children.length > 100) list.lastChild.remove();
}

// --- table ---
function columns() {
  return [
    ['sku', 'SKU'], ['available', 'available'], ['on_hand', 'on hand'], ['reserved', 'reserved'],
    ...locations.map((l) => [`loc:${l}`, l]),
    ['views_5m', 'views 5m'], ['carts_1h', 'carts 1h'], ['purchases_1h', 'sold 1h'],
    ['sell_rate_per_h', 'sell rate/h'], ['stockout_eta_s', 'stockout in'], ['ts', 'updated'],
  ];
}

function rebuild() {
  $('#head').innerHTML = '';
  for (const [, title] of columns()) {
    const th = document.createElement('th');
    th.textContent = title;
    $('#head').append(th);
  }
  for (const tr of rows.values()) tr.remove();
  rows.clear();
  arrange();
}

function makeRow(sku) {
  const tr = document.createElement('tr');
  tr.dataset.sku = sku;
  for (const [field] of columns()) {
    const td = document.createElement('td');
    td.dataset.field = field;
    if (field === 'sku') {
      td.className = 'sku';
      td.innerHTML = '<b></b><small></small>';
      td.querySelector('b').textContent = sku;
    } else if (field.startsWith('loc:')) td.className = 'loc';
    tr.append(td);
  }
  if (alertState.has(sku)) tr.dataset.alert = alertState.get(sku);
  const h = held.get(sku);
  fill(tr, h ? h.state : null, null, null);
  return tr;
}

function relabel() {
  for (const [sku, tr] of rows) {
    tr.querySelector('td.sku small').textContent = names[sku] || '';
    tr.querySelector('td.sku b').textContent = sku + (pins.includes(sku) ? ' ★' : '');
  }
}

// Sets a cell's text; when it changed, restarts the flash animation (green up, red down).
function setCell(td, text, dir) {
  if (td.textContent === text) return;
  const first = td.textContent === '';
  td.textContent = text;
  if (first) return;
  td.classList.remove('flash', 'flash-up', 'flash-down');
  void td.offsetWidth; // restart the CSS animation
  td.classList.add(dir > 0 ? 'flash-up' : dir < 0 ? 'flash-down' : 'flash');
}

function fill(tr, s, before, delta) {
  const num = (st, f) => (st && typeof st[f] === 'number' ? st[f] : null);
  const dirOf = (f) => {
    if (delta && typeof delta[f] === 'number') return Math.sign(delta[f]);
    const a = num(before, f), b = num(s, f);
    return a == null || b == null ? 0 : Math.sign(b - a);
  };
  for (const td of tr.children) {
    const f = td.dataset.field;
    if (f === 'sku') { td.querySelector('small').textContent = names[tr.dataset.sku] || ''; continue; }
    if (!s) { setCell(td, f === 'available' ? 'waiting…' : '', 0); continue; }
    if (f.startsWith('loc:')) {
      const l = (s.locations || {})[f.slice(4)];
      const b = before && (before.locations || {})[f.slice(4)];
      const text = l ? `${l.on_hand - l.reserved}` + (l.reserved ? ` (${l.reserved} res.)` : '') : '–';
      setCell(td, text, l && b ? Math.sign((l.on_hand - l.reserved) - (b.on_hand - b.reserved)) : 0);
    } else if (f === 'stockout_eta_s') {
      setCell(td, s.stockout_eta_s != null ? duration(s.stockout_eta_s) : '–', 0);
    } else if (f === 'sell_rate_per_h') {
      setCell(td, s.sell_rate_per_h != null ? String(s.sell_rate_per_h) : '–', dirOf(f));
    } else if (f === 'ts') {
      td.textContent = time(s.ts); // no flash: changes with every message
    } else {
      setCell(td, s[f] != null ? String(s[f]) : '0', dirOf(f));
    }
  }
  if (s) {
    const a = alertState.get(tr.dataset.sku);
    tr.dataset.alert = s.available <= 0 ? 'out' : a === 'out' ? 'ok' : a || 'ok';
  }
}

// Which rows to show: pinned SKUs, then the busiest ones. Re-ranked every 2 s so rows
// do not jump around on every message.
function score(s) {
  return (s.purchases_1h || 0) * 10 + (s.carts_1h || 0) * 3 + (s.views_5m || 0);
}
function arrange() {
  const busiest = [...held.entries()]
    .filter(([sku]) => !pins.includes(sku))
    .sort((a, b) => score(b[1].state) - score(a[1].state) || (a[0] < b[0] ? -1 : 1))
    .slice(0, TOP)
    .map(([sku]) => sku);
  const want = [...pins, ...busiest];
  for (const [sku, tr] of rows) if (!want.includes(sku)) { tr.remove(); rows.delete(sku); }
  const body = $('#rows');
  want.forEach((sku, i) => {
    let tr = rows.get(sku);
    if (!tr) { tr = makeRow(sku); rows.set(sku, tr); }
    if (body.children[i] !== tr) body.insertBefore(tr, body.children[i] || null);
  });
  relabel();
}

function pin(sku) {
  sku = sku.trim();
  if (sku === '' || pins.includes(sku)) return;
  pins.unshift(sku);
  arrange();
}
$('#pin-form').addEventListener('submit', (e) => { e.preventDefault(); pin($('#pin').value); $('#pin').value = ''; });
new URLSearchParams(location.search).getAll('pin').forEach((p) => p.split(',').forEach(pin));

// helpers
function time(ts) { return ts ? new Date(ts).toLocaleTimeString() : ''; }
function duration(sec) {
  if (sec < 60) return `${Math.round(sec)} s`;
  if (sec < 3600) return `${Math.round(sec / 60)} min`;
  if (sec < 86400 * 2) return `${(sec / 3600).toFixed(1)} h`;
  return `${Math.round(sec / 86400)} d`;
}

let lastCount = 0;
setInterval(() => {
  arrange();
  const rate = (messages - lastCount) / 2;
  lastCount = messages;
  $('#stats').textContent = `${held.size} SKUs · ${rate.toFixed(1)} msg/s` +
    (lags.length ? ` · commit→page median ${[...lags].sort((a, b) => a - b)[lags.length >> 1]} ms` : '');
}, 2000);
rebuild();
