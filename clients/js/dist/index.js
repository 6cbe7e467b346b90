// skusync's reference client of the mobile contract (docs/mobile.md, payload format 2).
export { createClient, ApiError, } from './client.js';
export { Store, compareSeq } from './store.js';
export { encodeSku, decodeSku, skuPath, parseTopic, skuTopic, alertTopic } from './topic.js';
export { parseMessage, decodeBody, userProperty, checkState, checkItem, checkAlert } from './message.js';
export { decodeCbor, CborError } from './cbor.js';
