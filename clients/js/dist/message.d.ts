import type { Alert, GoneObject, State } from './store.js';
/** The MQTT 5 properties skusync sets (as mqtt.js reports them in `packet.properties`). */
export interface MessageProperties {
    contentType?: string;
    payloadFormatIndicator?: boolean | number;
    userProperties?: Record<string, string | string[]>;
    [other: string]: unknown;
}
export type Message = 
/** `sku` is the payload's (the real SKU); `topicSku` the decoded topic level. */
{
    kind: 'state';
    sku: string;
    topicSku: string;
    state: State;
} | {
    kind: 'gone';
    sku: string;
    rev: string | null;
} | {
    kind: 'alert';
    sku: string;
    topicSku: string;
    alert: Alert;
} | {
    kind: 'status';
    text: string;
} | {
    kind: 'other';
};
/**
 * What a message on one of skusync's topics says. Throws (with a one-line message) on a
 * payload that breaks the contract; the caller reports it and drops the message.
 */
export declare function parseMessage(prefix: string, topic: string, payload: Uint8Array, properties?: MessageProperties): Message;
/** JSON, or CBOR when the content type says `application/cbor`. */
export declare function decodeBody(payload: Uint8Array, properties?: MessageProperties): unknown;
/** A user property; mqtt.js gives an array when the property is repeated: take the last. */
export declare function userProperty(properties: MessageProperties, name: string): string | null;
/** A state (from MQTT or `/v1/...`): needs `sku` and a string `rev`. */
export declare function checkState(v: unknown): State;
/** An item of `/v1/changes`: a state or a gone object. */
export declare function checkItem(v: unknown): State | GoneObject;
/** An alert: needs a string `id`; `sku` defaults to the topic's, `seq` to the user property. */
export declare function checkAlert(v: unknown, topicSku?: string, seq?: string | null): Alert;
