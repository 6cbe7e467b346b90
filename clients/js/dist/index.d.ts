export { createClient, ApiError, type ClientOptions, type SkusyncClient, type StateListener, type AlertListener, type ConnectionState, type CatchUpResult, type ConnectFn, type MqttClientLike, type TokenStorage, } from './client.js';
export { Store, compareSeq, type State, type Alert, type Delta, type GoneObject, type Info, type Change, type FullMark } from './store.js';
export { encodeSku, decodeSku, skuPath, parseTopic, skuTopic, alertTopic, type Topic } from './topic.js';
export { parseMessage, decodeBody, userProperty, checkState, checkItem, checkAlert, type Message, type MessageProperties } from './message.js';
export { decodeCbor, CborError } from './cbor.js';
