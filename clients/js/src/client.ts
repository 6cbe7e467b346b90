// The client: mqtt.js for live states and alerts, fetch for catch-up over `[api]`, the
// Store for every ordering rule. Follows "How a client follows the contract" in
// docs/mobile.md step by step.

import { checkAlert, checkItem, parseMessage, type MessageProperties } from './message.js';
import { Store, type Alert, type Change, type FullMark, type Info, type State } from './store.js';
import { alertTopic, skuTopic } from './topic.js';

/** The part of an mqtt.js client this library uses (inject a fake one in tests). */
export interface MqttClientLike {
  on(event: string, listener: (...args: any[]) => void): unknown;
  subscribe(
    topics: string[],
    options: { qos: 0 | 1 | 2 },
    callback?: (err?: Error | null, granted?: unknown) => void,
  ): unknown;
  end(force?: boolean, options?: object, callback?: () => void): unknown;
}

/** mqtt.js's `connect`. */
export type ConnectFn = (url: string, options: Record<string, unknown>) => MqttClientLike;

/** Where the catch-up tokens survive a restart (e.g. over localStorage); may be async. */
export interface TokenStorage {
  get(key: string): string | null | undefined | Promise<string | null | undefined>;
  set(key: string, value: string): void | Promise<void>;
}

export interface ClientOptions {
  /** The broker, e.g. `wss://broker.example.com/mqtt` (browser) or `mqtts://...`. */
  mqttUrl: string;
  /** skusync's `[api]` base URL; without it there is no catch-up (MQTT only). */
  apiUrl?: string;
  /** `[mqtt] topic_prefix` (default `skusync`). */
  prefix?: string;
  /** Follow only these SKUs (default: all). */
  skus?: string[];
  /** Bearer token for the API. */
  token?: string;
  /** Extra mqtt.js options (username, password, clientId, clean, ...). */
  mqtt?: Record<string, unknown>;
  /** Persistence of the catch-up tokens. */
  storage?: TokenStorage;
  /** mqtt.js's connect; default: the global `mqtt` (browser bundle), else `import('mqtt')`. */
  connect?: ConnectFn;
  /** Default: the global fetch. */
  fetch?: typeof fetch;
  /** Catch-up retry back-off (network errors, 5xx, 429): from minMs doubling to maxMs. */
  retry?: { minMs?: number; maxMs?: number };
  /** `limit` of each `/v1/...` page (default: the server's, 100). */
  pageSize?: number;
  /** How many alert ids to remember for dedupe (default 10,000). */
  alertIdLimit?: number;
  /**
   * After a live alert, a catch-up this many ms later (default 2000) moves the stored
   * alert position past it: live alerts never move it themselves (they arrive in no seq
   * order), and a restarted process would report them again from an older position.
   */
  alertFollowMs?: number;
}

export type StateListener = (sku: string, state: State | null, info: Info) => void;
export type AlertListener = (alert: Alert) => void;
export type ConnectionState = 'connecting' | 'connected' | 'offline';

/** What one catch-up did: changes and alerts taken (not counting ignored ones). */
export interface CatchUpResult {
  changes: number;
  alerts: number;
  /** It listed every SKU (first catch-up, or its token answered 410). */
  full: boolean;
}

export interface SkusyncClient {
  /** Every accepted state change; `state` null: the SKU is gone. Returns an unsubscribe. */
  onState(cb: StateListener): () => void;
  /** Every new alert (duplicates dropped), from MQTT and from catch-up. */
  onAlert(cb: AlertListener): () => void;
  /** skusync's retained status: `online` / `offline`. */
  onStatus(cb: (status: string) => void): () => void;
  /** The broker connection. */
  onConnection(cb: (state: ConnectionState) => void): () => void;
  /** After each completed catch-up. */
  onCatchUp(cb: (result: CatchUpResult) => void): () => void;
  /** Dropped messages, failed catch-ups (retried), storage and MQTT errors. */
  onError(cb: (error: Error) => void): () => void;
  /** The SKU's state, null when unknown or gone. */
  state(sku: string): State | null;
  /** All present SKUs (a new Map). */
  states(): Map<string, State>;
  /** Runs a catch-up now (e.g. when an app returns to the foreground). */
  catchUp(): Promise<void>;
  /** Disconnects and stops catch-up. */
  close(): Promise<void>;
}

/** A failed `/v1/...` request. `retryable`: network, 5xx or 429. */
export class ApiError extends Error {
  constructor(
    message: string,
    readonly status: number | null,
    readonly retryable: boolean,
    readonly retryAfterMs: number | null = null,
  ) {
    super(message);
    this.name = 'ApiError';
  }
}

export function createClient(options: ClientOptions): SkusyncClient {
  return new Client(options);
}

type Listeners = {
  state: Set<StateListener>;
  alert: Set<AlertListener>;
  status: Set<(s: string) => void>;
  connection: Set<(s: ConnectionState) => void>;
  catchUp: Set<(r: CatchUpResult) => void>;
  error: Set<(e: Error) => void>;
};

class Client implements SkusyncClient {
  readonly #o: ClientOptions;
  readonly #prefix: string;
  readonly #skus: Set<string> | null;
  readonly #store: Store;
  readonly #fetch: typeof fetch;
  readonly #abort = new AbortController();
  readonly #on: Listeners = {
    state: new Set(), alert: new Set(), status: new Set(), connection: new Set(), catchUp: new Set(), error: new Set(),
  };
  readonly #tokensLoaded: Promise<void>;
  #mqtt: MqttClientLike | null = null;
  #closed = false;
  // catch-up: one at a time; a request while one runs makes it run once more
  #pending = false;
  #running: Promise<void> | null = null;
  /** A full listing under way; `reset`: it follows a 410 (see `Store.applyState`). */
  #full: { mark: FullMark; listed: Set<string>; reset: boolean } | null = null;
  /** `/v1/changes` answered 410: the next full listing replaces what is held. */
  #afterGone = false;
  #wake: (() => void) | null = null;
  // MQTT connections so far, and the one whose SUBACK came
  #connected = false;
  #epoch = 0;
  #subscribed = 0;
  /** This process subscribed at least once (a resumed session alone sends no retained states). */
  #everSubscribed = false;
  /** The catch-up that follows live alerts (see `alertFollowMs`), when one is due. */
  #alertFollow: ReturnType<typeof setTimeout> | null = null;

  constructor(o: ClientOptions) {
    this.#o = o;
    this.#prefix = o.prefix ?? 'skusync';
    this.#skus = o.skus ? new Set(o.skus) : null;
    this.#store = new Store({ alertIdLimit: o.alertIdLimit });
    this.#fetch = o.fetch ?? ((...a: Parameters<typeof fetch>) => globalThis.fetch(...a));
    this.#tokensLoaded = this.#loadTokens();
    // asynchronous: the default connect may have to import mqtt.js
    void this.#start();
  }

  // ---- public -------------------------------------------------------------------

  onState(cb: StateListener) { return this.#add(this.#on.state, cb); }
  onAlert(cb: AlertListener) { return this.#add(this.#on.alert, cb); }
  onStatus(cb: (s: string) => void) { return this.#add(this.#on.status, cb); }
  onConnection(cb: (s: ConnectionState) => void) { return this.#add(this.#on.connection, cb); }
  onCatchUp(cb: (r: CatchUpResult) => void) { return this.#add(this.#on.catchUp, cb); }
  onError(cb: (e: Error) => void) { return this.#add(this.#on.error, cb); }
  state(sku: string) { return this.#store.state(sku); }
  states() { return this.#store.states(); }

  catchUp(): Promise<void> {
    this.#requestCatchUp();
    return this.#running ?? Promise.resolve();
  }

  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    if (this.#alertFollow) clearTimeout(this.#alertFollow);
    this.#abort.abort();
    this.#wake?.();
    const m = this.#mqtt;
    if (m) {
      // a clean DISCONNECT, unless the broker does not answer in time
      await new Promise<void>((resolve) => {
        const t = setTimeout(() => { m.end(true, {}, () => {}); resolve(); }, 2000);
        m.end(false, {}, () => { clearTimeout(t); resolve(); });
      });
    }
    await this.#running?.catch(() => {});
  }

  // ---- MQTT -----------------------------------------------------------------------

  async #start(): Promise<void> {
    // first let the caller register its listeners
    await Promise.resolve();
    let connect: ConnectFn;
    try {
      connect = this.#o.connect ?? (await defaultConnect());
    } catch (e) {
      this.#error(new Error(`cannot load mqtt.js (pass options.connect): ${errText(e)}`));
      return;
    }
    if (this.#closed) return;
    this.#emit(this.#on.connection, 'connecting');
    const m = connect(this.#o.mqttUrl, {
      protocolVersion: 5,
      reconnectPeriod: 1000,
      ...this.#o.mqtt,
      // we subscribe after every connect ourselves (catch-up must follow the SUBACK);
      // mqtt.js's own resubscribe would skip topics it believes it still has
      resubscribe: false,
    });
    this.#mqtt = m;
    m.on('connect', (connack?: { sessionPresent?: boolean }) => this.#onConnect(m, connack));
    m.on('close', () => {
      this.#connected = false;
      if (!this.#closed) this.#emit(this.#on.connection, 'offline');
    });
    m.on('error', (e: unknown) => this.#error(e instanceof Error ? e : new Error(errText(e))));
    m.on('message', (topic: string, payload: Uint8Array, packet?: { properties?: MessageProperties }) =>
      this.#onMessage(topic, payload, packet?.properties ?? {}));
  }

  #onConnect(m: MqttClientLike, connack?: { sessionPresent?: boolean }): void {
    if (this.#closed) return;
    this.#connected = true;
    const epoch = ++this.#epoch;
    this.#emit(this.#on.connection, 'connected');
    // a resumed session still has our subscriptions; the messages queued for it may
    // have been dropped though, so catch up anyway. Not on this process's first connect:
    // its store starts empty, and only a SUBSCRIBE makes the broker send the retained
    // states (a catch-up from a stored token lists only what changed since).
    if (connack?.sessionPresent && this.#everSubscribed) {
      this.#subscribed = epoch;
      this.#requestCatchUp(true);
      return;
    }
    const topics = this.#skus
      ? [...this.#skus].flatMap((s) => [skuTopic(this.#prefix, s), alertTopic(this.#prefix, s)])
      : [`${this.#prefix}/sku/+`, `${this.#prefix}/alerts/+`];
    topics.push(`${this.#prefix}/status`);
    // catch up once subscribed, so no change falls between the two
    m.subscribe(topics, { qos: 1 }, (err, granted) => {
      if (epoch === this.#epoch) this.#subscribed = epoch;
      if (!err) this.#everSubscribed = true;
      if (err) this.#error(new Error(`subscribe failed: ${errText(err)}`));
      else if (Array.isArray(granted) && granted.some((g) => typeof g?.qos === 'number' && g.qos >= 128)) {
        this.#error(new Error('subscribe refused by the broker for some topics'));
      }
      this.#requestCatchUp(true);
    });
  }

  #onMessage(topic: string, payload: Uint8Array, props: MessageProperties): void {
    if (this.#closed) return;
    let msg;
    try {
      msg = parseMessage(this.#prefix, topic, payload, props);
    } catch (e) {
      this.#error(new Error(`dropped message on ${topic}: ${errText(e)}`));
      return;
    }
    switch (msg.kind) {
      case 'status':
        this.#emit(this.#on.status, msg.text);
        return;
      case 'state':
      case 'alert':
        if (msg.sku !== msg.topicSku) {
          this.#error(new Error(`topic ${topic} carries SKU ${JSON.stringify(msg.sku)}: topic level encoding mismatch`));
        }
        if (!this.#wanted(msg.sku)) return;
        if (msg.kind === 'alert') {
          // never moves the alert cursor: live alerts of different SKUs arrive in no
          // seq order (each waits for its SKU's publish round), so one missed offline
          // may lie below a later one seen live
          if (this.#store.applyAlert(msg.alert)) {
            this.#emit(this.#on.alert, msg.alert);
            this.#followAlerts();
          }
        } else {
          this.#change(this.#store.applyState(msg.state));
        }
        return;
      case 'gone':
        if (this.#wanted(msg.sku)) this.#change(this.#store.applyGone(msg.sku, msg.rev));
        return;
      default:
        return;
    }
  }

  #change(c: Change | null): void {
    if (!c) return;
    for (const cb of this.#on.state) this.#call(() => cb(c.sku, c.state, c.info));
    // a gap: a message of this SKU was missed; others may have been too
    if (c.info.gap) this.#requestCatchUp();
  }

  #wanted(sku: string): boolean {
    return this.#skus === null || this.#skus.has(sku);
  }

  // ---- catch-up over HTTP -------------------------------------------------------------

  /** One catch-up a little after live alerts: its `/v1/alerts` pages move the position. */
  #followAlerts(): void {
    if (!this.#o.apiUrl || this.#closed || this.#alertFollow) return;
    this.#alertFollow = setTimeout(() => {
      this.#alertFollow = null;
      this.#requestCatchUp();
    }, this.#o.alertFollowMs ?? 2000);
  }

  #requestCatchUp(connected = false): void {
    if (!this.#o.apiUrl || this.#closed) return;
    this.#pending = true;
    // a (re)connect ends a back-off that waited for the network, not one the server asked for
    if (connected) this.#wake?.();
    if (!this.#running) this.#running = this.#catchUpLoop();
  }

  async #catchUpLoop(): Promise<void> {
    try {
      await this.#tokensLoaded; // always suspends first, so #running is set before the finally
      let failures = 0;
      while (this.#pending && !this.#closed) {
        this.#pending = false;
        try {
          const r = await this.#catchUpOnce();
          failures = 0;
          this.#emit(this.#on.catchUp, r);
        } catch (e) {
          if (this.#closed) return;
          const err = e instanceof Error ? e : new Error(errText(e));
          this.#error(err);
          // 400/401/404: retrying will not help; the next (re)connect or gap tries again
          if (!(err instanceof ApiError && err.retryable)) continue;
          failures++;
          const min = this.#o.retry?.minMs ?? 1000;
          const max = this.#o.retry?.maxMs ?? 30_000;
          const backoff = Math.min(max, min * 2 ** Math.min(failures - 1, 20)) * (0.8 + 0.4 * Math.random());
          const serverSaid = err.retryAfterMs !== null;
          await this.#sleep(serverSaid ? Math.max(err.retryAfterMs!, min) : backoff, !serverSaid);
          this.#pending = true;
        }
      }
    } finally {
      // cleared in the same step that saw no pending request: a `.finally()` on the
      // promise (or an outer await) would run a step later and miss a request made between
      this.#running = null;
    }
  }

  async #catchUpOnce(): Promise<CatchUpResult> {
    const result: CatchUpResult = { changes: 0, alerts: 0, full: false };
    // /v1/changes: page while `more`; on 410 list everything again
    for (;;) {
      const since = this.#store.changesToken;
      if (since === null && !this.#full) {
        this.#full = { mark: this.#store.markFull(), listed: new Set(), reset: this.#afterGone };
      }
      const body = await this.#get('/v1/changes', since);
      if (this.#closed) return result;
      if (body === 'gone') {
        if (since === null) throw new ApiError('/v1/changes without since answered 410', 410, false);
        this.#store.changesToken = null;
        this.#full = null;
        this.#afterGone = true;
        await this.#persist('changes', null);
        continue;
      }
      if (!Array.isArray(body.changes) || typeof body.next !== 'string') {
        throw new ApiError('/v1/changes: answer without changes or next', 200, true);
      }
      for (const raw of body.changes) {
        let item;
        try {
          item = checkItem(raw);
        } catch (e) {
          this.#error(new Error(`/v1/changes: dropped item: ${errText(e)}`));
          continue;
        }
        if (!this.#wanted(item.sku)) continue;
        this.#full?.listed.add(item.sku);
        // after a 410, what was held before the listing (unchanged since it started) is
        // replaced even by a lower rev: a rebuild onto lower LSNs starts revs lower
        const f = this.#full;
        const replace = f !== null && f.reset && f.mark.get(item.sku) === this.#store.rev(item.sku);
        const c = this.#store.applyItem(item, replace);
        if (c) result.changes++;
        this.#change(c);
      }
      this.#store.changesToken = body.next;
      await this.#persist('changes', body.next);
      if (body.more !== true) break;
    }
    if (this.#full) {
      // the listing was complete: what it did not list is gone
      for (const c of this.#store.sweepFull(this.#full.mark, this.#full.listed)) {
        result.changes++;
        this.#change(c);
      }
      this.#full = null;
      this.#afterGone = false;
      result.full = true;
    }
    // /v1/alerts: likewise, deduped by id. Only its pages move the cursor.
    for (;;) {
      const since = this.#store.alertsSince;
      const body = await this.#get('/v1/alerts', since);
      if (this.#closed) return result;
      if (body === 'gone') {
        if (since === null) throw new ApiError('/v1/alerts without since answered 410', 410, false);
        this.#store.resetAlertsSince();
        await this.#persist('alerts', null);
        continue;
      }
      if (!Array.isArray(body.alerts) || typeof body.next !== 'string') {
        throw new ApiError('/v1/alerts: answer without alerts or next', 200, true);
      }
      for (const raw of body.alerts) {
        let alert;
        try {
          alert = checkAlert(raw);
        } catch (e) {
          this.#error(new Error(`/v1/alerts: dropped alert: ${errText(e)}`));
          continue;
        }
        if (!this.#wanted(alert.sku)) continue;
        if (this.#store.applyAlert(alert)) {
          result.alerts++;
          this.#emit(this.#on.alert, alert);
        }
      }
      this.#store.noteAlertsNext(body.next);
      await this.#persist('alerts', this.#store.alertsSince);
      if (body.more !== true) break;
    }
    return result;
  }

  // One GET: the parsed JSON answer, 'gone' for 410, or an ApiError.
  async #get(path: string, since: string | null): Promise<Record<string, any> | 'gone'> {
    const q = new URLSearchParams();
    if (since !== null) q.set('since', since);
    if (this.#o.pageSize) q.set('limit', String(this.#o.pageSize));
    const qs = q.toString();
    const url = this.#o.apiUrl!.replace(/\/+$/, '') + path + (qs ? '?' + qs : '');
    const headers: Record<string, string> = { accept: 'application/json' };
    if (this.#o.token) headers.authorization = `Bearer ${this.#o.token}`;
    let res: Response;
    try {
      res = await this.#fetch(url, { headers, signal: this.#abort.signal });
    } catch (e) {
      throw new ApiError(`${path}: ${errText(e)}`, null, true);
    }
    if (res.status === 410) {
      await res.body?.cancel().catch(() => {});
      return 'gone';
    }
    let text = '';
    try {
      text = await res.text();
    } catch (e) {
      throw new ApiError(`${path}: reading the answer: ${errText(e)}`, res.status, true);
    }
    if (!res.ok) {
      let detail = text.slice(0, 200);
      try { detail = JSON.parse(text).error ?? detail; } catch { /* not JSON */ }
      const retryable = res.status === 429 || res.status >= 500;
      throw new ApiError(`${path}: HTTP ${res.status}: ${detail}`, res.status, retryable,
        retryable ? retryAfterMs(res.headers.get('retry-after')) : null);
    }
    try {
      const v = JSON.parse(text);
      if (typeof v !== 'object' || v === null) throw new Error('not an object');
      return v;
    } catch (e) {
      throw new ApiError(`${path}: bad JSON: ${errText(e)}`, res.status, true);
    }
  }

  // An abortable wait; `wakeable`: a (re)connect ends it early.
  #sleep(ms: number, wakeable: boolean): Promise<void> {
    return new Promise((resolve) => {
      const done = () => { clearTimeout(t); this.#wake = null; resolve(); };
      const t = setTimeout(done, ms);
      this.#wake = wakeable || this.#closed ? done : () => { if (this.#closed) done(); };
    });
  }

  // ---- tokens ---------------------------------------------------------------------

  #key(which: 'changes' | 'alerts'): string {
    return `skusync:${this.#prefix}:${which}`;
  }

  async #loadTokens(): Promise<void> {
    const s = this.#o.storage;
    if (!s) return;
    try {
      const changes = await s.get(this.#key('changes'));
      const alerts = await s.get(this.#key('alerts'));
      if (changes) this.#store.changesToken = changes;
      if (alerts) this.#store.noteAlertsNext(alerts);
    } catch (e) {
      this.#error(new Error(`storage: ${errText(e)}`));
    }
  }

  async #persist(which: 'changes' | 'alerts', value: string | null): Promise<void> {
    const s = this.#o.storage;
    if (!s) return;
    try {
      await s.set(this.#key(which), value ?? ''); // '' = none
    } catch (e) {
      this.#error(new Error(`storage: ${errText(e)}`));
    }
  }

  // ---- listeners ------------------------------------------------------------------

  #add<T>(set: Set<T>, cb: T): () => void {
    set.add(cb);
    return () => { set.delete(cb); };
  }

  #emit<A>(set: Set<(a: A) => void>, arg: A): void {
    for (const cb of set) this.#call(() => cb(arg));
  }

  // A throwing listener must not break ordering or catch-up: report it, or rethrow it
  // outside our call stack when nobody listens for errors.
  #call(f: () => void): void {
    try {
      f();
    } catch (e) {
      if (this.#on.error.size) this.#error(e instanceof Error ? e : new Error(errText(e)));
      else setTimeout(() => { throw e; });
    }
  }

  #error(e: Error): void {
    for (const cb of this.#on.error) {
      try { cb(e); } catch { /* an error listener's own error has nowhere to go */ }
    }
  }
}

async function defaultConnect(): Promise<ConnectFn> {
  const g = (globalThis as { mqtt?: { connect?: ConnectFn } }).mqtt;
  if (g && typeof g.connect === 'function') return g.connect.bind(g);
  const mod: any = await import('mqtt');
  const connect = mod.connect ?? mod.default?.connect;
  if (typeof connect !== 'function') throw new Error('the mqtt module has no connect');
  return connect;
}

// Retry-After: delay-seconds or an HTTP date.
function retryAfterMs(v: string | null): number | null {
  if (v === null || v.trim() === '') return null;
  if (/^\d+$/.test(v.trim())) return Number(v.trim()) * 1000;
  const t = Date.parse(v);
  return Number.isNaN(t) ? null : Math.max(0, t - Date.now());
}

function errText(e: unknown): string {
  if (e instanceof Error) {
    const cause = (e as { cause?: unknown }).cause;
    return cause instanceof Error ? `${e.message} (${cause.message})` : e.message;
  }
  return String(e);
}
