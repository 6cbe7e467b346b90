// skusync live page. The consumer is skusync's client library (clients/js, copied to
// skusync-client/ by stack.sh): it orders states by `rev`, drops duplicate alerts and
// catches up over the [api] HTTP endpoints after every reconnect (docs/mobile.md). This
// file only wires it up (the first part, a sample for app developers) and draws.
import { createClient } from './skusync-client/index.js';

// from config.js: e.g. "ws://127.0.0.1:9001", "http://127.0.0.1:8081", "shop"
const { url, api, prefix } = window.SKUSYNC_DEMO;

// ============================ the consumer (the sample) ============================

const client = createClient({
  mqttUrl: url, // MQTT over WebSocket
  apiUrl: api, // skusync's [api]: catch-up after every (re)connect
  prefix,
  // mqtt.js's browser bundle (mqtt.min.js) defines the global `mqtt`
  connect: (u, options) => window.mqtt.connect(u, options),
  // One retained message per SKU arrives right after subscribing: thousands at once. At
  // QoS 1 the broker queues them per client (mosquitto: max_queued_messages, default
  // 1000, drops the rest), so size that limit for your catalogue; the catch-up over
  // HTTP fills in what was dropped.
  mqtt: { reconnectPeriod: 1000 },
});
client.onConnection((state) => onConnection(state));
client.onStatus((text) => onStatus(text)); // <prefix>/status: online / offline
// every accepted change, in rev order; state null: the SKU is gone
client.onState((sku, state, info) => (state ? onState(sku, state, info) : onDeleted(sku)));
client.onAlert((alert) => onAlert(alert)); // each alert once, live or from the history
client.onError((e) => console.warn('skusync client:', e.message)); // retried / dropped, not fatal
let catchUps = 0;
client.onCatchUp(() => { catchUps++; });
window.demo = { client, get catchUps() { return catchUps; } }; // for the console and the browser test

// ================================== drawing ==================================

const $ = (sel) => document.querySelector(sel);
const TOP = 20; // busiest SKUs shown below the pinned ones
const names = {}; // SKU -> product name (products.json, optional)
const pins = [];
const rows = new Map(); // SKU -> <tr> currently in the table
let locations = []; // warehouse columns
let messages = 0;
const lags = []; // commit -> page latencies of recent live messages (ms)

$('#topics').textContent = `${prefix}/sku/+, ${prefix}/alerts/+, ${prefix}/status`;
fetch('products.json').then((r) => r.json()).then((m) => { Object.assign(names, m || {}); relabel(); }).catch(() => {});

function onConnection(state) {
  const el = $('#conn');
  el.dataset.state = state;
  el.textContent = state === 'connected' ? `broker: connected (${url})`
    : state === 'connecting' ? 'broker: connecting…' : 'broker: offline, reconnecting…';
}
function onStatus(text) {
  const el = $('#daemon');
  el.dataset.state = text;
  el.textContent = `skusync: ${text}`;
}

function onState(sku, state, info) {
  messages++;
  // latency only of live changes following the state we held (not retained or HTTP ones)
  if (info.delta && state.ts) { lags.push(Date.now() - Date.parse(state.ts)); if (lags.length > 50) lags.shift(); }
  let newLoc = false;
  for (const loc of Object.keys(state.locations || {})) {
    if (!locations.includes(loc)) { locations.push(loc); newLoc = true; }
  }
  if (newLoc) { locations.sort(); rebuild(); }
  const tr = rows.get(sku);
  if (tr) fill(tr, state, info.previous, info.delta);
  else if (rows.size < TOP + pins.length && !arrangeSoon) arrangeSoon = setTimeout(() => { arrangeSoon = null; arrange(); }, 300);
}
let arrangeSoon = null;

function onDeleted(sku) {
  const tr = rows.get(sku);
  if (tr && !pins.includes(sku)) { tr.remove(); rows.delete(sku); }
  else if (tr) fill(tr, null, null, null);
}

function onAlert(a) {
  const li = document.createElement('li');
  li.className = a.type;
  const label = { low_stock: 'low stock', out_of_stock: 'out of stock', back_in_stock: 'back in stock' }[a.type] || a.type;
  li.innerHTML = `<span class="t"></span> <span class="s"></span><small></small>`;
  li.querySelector('.t').textContent = label;
  li.querySelector('.s').textContent = `${a.sku}${names[a.sku] ? ' · ' + names[a.sku] : ''}`;
  li.querySelector('small').textContent =
    `available ${a.available}${a.threshold != null ? ` (threshold ${a.threshold})` : ''} · ${time(a.ts)} UTC`;
  const list = $('#alerts');
  list.prepend(li);
  while (list.children.length > 100) list.lastChild.remove();
}

// --- table ---
function columns() {
  return [
    ['sku', 'SKU'], ['available', 'available'], ['on_hand', 'on hand'], ['reserved', 'reserved'],
    ...locations.map((l) => [`loc:${l}`, l]),
    // sold 1h is also the sell rate per hour (sell_rate_per_h): one column for both
    ['views_5m', 'views 5m'], ['carts_1h', 'carts 1h'], ['purchases_1h', 'sold 1h'],
    ['stockout_eta_s', 'stockout in'], ['ts', 'updated (UTC)'],
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
  fill(tr, client.state(sku), null, null);
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

const sold1h = (s) => s.purchases_1h ?? s.sell_rate_per_h;

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
    } else if (f === 'purchases_1h') {
      const v = sold1h(s), b = before && sold1h(before);
      setCell(td, v != null ? String(v) : '0', v != null && b != null ? Math.sign(v - b) : 0);
    } else if (f === 'ts') {
      td.textContent = time(s.ts); // no flash: changes with every message
    } else {
      setCell(td, s[f] != null ? String(s[f]) : '0', dirOf(f));
    }
  }
  // what the last alert moved the SKU to, as skusync holds it: also right for a SKU that
  // recovered without an alert (low -> ok) and on a page opened after the alert
  if (s) tr.dataset.alert = s.alert_state || 'ok';
  else delete tr.dataset.alert;
}

// Which rows to show: pinned SKUs, then the busiest ones. Re-ranked every 2 s so rows
// do not jump around on every message.
function score(s) {
  return (s.purchases_1h || 0) * 10 + (s.carts_1h || 0) * 3 + (s.views_5m || 0);
}
function arrange() {
  const busiest = [...client.states()]
    .filter(([sku]) => !pins.includes(sku))
    .sort((a, b) => score(b[1]) - score(a[1]) || (a[0] < b[0] ? -1 : 1))
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
// UTC, 24-hour, like every other time skusync shows
function time(ts) {
  const d = new Date(ts ?? NaN);
  return Number.isNaN(d.getTime()) ? '' : d.toISOString().slice(11, 19);
}
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
  $('#stats').textContent = `${client.states().size} SKUs · ${rate.toFixed(1)} msg/s` +
    (lags.length ? ` · commit→page median ${[...lags].sort((a, b) => a - b)[lags.length >> 1]} ms` : '');
}, 2000);
rebuild();
