// The client's state machine, without I/O: per-SKU ordering by `rev`, delta and gap
// detection, gone SKUs, alert dedupe and the catch-up tokens. The MQTT and HTTP code in
// client.ts only decodes messages and feeds them here, so every rule of docs/mobile.md
// is testable without a broker or a server.

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
export type Delta = { [member: string]: number | Delta };

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

// Per SKU: the greatest rev seen and the state it carried; a gone SKU keeps its rev
// (state null) so that an older message arriving late cannot bring it back.
interface Held {
  rev: string;
  state: State | null;
}

/** SKUs held when a full listing (`/v1/changes` without `since`) started, with their rev. */
export type FullMark = Map<string, string>;

export class Store {
  readonly #held = new Map<string, Held>();
  readonly #alertIds = new Set<string>();
  readonly #alertIdLimit: number;
  #alertSeq: string | null = null;
  #alertsSince: string | null = null;
  /** The `next` of the last `/v1/changes` page (null: none yet, or it became too old). */
  changesToken: string | null = null;

  constructor(options: { alertIdLimit?: number } = {}) {
    this.#alertIdLimit = Math.max(1, options.alertIdLimit ?? 10_000);
  }

  /**
   * A state from MQTT or HTTP. Taken when its rev is greater than the one held (string
   * order), else ignored (null). Its delta is reported only when the held rev starts with
   * `delta_from`; a `delta_from` that does not match the held rev is a gap. `replace`:
   * also taken when its rev is lower (a full listing after a 410 replaces what was held
   * before it: after a rebuild onto lower LSNs, revs start lower); an equal rev is not.
   */
  applyState(state: State, replace = false): Change | null {
    const held = this.#held.get(state.sku);
    if (held && !(state.rev > held.rev) && !(replace && state.rev < held.rev)) return null;
    let delta: Delta | null = null;
    let gap = false;
    if (held && typeof state.delta_from === 'string') {
      if (held.rev.startsWith(state.delta_from)) delta = isObject(state.delta) ? state.delta : null;
      else gap = true;
    }
    this.#held.set(state.sku, { rev: state.rev, state });
    return { sku: state.sku, state, info: { delta, gap, previous: held?.state ?? null } };
  }

  /**
   * A gone SKU: an empty MQTT payload (rev from its user property, null when absent) or
   * an HTTP gone object. With a rev it is ordered like a state; without one it removes
   * what is held. Returns a change only when a state was held.
   */
  applyGone(sku: string, rev: string | null, replace = false): Change | null {
    const held = this.#held.get(sku);
    if (rev !== null && held && !(rev > held.rev) && !(replace && rev < held.rev)) return null;
    const newRev = rev ?? held?.rev;
    if (newRev === undefined) return null; // nothing held, nothing to order by
    this.#held.set(sku, { rev: newRev, state: null });
    if (!held?.state) return null;
    return { sku, state: null, info: { delta: null, gap: false, previous: held.state } };
  }

  /** An item of `/v1/changes`: a state or a gone object (`replace`: see `applyState`). */
  applyItem(item: State | GoneObject, replace = false): Change | null {
    return item.gone === true
      ? this.applyGone(item.sku, item.rev, replace)
      : this.applyState(item as State, replace);
  }

  state(sku: string): State | null {
    return this.#held.get(sku)?.state ?? null;
  }

  /** The present SKUs and their states (a new Map). */
  states(): Map<string, State> {
    const out = new Map<string, State>();
    for (const [sku, h] of this.#held) if (h.state) out.set(sku, h.state);
    return out;
  }

  /** The greatest rev seen for a SKU, gone or not. */
  rev(sku: string): string | null {
    return this.#held.get(sku)?.rev ?? null;
  }

  /** Remembers which SKUs are held before a full listing starts. */
  markFull(): FullMark {
    const mark: FullMark = new Map();
    for (const [sku, h] of this.#held) if (h.state) mark.set(sku, h.rev);
    return mark;
  }

  /**
   * After a complete full listing: a SKU held when it started, not listed, and not
   * changed since is gone (its gone message was missed, e.g. before a 410).
   */
  sweepFull(mark: FullMark, listed: Set<string>): Change[] {
    const out: Change[] = [];
    for (const [sku, rev] of mark) {
      if (listed.has(sku) || this.#held.get(sku)?.rev !== rev) continue;
      const c = this.applyGone(sku, null);
      if (c) out.push(c);
    }
    return out;
  }

  /**
   * An alert from MQTT or HTTP: true when its id is new (deliver it), false for a
   * duplicate. Remembers the last `alertIdLimit` ids and the greatest `seq`. Never moves
   * the catch-up cursor (see `alertsSince`).
   */
  applyAlert(alert: Alert): boolean {
    if (typeof alert.seq === 'string') this.#alertSeq = maxSeq(this.#alertSeq, alert.seq);
    if (this.#alertIds.has(alert.id)) return false;
    this.#alertIds.add(alert.id);
    if (this.#alertIds.size > this.#alertIdLimit) {
      // a Set iterates in insertion order: drop the oldest id
      this.#alertIds.delete(this.#alertIds.values().next().value as string);
    }
    return true;
  }

  /** The greatest alert seq seen. */
  get alertSeq(): string | null {
    return this.#alertSeq;
  }

  /**
   * The `since` of the next `/v1/alerts`: the `next` of the last page. Not the greatest
   * seq seen: MQTT delivers different SKUs' alerts in no seq order (each waits for its
   * SKU's publish round), so an alert seen live may follow one that a lost connection
   * never delivered.
   */
  get alertsSince(): string | null {
    return this.#alertsSince;
  }

  /** The `next` of a `/v1/alerts` page (or a stored one): taken when greater. */
  noteAlertsNext(next: string): void {
    this.#alertsSince = maxSeq(this.#alertsSince, next);
  }

  /** Forgets the cursor (after a 410: list the whole history again). */
  resetAlertsSince(): void {
    this.#alertsSince = null;
  }
}

function maxSeq(held: string | null, seq: string): string {
  return held === null || compareSeq(seq, held) > 0 ? seq : held;
}

/**
 * Orders alert seqs `<ms>-<n>` numerically by both parts (as strings, "9-0" would come
 * after "10-0"). Negative, zero or positive like a sort comparator. A malformed seq
 * orders before any well-formed one.
 */
export function compareSeq(a: string, b: string): number {
  const pa = parseSeq(a);
  const pb = parseSeq(b);
  if (!pa || !pb) return pa ? 1 : pb ? -1 : a < b ? -1 : a > b ? 1 : 0;
  const d = pa[0] === pb[0] ? pa[1] - pb[1] : pa[0] - pb[0];
  return d < 0n ? -1 : d > 0n ? 1 : 0;
}

function parseSeq(s: string): [bigint, bigint] | null {
  const m = /^(\d+)-(\d+)$/.exec(s);
  return m ? [BigInt(m[1]!), BigInt(m[2]!)] : null;
}

function isObject(v: unknown): v is Delta {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}
