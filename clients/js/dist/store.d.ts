/** A SKU's state (docs/mobile.md, State): every value is absolute. */
export interface State {
    v: number;
    sku: string;
    rev: string;
    alert_state?: 'ok' | 'low' | 'out';
    delta?: Delta;
    delta_from?: string;
    [member: string]: unknown;
}
/** What changed since the state whose rev starts with `delta_from` (stored values only). */
export type Delta = {
    [member: string]: number | Delta;
};
/** An alert (docs/mobile.md, Alert). */
export interface Alert {
    v: number;
    id: string;
    seq?: string;
    type: 'low_stock' | 'out_of_stock' | 'back_in_stock' | string;
    sku: string;
    [member: string]: unknown;
}
/** What the HTTP API lists for a gone SKU. */
export interface GoneObject {
    v: number;
    sku: string;
    gone: true;
    rev: string;
}
export interface Info {
    /** The message's `delta`, when it is relative to the state held before; else null. */
    delta: Delta | null;
    /** The message's `delta_from` is not the state held: at least one message was missed. */
    gap: boolean;
    /** The state held before this change (null when there was none or it was gone). */
    previous: State | null;
}
/** An accepted change: `state` null means the SKU is gone. */
export interface Change {
    sku: string;
    state: State | null;
    info: Info;
}
/** SKUs held when a full listing (`/v1/changes` without `since`) started, with their rev. */
export type FullMark = Map<string, string>;
export declare class Store {
    #private;
    /** The `next` of the last `/v1/changes` page (null: none yet, or it became too old). */
    changesToken: string | null;
    constructor(options?: {
        alertIdLimit?: number;
    });
    /**
     * A state from MQTT or HTTP. Taken when its rev is greater than the one held (string
     * order), else ignored (null). Its delta is reported only when the held rev starts with
     * `delta_from`; a `delta_from` that does not match the held rev is a gap. `replace`:
     * also taken when its rev is lower (a full listing after a 410 replaces what was held
     * before it: after a rebuild onto lower LSNs, revs start lower); an equal rev is not.
     */
    applyState(state: State, replace?: boolean): Change | null;
    /**
     * A gone SKU: an empty MQTT payload (rev from its user property, null when absent) or
     * an HTTP gone object. With a rev it is ordered like a state; without one it removes
     * what is held. Returns a change only when a state was held.
     */
    applyGone(sku: string, rev: string | null, replace?: boolean): Change | null;
    /** An item of `/v1/changes`: a state or a gone object (`replace`: see `applyState`). */
    applyItem(item: State | GoneObject, replace?: boolean): Change | null;
    state(sku: string): State | null;
    /** The present SKUs and their states (a new Map). */
    states(): Map<string, State>;
    /** The greatest rev seen for a SKU, gone or not. */
    rev(sku: string): string | null;
    /** Remembers which SKUs are held before a full listing starts. */
    markFull(): FullMark;
    /**
     * After a complete full listing: a SKU held when it started, not listed, and not
     * changed since is gone (its gone message was missed, e.g. before a 410).
     */
    sweepFull(mark: FullMark, listed: Set<string>): Change[];
    /**
     * An alert from MQTT or HTTP: true when its id is new (deliver it), false for a
     * duplicate. Remembers the last `alertIdLimit` ids and the greatest `seq`. Never moves
     * the catch-up cursor (see `alertsSince`).
     */
    applyAlert(alert: Alert): boolean;
    /** The greatest alert seq seen. */
    get alertSeq(): string | null;
    /**
     * The `since` of the next `/v1/alerts`: the `next` of the last page. Not the greatest
     * seq seen: MQTT delivers different SKUs' alerts in no seq order (each waits for its
     * SKU's publish round), so an alert seen live may follow one that a lost connection
     * never delivered.
     */
    get alertsSince(): string | null;
    /** The `next` of a `/v1/alerts` page (or a stored one): taken when greater. */
    noteAlertsNext(next: string): void;
    /** Forgets the cursor (after a 410: list the whole history again). */
    resetAlertsSince(): void;
}
/**
 * Orders alert seqs `<ms>-<n>` numerically by both parts (as strings, "9-0" would come
 * after "10-0"). Negative, zero or positive like a sort comparator. A malformed seq
 * orders before any well-formed one.
 */
export declare function compareSeq(a: string, b: string): number;
