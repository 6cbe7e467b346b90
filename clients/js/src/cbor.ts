// A small CBOR (RFC 8949) decoder for skusync's `[mqtt] format = "cbor"` payloads: maps,
// arrays, text and byte strings, integers, floats (half, single, double), true, false,
// null and undefined. Tags are skipped (their content is returned). The result has the
// shape JSON.parse would give for the same members, so the rest of the client does not
// care which format arrived.

export class CborError extends Error {
  constructor(message: string) {
    super(`CBOR: ${message}`);
    this.name = 'CborError';
  }
}

// Deep enough for any skusync payload, shallow enough that hostile input cannot overflow
// the stack.
const MAX_DEPTH = 64;
const BREAK = Symbol('break');

const utf8 = new TextDecoder('utf-8', { fatal: true });

/** Decodes exactly one CBOR data item that fills all of `bytes`. */
export function decodeCbor(bytes: Uint8Array): unknown {
  const r = new Reader(bytes);
  const v = r.item(0);
  if (v === BREAK) throw new CborError('unexpected break');
  if (r.pos !== bytes.length) throw new CborError(`${bytes.length - r.pos} trailing bytes`);
  return v;
}

class Reader {
  pos = 0;
  readonly #b: Uint8Array;
  readonly #view: DataView;

  constructor(bytes: Uint8Array) {
    this.#b = bytes;
    this.#view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  }

  #need(n: number): number {
    if (n > this.#b.length - this.pos) throw new CborError('truncated');
    const at = this.pos;
    this.pos += n;
    return at;
  }

  // The argument of an initial byte: a length, a count or an integer's value. 64-bit
  // values above 2^53 stay bigint so integers can say what they lose.
  #arg(ai: number): number | bigint {
    if (ai < 24) return ai;
    switch (ai) {
      case 24: return this.#b[this.#need(1)]!;
      case 25: return this.#view.getUint16(this.#need(2));
      case 26: return this.#view.getUint32(this.#need(4));
      case 27: {
        const v = this.#view.getBigUint64(this.#need(8));
        return v <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(v) : v;
      }
      default: throw new CborError(`reserved additional information ${ai}`);
    }
  }

  // A length or count: must fit in what is left (each element takes at least a byte),
  // so a forged length cannot make us allocate gigabytes.
  #length(ai: number): number {
    const n = this.#arg(ai);
    if (typeof n === 'bigint' || n > this.#b.length - this.pos) throw new CborError('truncated');
    return n;
  }

  item(depth: number): unknown {
    if (depth > MAX_DEPTH) throw new CborError('nested too deeply');
    const ib = this.#b[this.#need(1)]!;
    const major = ib >> 5;
    const ai = ib & 31;
    if (major === 7) return this.#simple(ai);
    if (ai === 31) return this.#indefinite(major, depth);
    switch (major) {
      case 0: return Number(this.#arg(ai)); // JSON.parse is just as lossy above 2^53
      case 1: {
        const n = this.#arg(ai);
        return typeof n === 'bigint' ? Number(-1n - n) : -1 - n;
      }
      case 2: {
        const n = this.#length(ai);
        const at = this.#need(n);
        return this.#b.slice(at, at + n);
      }
      case 3: {
        const n = this.#length(ai);
        const at = this.#need(n);
        return this.#text(at, n);
      }
      case 4: {
        const n = this.#length(ai);
        const out: unknown[] = [];
        for (let i = 0; i < n; i++) out.push(this.#value(depth));
        return out;
      }
      case 5: {
        const n = this.#length(ai);
        const out: Record<string, unknown> = {};
        for (let i = 0; i < n; i++) setMember(out, this.#key(depth), this.#value(depth));
        return out;
      }
      default: // 6: a tag; the content is what we want (e.g. tag 1, epoch time)
        this.#arg(ai);
        return this.#value(depth);
    }
  }

  #value(depth: number): unknown {
    const v = this.item(depth + 1);
    if (v === BREAK) throw new CborError('unexpected break');
    return v;
  }

  // JSON objects have text keys; skusync writes only text keys, integer keys become
  // their decimal text like in a JS object.
  #key(depth: number): string {
    const k = this.#value(depth);
    if (typeof k === 'string') return k;
    if (typeof k === 'number') return String(k);
    throw new CborError('map key is neither text nor an integer');
  }

  #text(at: number, n: number): string {
    try {
      return utf8.decode(this.#b.subarray(at, at + n));
    } catch {
      throw new CborError('text string is not valid UTF-8');
    }
  }

  #indefinite(major: number, depth: number): unknown {
    switch (major) {
      case 2:
      case 3: {
        // chunks of the same major type with definite lengths, then a break
        const chunks: Uint8Array[] = [];
        for (;;) {
          const ib = this.#b[this.#need(1)]!;
          if (ib === 0xff) break;
          if (ib >> 5 !== major || (ib & 31) === 31) throw new CborError('bad chunk in an indefinite-length string');
          const n = this.#length(ib & 31);
          const at = this.#need(n);
          chunks.push(this.#b.subarray(at, at + n));
        }
        const all = new Uint8Array(chunks.reduce((s, c) => s + c.length, 0));
        let o = 0;
        for (const c of chunks) { all.set(c, o); o += c.length; }
        if (major === 2) return all;
        try { return utf8.decode(all); } catch { throw new CborError('text string is not valid UTF-8'); }
      }
      case 4: {
        const out: unknown[] = [];
        for (;;) {
          const v = this.item(depth + 1);
          if (v === BREAK) return out;
          out.push(v);
        }
      }
      case 5: {
        const out: Record<string, unknown> = {};
        for (;;) {
          const k = this.item(depth + 1);
          if (k === BREAK) return out;
          if (typeof k !== 'string' && typeof k !== 'number') throw new CborError('map key is neither text nor an integer');
          setMember(out, String(k), this.#value(depth));
        }
      }
      default:
        throw new CborError(`major type ${major} cannot have an indefinite length`);
    }
  }

  #simple(ai: number): unknown {
    switch (ai) {
      case 20: return false;
      case 21: return true;
      case 22: return null;
      case 23: return undefined;
      case 25: return halfFloat(this.#view.getUint16(this.#need(2)));
      case 26: return this.#view.getFloat32(this.#need(4));
      case 27: return this.#view.getFloat64(this.#need(8));
      case 31: return BREAK;
      default: throw new CborError(`unsupported simple value ${ai < 24 ? ai : this.#b[this.#need(1)]}`);
    }
  }
}

// `obj[k] = v` with k "__proto__" would replace the prototype instead of adding a member
// (JSON.parse adds a member); defineProperty does what JSON.parse does.
function setMember(obj: Record<string, unknown>, k: string, v: unknown): void {
  if (k === '__proto__') Object.defineProperty(obj, k, { value: v, enumerable: true, writable: true, configurable: true });
  else obj[k] = v;
}

function halfFloat(h: number): number {
  const exp = (h >> 10) & 0x1f;
  const mant = h & 0x3ff;
  const sign = h & 0x8000 ? -1 : 1;
  if (exp === 0) return sign * mant * 2 ** -24;
  if (exp === 31) return mant === 0 ? sign * Infinity : NaN;
  return sign * (1 + mant / 1024) * 2 ** (exp - 15);
}
