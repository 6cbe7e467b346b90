// The client: mqtt.js for live states and alerts, fetch for catch-up over `[api]`, the
// Store for every ordering rule. Follows "How a client follows the contract" in
// docs/mobile.md step by step.
import { checkAlert, checkItem, parseMessage } from './message.js';
import { Store } from './store.js';
import { alertTopic, skuTopic } from './topic.js';
/** A failed `/v1/...` request. `retryable`: network, 5xx or 429. */
export class ApiError extends Error {
    status;
    retryable;
    retryAfterMs;
    constructor(message, status, retryable, retryAfterMs = null) {
        super(message);
        this.status = status;
        this.retryable = retryable;
        this.retryAfterMs = retryAfterMs;
        this.name = 'ApiError';
    }
}
export function createClient(options) {
    return new Client(options);
}
class Client {
    #o;
    #prefix;
    #skus;
    #store;
    #fetch;
    #abort = new AbortController();
    #on = {
        state: new Set(), alert: new Set(), status: new Set(), connection: new Set(), catchUp: new Set(), error: new Set(),
    };
    #tokensLoaded;
    #mqtt = null;
    #closed = false;
    // catch-up: one at a time; a request while one runs makes it run once more
    #pending = false;
    #running = null;
    /** A full listing under way; `reset`: it follows a 410 (see `Store.applyState`). */
    #full = null;
    /** `/v1/changes` answered 410: the next full listing replaces what is held. */
    #afterGone = false;
    #wake = null;
    // MQTT connections so far, and the one whose SUBACK came
    #connected = false;
    #epoch = 0;
    #subscribed = 0;
    /** This process subscribed at least once (a resumed session alone sends no retained states). */
    #everSubscribed = false;
    /** The catch-up that follows live alerts (see `alertFollowMs`), when one is due. */
    #alertFollow = null;
    constructor(o) {
        this.#o = o;
        this.#prefix = o.prefix ?? 'skusync';
        this.#skus = o.skus ? new Set(o.skus) : null;
        this.#store = new Store({ alertIdLimit: o.alertIdLimit });
        this.#fetch = o.fetch ?? ((...a) => globalThis.fetch(...a));
        this.#tokensLoaded = this.#loadTokens();
        // asynchronous: the default connect may have to import mqtt.js
        void this.#start();
    }
    // ---- public -------------------------------------------------------------------
    onState(cb) { return this.#add(this.#on.state, cb); }
    onAlert(cb) { return this.#add(this.#on.alert, cb); }
    onStatus(cb) { return this.#add(this.#on.status, cb); }
    onConnection(cb) { return this.#add(this.#on.connection, cb); }
    onCatchUp(cb) { return this.#add(this.#on.catchUp, cb); }
    onError(cb) { return this.#add(this.#on.error, cb); }
    state(sku) { return this.#store.state(sku); }
    states() { return this.#store.states(); }
    catchUp() {
        this.#requestCatchUp();
        return this.#running ?? Promise.resolve();
    }
    async close() {
        if (this.#closed)
            return;
        this.#closed = true;
        if (this.#alertFollow)
            clearTimeout(this.#alertFollow);
        this.#abort.abort();
        this.#wake?.();
        const m = this.#mqtt;
        if (m) {
            // a clean DISCONNECT, unless the broker does not answer in time
            await new Promise((resolve) => {
                const t = setTimeout(() => { m.end(true, {}, () => { }); resolve(); }, 2000);
                m.end(false, {}, () => { clearTimeout(t); resolve(); });
            });
        }
        await this.#running?.catch(() => { });
    }
    // ---- MQTT -----------------------------------------------------------------------
    async #start() {
        // first let the caller register its listeners
        await Promise.resolve();
        let connect;
        try {
            connect = this.#o.connect ?? (await defaultConnect());
        }
        catch (e) {
            this.#error(new Error(`cannot load mqtt.js (pass options.connect): ${errText(e)}`));
            return;
        }
        if (this.#closed)
            return;
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
        m.on('connect', (connack) => this.#onConnect(m, connack));
        m.on('close', () => {
            this.#connected = false;
            if (!this.#closed)
                this.#emit(this.#on.connection, 'offline');
        });
        m.on('error', (e) => this.#error(e instanceof Error ? e : new Error(errText(e))));
        m.on('message', (topic, payload, packet) => this.#onMessage(topic, payload, packet?.properties ?? {}));
    }
    #onConnect(m, connack) {
        if (this.#closed)
            return;
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
            if (epoch === this.#epoch)
                this.#subscribed = epoch;
            if (!err)
                this.#everSubscribed = true;
            if (err)
                this.#error(new Error(`subscribe failed: ${errText(err)}`));
            else if (Array.isArray(granted) && granted.some((g) => typeof g?.qos === 'number' && g.qos >= 128)) {
                this.#error(new Error('subscribe refused by the broker for some topics'));
            }
            this.#requestCatchUp(true);
        });
    }
    #onMessage(topic, payload, props) {
        if (this.#closed)
            return;
        let msg;
        try {
            msg = parseMessage(this.#prefix, topic, payload, props);
        }
        catch (e) {
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
                if (!this.#wanted(msg.sku))
                    return;
                if (msg.kind === 'alert') {
                    // never moves the alert cursor: live alerts of different SKUs arrive in no
                    // seq order (each waits for its SKU's publish round), so one missed offline
                    // may lie below a later one seen live
                    if (this.#store.applyAlert(msg.alert)) {
                        this.#emit(this.#on.alert, msg.alert);
                        this.#followAlerts();
                    }
                }
                else {
                    this.#change(this.#store.applyState(msg.state));
                }
                return;
            case 'gone':
                if (this.#wanted(msg.sku))
                    this.#change(this.#store.applyGone(msg.sku, msg.rev));
                return;
            default:
                return;
        }
    }
    #change(c) {
        if (!c)
            return;
        for (const cb of this.#on.state)
            this.#call(() => cb(c.sku, c.state, c.info));
        // a gap: a message of this SKU was missed; others may have been too
        if (c.info.gap)
            this.#requestCatchUp();
    }
    #wanted(sku) {
        return this.#skus === null || this.#skus.has(sku);
    }
    // ---- catch-up over HTTP -------------------------------------------------------------
    /** One catch-up a little after live alerts: its `/v1/alerts` pages move the position. */
    #followAlerts() {
        if (!this.#o.apiUrl || this.#closed || this.#alertFollow)
            return;
        this.#alertFollow = setTimeout(() => {
            this.#alertFollow = null;
            this.#requestCatchUp();
        }, this.#o.alertFollowMs ?? 2000);
    }
    #requestCatchUp(connected = false) {
        if (!this.#o.apiUrl || this.#closed)
            return;
        this.#pending = true;
        // a (re)connect ends a back-off that waited for the network, not one the server asked for
        if (connected)
            this.#wake?.();
        if (!this.#running)
            this.#running = this.#catchUpLoop();
    }
    async #catchUpLoop() {
        try {
            await this.#tokensLoaded; // always suspends first, so #running is set before the finally
            let failures = 0;
            while (this.#pending && !this.#closed) {
                this.#pending = false;
                try {
                    const r = await this.#catchUpOnce();
                    failures = 0;
                    this.#emit(this.#on.catchUp, r);
                }
                catch (e) {
                    if (this.#closed)
                        return;
                    const err = e instanceof Error ? e : new Error(errText(e));
                    this.#error(err);
                    // 400/401/404: retrying will not help; the next (re)connect or gap tries again
                    if (!(err instanceof ApiError && err.retryable))
                        continue;
                    failures++;
                    const min = this.#o.retry?.minMs ?? 1000;
                    const max = this.#o.retry?.maxMs ?? 30_000;
                    const backoff = Math.min(max, min * 2 ** Math.min(failures - 1, 20)) * (0.8 + 0.4 * Math.random());
                    const serverSaid = err.retryAfterMs !== null;
                    await this.#sleep(serverSaid ? Math.max(err.retryAfterMs, min) : backoff, !serverSaid);
                    this.#pending = true;
                }
            }
        }
        finally {
            // cleared in the same step that saw no pending request: a `.finally()` on the
            // promise (or an outer await) would run a step later and miss a request made between
            this.#running = null;
        }
    }
    async #catchUpOnce() {
        const result = { changes: 0, alerts: 0, full: false };
        // /v1/changes: page while `more`; on 410 list everything again
        for (;;) {
            const since = this.#store.changesToken;
            if (since === null && !this.#full) {
                this.#full = { mark: this.#store.markFull(), listed: new Set(), reset: this.#afterGone };
            }
            const body = await this.#get('/v1/changes', since);
            if (this.#closed)
                return result;
            if (body === 'gone') {
                if (since === null)
                    throw new ApiError('/v1/changes without since answered 410', 410, false);
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
                }
                catch (e) {
                    this.#error(new Error(`/v1/changes: dropped item: ${errText(e)}`));
                    continue;
                }
                if (!this.#wanted(item.sku))
                    continue;
                this.#full?.listed.add(item.sku);
                // after a 410, what was held before the listing (unchanged since it started) is
                // replaced even by a lower rev: a rebuild onto lower LSNs starts revs lower
                const f = this.#full;
                const replace = f !== null && f.reset && f.mark.get(item.sku) === this.#store.rev(item.sku);
                const c = this.#store.applyItem(item, replace);
                if (c)
                    result.changes++;
                this.#change(c);
            }
            this.#store.changesToken = body.next;
            await this.#persist('changes', body.next);
            if (body.more !== true)
                break;
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
            if (this.#closed)
                return result;
            if (body === 'gone') {
                if (since === null)
                    throw new ApiError('/v1/alerts without since answered 410', 410, false);
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
                }
                catch (e) {
                    this.#error(new Error(`/v1/alerts: dropped alert: ${errText(e)}`));
                    continue;
                }
                if (!this.#wanted(alert.sku))
                    continue;
                if (this.#store.applyAlert(alert)) {
                    result.alerts++;
                    this.#emit(this.#on.alert, alert);
                }
            }
            this.#store.noteAlertsNext(body.next);
            await this.#persist('alerts', this.#store.alertsSince);
            if (body.more !== true)
                break;
        }
        return result;
    }
    // One GET: the parsed JSON answer, 'gone' for 410, or an ApiError.
    async #get(path, since) {
        const q = new URLSearchParams();
        if (since !== null)
            q.set('since', since);
        if (this.#o.pageSize)
            q.set('limit', String(this.#o.pageSize));
        const qs = q.toString();
        const url = this.#o.apiUrl.replace(/\/+$/, '') + path + (qs ? '?' + qs : '');
        const headers = { accept: 'application/json' };
        if (this.#o.token)
            headers.authorization = `Bearer ${this.#o.token}`;
        let res;
        try {
            res = await this.#fetch(url, { headers, signal: this.#abort.signal });
        }
        catch (e) {
            throw new ApiError(`${path}: ${errText(e)}`, null, true);
        }
        if (res.status === 410) {
            await res.body?.cancel().catch(() => { });
            return 'gone';
        }
        let text = '';
        try {
            text = await res.text();
        }
        catch (e) {
            throw new ApiError(`${path}: reading the answer: ${errText(e)}`, res.status, true);
        }
        if (!res.ok) {
            let detail = text.slice(0, 200);
            try {
                detail = JSON.parse(text).error ?? detail;
            }
            catch { /* not JSON */ }
            const retryable = res.status === 429 || res.status >= 500;
            throw new ApiError(`${path}: HTTP ${res.status}: ${detail}`, res.status, retryable, retryable ? retryAfterMs(res.headers.get('retry-after')) : null);
        }
        try {
            const v = JSON.parse(text);
            if (typeof v !== 'object' || v === null)
                throw new Error('not an object');
            return v;
        }
        catch (e) {
            throw new ApiError(`${path}: bad JSON: ${errText(e)}`, res.status, true);
        }
    }
    // An abortable wait; `wakeable`: a (re)connect ends it early.
    #sleep(ms, wakeable) {
        return new Promise((resolve) => {
            const done = () => { clearTimeout(t); this.#wake = null; resolve(); };
            const t = setTimeout(done, ms);
            this.#wake = wakeable || this.#closed ? done : () => { if (this.#closed)
                done(); };
        });
    }
    // ---- tokens ---------------------------------------------------------------------
    #key(which) {
        return `skusync:${this.#prefix}:${which}`;
    }
    async #loadTokens() {
        const s = this.#o.storage;
        if (!s)
            return;
        try {
            const changes = await s.get(this.#key('changes'));
            const alerts = await s.get(this.#key('alerts'));
            if (changes)
                this.#store.changesToken = changes;
            if (alerts)
                this.#store.noteAlertsNext(alerts);
        }
        catch (e) {
            this.#error(new Error(`storage: ${errText(e)}`));
        }
    }
    async #persist(which, value) {
        const s = this.#o.storage;
        if (!s)
            return;
        try {
            await s.set(this.#key(which), value ?? ''); // '' = none
        }
        catch (e) {
            this.#error(new Error(`storage: ${errText(e)}`));
        }
    }
    // ---- listeners ------------------------------------------------------------------
    #add(set, cb) {
        set.add(cb);
        return () => { set.delete(cb); };
    }
    #emit(set, arg) {
        for (const cb of set)
            this.#call(() => cb(arg));
    }
    // A throwing listener must not break ordering or catch-up: report it, or rethrow it
    // outside our call stack when nobody listens for errors.
    #call(f) {
        try {
            f();
        }
        catch (e) {
            if (this.#on.error.size)
                this.#error(e instanceof Error ? e : new Error(errText(e)));
            else
                setTimeout(() => { throw e; });
        }
    }
    #error(e) {
        for (const cb of this.#on.error) {
            try {
                cb(e);
            }
            catch { /* an error listener's own error has nowhere to go */ }
        }
    }
}
async function defaultConnect() {
    const g = globalThis.mqtt;
    if (g && typeof g.connect === 'function')
        return g.connect.bind(g);
    const mod = await import('mqtt');
    const connect = mod.connect ?? mod.default?.connect;
    if (typeof connect !== 'function')
        throw new Error('the mqtt module has no connect');
    return connect;
}
// Retry-After: delay-seconds or an HTTP date.
function retryAfterMs(v) {
    if (v === null || v.trim() === '')
        return null;
    if (/^\d+$/.test(v.trim()))
        return Number(v.trim()) * 1000;
    const t = Date.parse(v);
    return Number.isNaN(t) ? null : Math.max(0, t - Date.now());
}
function errText(e) {
    if (e instanceof Error) {
        const cause = e.cause;
        return cause instanceof Error ? `${e.message} (${cause.message})` : e.message;
    }
    return String(e);
}
