// Test doubles: skusync's payloads, a fake broker (the mqtt.js client surface the library
// uses), a fake `[api]` server on node:http, and a tiny CBOR encoder.
import { EventEmitter } from 'node:events';
import http from 'node:http';

const hex = (n, width) => n.toString(16).padStart(width, '0');

/** A rev: 16 hex digits of the LSN, 8 of the piece, 11 of the unix ms. */
export function rev(lsn, piece = 0, ms = 1_764_061_200_000) {
  return hex(BigInt(lsn), 16) + hex(piece, 8) + hex(ms, 11);
}

/** The stored version (`delta_from`) of a rev. */
export const stored = (r) => r.slice(0, 24);

/** A format-2 state; `base` (a rev) adds delta_from; `delta` the delta. */
export function state(sku, r, values = {}, { base, delta, asOf } = {}) {
  const s = { v: 2, sku, rev: r, on_hand: 10, reserved: 0, available: 10, threshold: 5, alert_state: 'ok', ...values };
  if (base) {
    s.delta = delta ?? { on_hand: -1, available: -1 };
    s.delta_from = stored(base);
  }
  if (asOf) s.as_of = asOf;
  s.lsn = '0/1';
  s.ts = '2026-11-25T09:00:00.123Z';
  return s;
}

export const gone = (sku, r) => ({ v: 2, sku, gone: true, rev: r });

export function alert(sku, seq, type = 'low_stock', lsn = '0/1') {
  return { v: 2, id: `${lsn}:${type}:${sku}`, seq, type, sku, available: 4, threshold: 5, lsn, ts: '2026-11-25T09:00:00.123Z' };
}

export const json = (v) => new TextEncoder().encode(JSON.stringify(v));

const compareSeq = (a, b) => {
  const [am, an] = a.split('-').map(BigInt);
  const [bm, bn] = b.split('-').map(BigInt);
  return am === bm ? (an < bn ? -1 : an > bn ? 1 : 0) : am < bm ? -1 : 1;
};

// ---- a fake broker -------------------------------------------------------------------

const matches = (filter, topic) => {
  const f = filter.split('/');
  const t = topic.split('/');
  for (let i = 0; i < f.length; i++) {
    if (f[i] === '#') return true;
    if (i >= t.length || (f[i] !== '+' && f[i] !== t[i])) return false;
  }
  return f.length === t.length;
};

/**
 * One broker, one client at a time. Keeps retained messages; delivers to the client while
 * it is connected and subscribed (retained ones right after the SUBACK, like mosquitto).
 */
export class FakeBroker {
  retained = new Map(); // topic -> [payload, properties]
  client = null;
  options = null;
  subscriptions = []; // every subscribe call: topic lists
  ended = false;

  connect = (url, options) => {
    this.url = url;
    this.options = options;
    this.client = new FakeMqttClient(this);
    return this.client;
  };

  /** Connects (or reconnects) the client; `sessionPresent`: the broker kept its session. */
  up({ sessionPresent = false } = {}) {
    const c = this.client;
    c.online = true;
    if (!sessionPresent) c.filters = [];
    c.emit('connect', { sessionPresent });
  }

  down() {
    this.client.online = false;
    this.client.emit('close');
  }

  /** Publishes; retained when `retain`; an empty retained payload clears. */
  publish(topic, payload, properties = {}, { retain = false } = {}) {
    if (retain) {
      if (payload.length === 0) this.retained.delete(topic);
      else this.retained.set(topic, [payload, properties]);
    }
    const c = this.client;
    if (c && c.online && c.filters.some((f) => matches(f, topic))) {
      c.emit('message', topic, Buffer.from(payload), { properties });
    }
  }

  publishState(prefix, s, { topicSku } = {}) {
    this.publish(`${prefix}/sku/${topicSku ?? s.sku}`, json(s), { contentType: 'application/json', userProperties: { rev: s.rev } }, { retain: true });
  }

  publishGone(prefix, topicSku, r) {
    this.publish(`${prefix}/sku/${topicSku}`, new Uint8Array(0), r ? { userProperties: { rev: r } } : {}, { retain: true });
  }

  publishAlert(prefix, a, topicSku) {
    this.publish(`${prefix}/alerts/${topicSku ?? a.sku}`, json(a), { contentType: 'application/json', userProperties: { seq: a.seq } });
  }
}

class FakeMqttClient extends EventEmitter {
  online = false;
  filters = [];
  constructor(broker) {
    super();
    this.broker = broker;
  }
  subscribe(topics, opts, cb) {
    this.broker.subscriptions.push({ topics: [...topics], opts });
    this.filters.push(...topics);
    setImmediate(() => {
      cb?.(null, topics.map((topic) => ({ topic, qos: opts.qos })));
      for (const [topic, [payload, properties]] of this.broker.retained) {
        if (this.online && topics.some((f) => matches(f, topic))) this.emit('message', topic, Buffer.from(payload), { properties });
      }
    });
    return this;
  }
  end(force, opts, cb) {
    this.online = false;
    this.broker.ended = true;
    setImmediate(() => cb?.());
    return this;
  }
}

// ---- a fake [api] ----------------------------------------------------------------------

/**
 * skusync's `/v1/changes` and `/v1/alerts` over an in-memory change index: per SKU its
 * latest state or gone object and the position of its last change. Tokens are `c<pos>`.
 * `failures` is a queue of answers to give instead of the next requests.
 */
export class FakeApi {
  pos = 0;
  latest = new Map(); // sku -> { pos, item }
  minPos = 0; // tokens before this answer 410 (the index was rebuilt)
  alerts = [];
  alertMin = null; // a since before this seq answers 410
  requests = []; // { path, since, limit, auth }
  failures = []; // { status, retryAfter?, body? } | 'reset'
  token = null; // required bearer token

  set(...items) {
    for (const item of items) this.latest.set(item.sku, { pos: ++this.pos, item });
  }

  /** The change index is rebuilt: older tokens answer 410, gone SKUs are forgotten. */
  rebuild() {
    for (const [sku, e] of this.latest) if (e.item.gone) this.latest.delete(sku);
    this.minPos = this.pos;
  }

  /** A SKU disappears without a trace (only a full listing can tell). */
  forget(sku) {
    this.latest.delete(sku);
  }

  current() {
    return new Map([...this.latest].filter(([, e]) => !e.item.gone).map(([sku, e]) => [sku, e.item]));
  }

  #changes(since, limit) {
    let from = 0;
    if (since !== null) {
      const m = /^c(\d+)$/.exec(since);
      if (!m) return [400, { error: 'bad since' }];
      from = Number(m[1]);
      if (from < this.minPos) return [410, { error: 'token too old' }];
    }
    const all = [...this.latest.values()]
      .filter((e) => e.pos > from && (since !== null || !e.item.gone))
      .sort((a, b) => a.pos - b.pos);
    const page = all.slice(0, limit);
    const more = all.length > limit;
    return [200, { changes: page.map((e) => e.item), next: `c${more ? page.at(-1).pos : this.pos}`, more }];
  }

  #alerts(since, limit) {
    if (since !== null && this.alertMin !== null && compareSeq(since, this.alertMin) < 0) return [410, { error: 'seq too old' }];
    const all = this.alerts.filter((a) => since === null || compareSeq(a.seq, since) > 0);
    const page = all.slice(0, limit);
    const more = all.length > limit;
    const next = page.length ? page.at(-1).seq : since ?? (this.alerts.at(-1)?.seq ?? '0-0');
    return [200, { alerts: page, next, more }];
  }

  handle(req, res) {
    const url = new URL(req.url, 'http://x');
    const since = url.searchParams.get('since');
    const limit = Number(url.searchParams.get('limit') ?? 500);
    this.requests.push({ path: url.pathname, since, limit, auth: req.headers.authorization ?? null });
    const send = (status, body, headers = {}) => {
      res.writeHead(status, { 'content-type': 'application/json', ...headers });
      res.end(JSON.stringify(body));
    };
    const f = this.failures.shift();
    if (f === 'reset') return req.socket.destroy();
    if (f) return send(f.status, f.body ?? { error: 'injected' }, f.retryAfter !== undefined ? { 'retry-after': f.retryAfter } : {});
    if (this.token && req.headers.authorization !== `Bearer ${this.token}`) return send(401, { error: 'bad token' });
    if (url.pathname === '/v1/changes') return send(...this.#changes(since, limit));
    if (url.pathname === '/v1/alerts') return send(...this.#alerts(since, limit));
    send(404, { error: 'no such path' });
  }

  /** Starts the server; resolves with its base URL. */
  async listen() {
    this.server = http.createServer((req, res) => this.handle(req, res));
    await new Promise((r) => this.server.listen(0, '127.0.0.1', r));
    return `http://127.0.0.1:${this.server.address().port}`;
  }

  close() {
    this.server?.closeAllConnections?.();
    return new Promise((r) => (this.server ? this.server.close(() => r()) : r()));
  }
}

// ---- waiting -------------------------------------------------------------------------------

export async function waitFor(pred, what = 'condition', timeoutMs = 5000) {
  const t0 = Date.now();
  while (!pred()) {
    if (Date.now() - t0 > timeoutMs) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 5));
  }
}

/** Resolves with the next onCatchUp result. */
export function nextCatchUp(client, timeoutMs = 5000) {
  return new Promise((resolve, reject) => {
    const t = setTimeout(() => { off(); reject(new Error('no catch-up')); }, timeoutMs);
    const off = client.onCatchUp((r) => { clearTimeout(t); off(); resolve(r); });
  });
}

// ---- CBOR encoder (for test payloads) -------------------------------------------------------

export function cbor(v) {
  const out = [];
  const head = (major, n) => {
    if (n < 24) out.push((major << 5) | n);
    else if (n < 0x100) out.push((major << 5) | 24, n);
    else if (n < 0x10000) out.push((major << 5) | 25, n >> 8, n & 0xff);
    else if (n < 0x100000000) out.push((major << 5) | 26, (n >>> 24) & 0xff, (n >>> 16) & 0xff, (n >>> 8) & 0xff, n & 0xff);
    else {
      const b = new DataView(new ArrayBuffer(8));
      b.setBigUint64(0, BigInt(n));
      out.push((major << 5) | 27, ...new Uint8Array(b.buffer));
    }
  };
  const enc = (x) => {
    if (x === null) out.push(0xf6);
    else if (x === true) out.push(0xf5);
    else if (x === false) out.push(0xf4);
    else if (typeof x === 'number' && Number.isInteger(x)) x >= 0 ? head(0, x) : head(1, -1 - x);
    else if (typeof x === 'number') {
      const b = new DataView(new ArrayBuffer(8));
      b.setFloat64(0, x);
      out.push(0xfb, ...new Uint8Array(b.buffer));
    } else if (typeof x === 'string') {
      const bytes = new TextEncoder().encode(x);
      head(3, bytes.length);
      out.push(...bytes);
    } else if (Array.isArray(x)) {
      head(4, x.length);
      x.forEach(enc);
    } else {
      const keys = Object.keys(x);
      head(5, keys.length);
      for (const k of keys) { enc(k); enc(x[k]); }
    }
  };
  enc(v);
  return new Uint8Array(out);
}
