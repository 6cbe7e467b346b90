/**
 * The topic level (and API path segment) of a SKU: every byte outside printable ASCII
 * (0x21-0x7E) and `%` `/` `+` `#` becomes `%XX` (upper-case hex of the UTF-8 bytes); the
 * empty SKU is `%`.
 */
export declare function encodeSku(sku: string): string;
/**
 * The path segment of a SKU for skusync's `/v1/sku/<SKU>`: `encodeURIComponent` of it
 * (URL libraries would cut a topic level at a raw `?`, or turn `\` into `/`); the empty
 * SKU is `%`. skusync decodes any standard percent-encoding.
 */
export declare function skuPath(sku: string): string;
/**
 * The SKU of a topic level: exactly `%` is the empty SKU, anything else is standard
 * percent-decoding. Throws URIError on a malformed level (a bad `%XX` or invalid UTF-8).
 */
export declare function decodeSku(level: string): string;
export type Topic = {
    kind: 'sku' | 'alerts';
    sku: string;
} | {
    kind: 'status';
} | {
    kind: 'other';
};
/** Which of skusync's topics under `prefix` (which may itself contain `/`) this is. */
export declare function parseTopic(prefix: string, topic: string): Topic;
/** The state topic of a SKU. */
export declare function skuTopic(prefix: string, sku: string): string;
/** The alert topic of a SKU. */
export declare function alertTopic(prefix: string, sku: string): string;
