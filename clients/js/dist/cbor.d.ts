export declare class CborError extends Error {
    constructor(message: string);
}
/** Decodes exactly one CBOR data item that fills all of `bytes`. */
export declare function decodeCbor(bytes: Uint8Array): unknown;
