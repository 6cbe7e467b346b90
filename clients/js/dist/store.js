// The client's state machine, without I/O: per-SKU ordering by `rev`, delta and gap
// detection, gone SKUs, alert dedupe and the catch-up tokens. The MQTT and HTTP code in
// client.ts only decodes messages and feeds them here, so every rule of docs/mobile.md
// is testable without a broker or a server.
export class Store {
    #held = new Map();
    #alertIds = new Set();
    #alertIdLimit;
    #alertSeq = null;
    #alertsSince = null;
    /** The `next` of the last `/v1/changes` page (null: none yet, or it became too old). */
    changesToken = null;
    constructor(options = {}) {
        this.#alertIdLimit = Math.max(1, options.alertIdLimit ?? 10_000);
    }
    /**
     * A state from MQTT or HTTP. Taken when its rev is greater than the one held (string
     * order), else ignored (null). Its delta is reported only when the held rev starts with
     * `delta_from`; a `delta_from` that does not match the held rev is a gap. `replace`:
     * also taken when its rev is lower (a full listing after a 410 replaces what was held
     * before it: after a rebuild onto lower LSNs, revs start lower); an equal rev is not.
     */
    applyState(state, replace = false) {
        const held = this.#held.get(state.sku);
        if (held && !(state.rev > held.rev) && !(replace && state.rev < held.rev))
            return null;
        let delta = null;
        let gap = false;
        if (held && typeof state.delta_from === 'string') {
            if (held.rev.startsWith(state.delta_from))
                delta = isObject(state.delta) ? state.delta : null;
            else
                gap = true;
        }
        this.#held.set(state.sku, { rev: state.rev, state });
        return { sku: state.sku, state, info: { delta, gap, previous: held?.state ?? null } };
    }
    /**
     * A gone SKU: an empty MQTT payload (rev from its user property, null when absent) or
     * an HTTP gone object. With a rev it is ordered like a state; without one it removes
     * what is held. Returns a change only when a state was held.
     */
    applyGone(sku, rev, replace = false) {
        const held = this.#held.get(sku);
        if (rev !== null && held && !(rev > held.rev) && !(replace && rev < held.rev))
            return null;
        const newRev = rev ?? held?.rev;
        if (newRev === undefined)
            return null; // nothing held, nothing to order by
        this.#held.set(sku, { rev: newRev, state: null });
        if (!held?.state)
            return null;
        return { sku, state: null, info: { delta: null, gap: false, previous: held.state } };
    }
    /** An item of `/v1/changes`: a state or a gone object (`replace`: see `applyState`). */
    applyItem(item, replace = false) {
        return item.gone === true
            ? this.applyGone(item.sku, item.rev, replace)
            : this.applyState(item, replace);
    }
    state(sku) {
        return this.#held.get(sku)?.state ?? null;
    }
    /** The present SKUs and their states (a new Map). */
    states() {
        const out = new Map();
        for (const [sku, h] of this.#held)
            if (h.state)
                out.set(sku, h.state);
        return out;
    }
    /** The greatest rev seen for a SKU, gone or not. */
    rev(sku) {
        return this.#held.get(sku)?.rev ?? null;
    }
    /** Remembers which SKUs are held before a full listing starts. */
    markFull() {
        const mark = new Map();
        for (const [sku, h] of this.#held)
            if (h.state)
                mark.set(sku, h.rev);
        return mark;
    }
    /**
     * After a complete full listing: a SKU held when it started, not listed, and not
     * changed since is gone (its gone message was missed, e.g. before a 410).
     */
    sweepFull(mark, listed) {
        const out = [];
        for (const [sku, rev] of mark) {
            if (listed.has(sku) || this.#held.get(sku)?.rev !== rev)
                continue;
            const c = this.applyGone(sku, null);
            if (c)
                out.push(c);
        }
        return out;
    }
    /**
     * An alert from MQTT or HTTP: true when its id is new (deliver it), false for a
     * duplicate. Remembers the last `alertIdLimit` ids and the greatest `seq`. Never moves
     * the catch-up cursor (see `alertsSince`).
     */
    applyAlert(alert) {
        if (typeof alert.seq === 'string')
            this.#alertSeq = maxSeq(this.#alertSeq, alert.seq);
        if (this.#alertIds.has(alert.id))
            return false;
        this.#alertIds.add(alert.id);
        if (this.#alertIds.size > this.#alertIdLimit) {
            // a Set iterates in insertion order: drop the oldest id
            this.#alertIds.delete(this.#alertIds.values().next().value);
        }
        return true;
    }
    /** The greatest alert seq seen. */
    get alertSeq() {
        return this.#alertSeq;
    }
    /**
     * The `since` of the next `/v1/alerts`: the `next` of the last page. Not the greatest
     * seq seen: MQTT delivers different SKUs' alerts in no seq order (each waits for its
     * SKU's publish round), so an alert seen live may follow one that a lost connection
     * never delivered.
     */
    get alertsSince() {
        return this.#alertsSince;
    }
    /** The `next` of a `/v1/alerts` page (or a stored one): taken when greater. */
    noteAlertsNext(next) {
        this.#alertsSince = maxSeq(this.#alertsSince, next);
    }
    /** Forgets the cursor (after a 410: list the whole history again). */
    resetAlertsSince() {
        this.#alertsSince = null;
    }
}
function maxSeq(held, seq) {
    return held === null || compareSeq(seq, held) > 0 ? seq : held;
}
/**
 * Orders alert seqs `<ms>-<n>` numerically by both parts (as strings, "9-0" would come
 * after "10-0"). Negative, zero or positive like a sort comparator. A malformed seq
 * orders before any well-formed one.
 */
export function compareSeq(a, b) {
    const pa = parseSeq(a);
    const pb = parseSeq(b);
    if (!pa || !pb)
        return pa ? 1 : pb ? -1 : a < b ? -1 : a > b ? 1 : 0;
    const d = pa[0] === pb[0] ? pa[1] - pb[1] : pa[0] - pb[0];
    return d < 0n ? -1 : d > 0n ? 1 : 0;
}
function parseSeq(s) {
    const m = /^(\d+)-(\d+)$/.exec(s);
    return m ? [BigInt(m[1]), BigInt(m[2])] : null;
}
function isObject(v) {
    return typeof v === 'object' && v !== null && !Array.isArray(v);
}
