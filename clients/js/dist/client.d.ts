import { type Alert, type Info, type State } from './store.js';
/** The part of an mqtt.js client this library uses (inject a fake one in tests). */
export interface MqttClientLike {
    on(event: string, listener: (...args: any[]) => void): unknown;
    subscribe(topics: string[], options: {
        qos: 0 | 1 | 2;
    }, callback?: (err?: Error | null, granted?: unknown) => void): unknown;
    end(force?: boolean, options?: object, callback?: () => void): unknown;
}
/** mqtt.js's `connect`. */
export type ConnectFn = (url: string, options: Record<string, unknown>) => MqttClientLike;
/** Where the catch-up tokens survive a restart (e.g. over localStorage); may be async. */
export interface TokenStorage {
    get(key: string): string | null | undefined | Promise<string | null | undefined>;
    set(key: string, value: string): void | Promise<void>;
}
export interface ClientOptions {
    /** The broker, e.g. `wss://broker.example.com/mqtt` (browser) or `mqtts://...`. */
    mqttUrl: string;
    /** skusync's `[api]` base URL; without it there is no catch-up (MQTT only). */
    apiUrl?: string;
    /** `[mqtt] topic_prefix` (default `skusync`). */
    prefix?: string;
    /** Follow only these SKUs (default: all). */
    skus?: string[];
    /** Bearer token for the API. */
    token?: string;
    /** Extra mqtt.js options (username, password, clientId, clean, ...). */
    mqtt?: Record<string, unknown>;
    /** Persistence of the catch-up tokens. */
    storage?: TokenStorage;
    /** mqtt.js's connect; default: the global `mqtt` (browser bundle), else `import('mqtt')`. */
    connect?: ConnectFn;
    /** Default: the global fetch. */
    fetch?: typeof fetch;
    /** Catch-up retry back-off (network errors, 5xx, 429): from minMs doubling to maxMs. */
    retry?: {
        minMs?: number;
        maxMs?: number;
    };
    /** `limit` of each `/v1/...` page (default: the server's, 100). */
    pageSize?: number;
    /** How many alert ids to remember for dedupe (default 10,000). */
    alertIdLimit?: number;
    /**
     * After a live alert, a catch-up this many ms later (default 2000) moves the stored
     * alert position past it: live alerts never move it themselves (they arrive in no seq
     * order), and a restarted process would report them again from an older position.
     */
    alertFollowMs?: number;
}
export type StateListener = (sku: string, state: State | null, info: Info) => void;
export type AlertListener = (alert: Alert) => void;
export type ConnectionState = 'connecting' | 'connected' | 'offline';
/** What one catch-up did: changes and alerts taken (not counting ignored ones). */
export interface CatchUpResult {
    changes: number;
    alerts: number;
    /** It listed every SKU (first catch-up, or its token answered 410). */
    full: boolean;
}
export interface SkusyncClient {
    /** Every accepted state change; `state` null: the SKU is gone. Returns an unsubscribe. */
    onState(cb: StateListener): () => void;
    /** Every new alert (duplicates dropped), from MQTT and from catch-up. */
    onAlert(cb: AlertListener): () => void;
    /** skusync's retained status: `online` / `offline`. */
    onStatus(cb: (status: string) => void): () => void;
    /** The broker connection. */
    onConnection(cb: (state: ConnectionState) => void): () => void;
    /** After each completed catch-up. */
    onCatchUp(cb: (result: CatchUpResult) => void): () => void;
    /** Dropped messages, failed catch-ups (retried), storage and MQTT errors. */
    onError(cb: (error: Error) => void): () => void;
    /** The SKU's state, null when unknown or gone. */
    state(sku: string): State | null;
    /** All present SKUs (a new Map). */
    states(): Map<string, State>;
    /** Runs a catch-up now (e.g. when an app returns to the foreground). */
    catchUp(): Promise<void>;
    /** Disconnects and stops catch-up. */
    close(): Promise<void>;
}
/** A failed `/v1/...` request. `retryable`: network, 5xx or 429. */
export declare class ApiError extends Error {
    readonly status: number | null;
    readonly retryable: boolean;
    readonly retryAfterMs: number | null;
    constructor(message: string, status: number | null, retryable: boolean, retryAfterMs?: number | null);
}
export declare function createClient(options: ClientOptions): SkusyncClient;
