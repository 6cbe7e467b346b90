// SKUs in topic levels and in `/v1/sku/<SKU>` paths (docs/mobile.md, Topics): one level,
// percent-encoded, so `/`, `+`, `#`, `%`, spaces and non-ASCII cannot break the topic tree.

const HEX = '0123456789ABCDEF';
const utf8 = new TextEncoder();

/**
 * The topic level (and API path segment) of a SKU: every byte outside printable ASCII
 * (0x21-0x7E) and `%` `/` `+` `#` becomes `%XX` (upper-case hex of the UTF-8 bytes); the
 * empty SKU is `%`.
 */
export function encodeSku(sku: string): string {
  if (sku === '') return '%';
  let out = '';
  for (const b of utf8.encode(sku)) {
    const plain = b >= 0x21 && b <= 0x7e && b !== 0x25 && b !== 0x2f && b !== 0x2b && b !== 0x23;
    out += plain ? String.fromCharCode(b) : '%' + HEX[b >> 4] + HEX[b & 15];
  }
  return out;
}

/**
 * The path segment of a SKU for skusync's `/v1/sku/<SKU>`: `encodeURIComponent` of it
 * (URL libraries would cut a topic level at a raw `?`, or turn `\` into `/`); the empty
 * SKU is `%`. skusync decodes any standard percent-encoding.
 */
export function skuPath(sku: string): string {
  return sku === '' ? '%' : encodeURIComponent(sku);
}

/**
 * The SKU of a topic level: exactly `%` is the empty SKU, anything else is standard
 * percent-decoding. Throws URIError on a malformed level (a bad `%XX` or invalid UTF-8).
 */
export function decodeSku(level: string): string {
  return level === '%' ? '' : decodeURIComponent(level);
}

export type Topic =
  | { kind: 'sku' | 'alerts'; sku: string }
  | { kind: 'status' }
  | { kind: 'other' };

/** Which of skusync's topics under `prefix` (which may itself contain `/`) this is. */
export function parseTopic(prefix: string, topic: string): Topic {
  if (!topic.startsWith(prefix + '/')) return { kind: 'other' };
  const rest = topic.slice(prefix.length + 1);
  if (rest === 'status') return { kind: 'status' };
  const slash = rest.indexOf('/');
  if (slash < 0) return { kind: 'other' };
  const kind = rest.slice(0, slash);
  const level = rest.slice(slash + 1);
  if ((kind !== 'sku' && kind !== 'alerts') || level.includes('/')) return { kind: 'other' };
  return { kind, sku: decodeSku(level) };
}

/** The state topic of a SKU. */
export function skuTopic(prefix: string, sku: string): string {
  return `${prefix}/sku/${encodeSku(sku)}`;
}

/** The alert topic of a SKU. */
export function alertTopic(prefix: string, sku: string): string {
  return `${prefix}/alerts/${encodeSku(sku)}`;
}
