// Decoding one MQTT message (topic, payload bytes, MQTT 5 properties) into what it means,
// and checking HTTP items. Pure: the client feeds the results to the Store.
import { decodeCbor } from './cbor.js';
import { parseTopic } from './topic.js';
const utf8 = new TextDecoder('utf-8', { fatal: true });
/**
 * What a message on one of skusync's topics says. Throws (with a one-line message) on a
 * payload that breaks the contract; the caller reports it and drops the message.
 */
export function parseMessage(prefix, topic, payload, properties = {}) {
    const t = parseTopic(prefix, topic);
    switch (t.kind) {
        case 'other':
            return { kind: 'other' };
        case 'status':
            return { kind: 'status', text: utf8.decode(payload) };
        case 'sku': {
            if (payload.length === 0)
                return { kind: 'gone', sku: t.sku, rev: userProperty(properties, 'rev') };
            const state = checkState(decodeBody(payload, properties));
            return { kind: 'state', sku: state.sku, topicSku: t.sku, state };
        }
        case 'alerts': {
            const alert = checkAlert(decodeBody(payload, properties), t.sku, userProperty(properties, 'seq'));
            return { kind: 'alert', sku: alert.sku, topicSku: t.sku, alert };
        }
    }
}
/** JSON, or CBOR when the content type says `application/cbor`. */
export function decodeBody(payload, properties = {}) {
    const type = (properties.contentType ?? '').split(';')[0].trim().toLowerCase();
    if (type === 'application/cbor')
        return decodeCbor(payload);
    let text;
    try {
        text = utf8.decode(payload);
    }
    catch {
        throw new Error('payload is not valid UTF-8');
    }
    return JSON.parse(text);
}
/** A user property; mqtt.js gives an array when the property is repeated: take the last. */
export function userProperty(properties, name) {
    const v = properties.userProperties?.[name];
    if (Array.isArray(v))
        return v.length ? String(v[v.length - 1]) : null;
    return typeof v === 'string' ? v : null;
}
/** A state (from MQTT or `/v1/...`): needs `sku` and a string `rev`. */
export function checkState(v) {
    if (!isRecord(v))
        throw new Error('state is not an object');
    if (typeof v.sku !== 'string')
        throw new Error('state without sku');
    if (typeof v.rev !== 'string' || v.rev === '') {
        throw new Error(`state of ${JSON.stringify(v.sku)} without rev (payload format ${JSON.stringify(v.v)}; this client needs format 2)`);
    }
    return v;
}
/** An item of `/v1/changes`: a state or a gone object. */
export function checkItem(v) {
    if (isRecord(v) && v.gone === true) {
        if (typeof v.sku !== 'string' || typeof v.rev !== 'string')
            throw new Error('gone object without sku or rev');
        return v;
    }
    return checkState(v);
}
/** An alert: needs a string `id`; `sku` defaults to the topic's, `seq` to the user property. */
export function checkAlert(v, topicSku, seq) {
    if (!isRecord(v))
        throw new Error('alert is not an object');
    if (typeof v.id !== 'string')
        throw new Error('alert without id');
    if (typeof v.sku !== 'string') {
        if (topicSku === undefined)
            throw new Error('alert without sku');
        v.sku = topicSku;
    }
    if (typeof v.seq !== 'string' && seq)
        v.seq = seq;
    return v;
}
function isRecord(v) {
    return typeof v === 'object' && v !== null && !Array.isArray(v);
}
