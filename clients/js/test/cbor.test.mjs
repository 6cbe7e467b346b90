import { test } from 'node:test';
import assert from 'node:assert/strict';
import { decodeCbor, CborError } from '../build/index.js';
import { cbor, state, rev } from './helpers.mjs';

const h = (s) => Uint8Array.from(Buffer.from(s.replace(/\s/g, ''), 'hex'));

test('CBOR: RFC 8949 Appendix A vectors', () => {
  const cases = [
    ['00', 0], ['17', 23], ['1818', 24], ['1903e8', 1000], ['1a000f4240', 1000000],
    ['1b000000e8d4a51000', 1000000000000], ['20', -1], ['3863', -100], ['3903e7', -1000],
    ['f90000', 0], ['f93c00', 1], ['f93e00', 1.5], ['f97bff', 65504], ['f90001', 5.960464477539063e-8],
    ['f9c400', -4], ['fa47c35000', 100000], ['fb3ff199999999999a', 1.1], ['fbc010666666666666', -4.1],
    ['f97c00', Infinity], ['f9fc00', -Infinity],
    ['f4', false], ['f5', true], ['f6', null], ['f7', undefined],
    ['60', ''], ['6161', 'a'], ['6449455446', 'IETF'], ['62225c', '"\\'], ['62c3bc', 'ü'], ['63e6b0b4', '水'],
    ['80', []], ['83010203', [1, 2, 3]], ['8301820203820405', [1, [2, 3], [4, 5]]],
    ['a0', {}], ['a201020304', { 1: 2, 3: 4 }], ['a26161016162820203', { a: 1, b: [2, 3] }],
    ['826161a161626163', ['a', { b: 'c' }]],
    ['7f657374726561646d696e67ff', 'streaming'], ['9fff', []],
    ['9f018202039f0405ffff', [1, [2, 3], [4, 5]]], ['bf61610161629f0203ffff', { a: 1, b: [2, 3] }],
    ['c11a514b67b0', 1363896240], // tag 1 (epoch time): the content
  ];
  for (const [hex, want] of cases) assert.deepEqual(decodeCbor(h(hex)), want, hex);
  assert.ok(Number.isNaN(decodeCbor(h('f97e00'))));
  assert.deepEqual(decodeCbor(h('4401020304')), Uint8Array.from([1, 2, 3, 4]));
  assert.equal(decodeCbor(h('3bffffffffffffffff')), -18446744073709551616);
});

test('CBOR: a skusync state decodes to what JSON.parse gives', () => {
  const s = state('ünï/1', rev(0x1a3f2c8, 0, 1764061200123), {
    on_hand: 57, reserved: 3, available: 54, price: 12.5, below: -3,
    locations: { 'WH-BER': { on_hand: 40, reserved: 3 } }, views: 70000, big: 5_000_000_000,
  }, { base: rev(0x1a3e990), delta: { available: -2, locations: { 'WH-BER': { on_hand: -2 } } } });
  assert.deepEqual(decodeCbor(cbor(s)), JSON.parse(JSON.stringify(s)));
});

test('CBOR: malformed input is an error, not a wrong value', () => {
  for (const hex of ['', '18', '1900', '62c3', '8301', 'a16161', 'ff', '0000', '62c328', 'fc', '1c', '5f01ff', '7f6161', 'a1f601', 'f818']) {
    assert.throws(() => decodeCbor(h(hex)), CborError, hex || '(empty)');
  }
  // a forged length must not allocate
  assert.throws(() => decodeCbor(h('9b00000000ffffffff')), CborError);
  // nesting is bounded
  assert.throws(() => decodeCbor(new Uint8Array(1000).fill(0x81)), /nested too deeply/);
});

test('CBOR: a "__proto__" key is a member, as with JSON.parse', () => {
  const v = decodeCbor(cbor(JSON.parse('{"__proto__":{"x":1},"a":2}')));
  assert.equal(Object.getPrototypeOf(v), Object.prototype);
  assert.deepEqual(Object.keys(v), ['__proto__', 'a']);
  assert.equal(v.x, undefined);
});
