import { test } from 'node:test';
import assert from 'node:assert/strict';
import { parseMessage, checkItem } from '../build/index.js';
import { rev, state, alert, json, cbor } from './helpers.mjs';

const JSON_PROPS = { contentType: 'application/json', payloadFormatIndicator: true };

test('states on percent-encoded topics carry the real SKU', () => {
  for (const [level, sku] of [['a%2Fb', 'a/b'], ['%', ''], ['100%25', '100%'], ['%C3%BCn%C3%AF', 'ünï']]) {
    const s = state(sku, rev(1));
    const m = parseMessage('shop', `shop/sku/${level}`, json(s), JSON_PROPS);
    assert.equal(m.kind, 'state');
    assert.equal(m.sku, sku);
    assert.equal(m.topicSku, sku);
    assert.deepEqual(m.state, s);
  }
});

test('an empty payload is gone, ordered by the rev user property when present', () => {
  const r = rev(7);
  assert.deepEqual(parseMessage('shop', 'shop/sku/a%2Fb', new Uint8Array(0), { userProperties: { rev: r } }),
    { kind: 'gone', sku: 'a/b', rev: r });
  assert.deepEqual(parseMessage('shop', 'shop/sku/%', Buffer.alloc(0), { userProperties: { rev: ['x', r] } }),
    { kind: 'gone', sku: '', rev: r });
  assert.deepEqual(parseMessage('shop', 'shop/sku/100%25', new Uint8Array(0)), { kind: 'gone', sku: '100%', rev: null });
});

test('CBOR payloads (content type application/cbor) decode to the same state', () => {
  const s = state('ünï', rev(9), { available: 2.5 }, { base: rev(8) });
  const m = parseMessage('shop', 'shop/sku/%C3%BCn%C3%AF', cbor(s), { contentType: 'application/cbor', payloadFormatIndicator: false });
  assert.deepEqual(m.state, s);
  const a = alert('ünï', '5-1');
  assert.deepEqual(parseMessage('shop', 'shop/alerts/%C3%BCn%C3%AF', cbor(a), { contentType: 'application/cbor' }).alert, a);
});

test('alerts: seq from the payload, else from the user property; sku from the payload', () => {
  const a = alert('a/b', '1764061200123-0');
  const m = parseMessage('shop', 'shop/alerts/a%2Fb', json(a), JSON_PROPS);
  assert.deepEqual(m, { kind: 'alert', sku: 'a/b', topicSku: 'a/b', alert: a });
  const { seq, ...noSeq } = a;
  assert.equal(parseMessage('shop', 'shop/alerts/a%2Fb', json(noSeq), { userProperties: { seq } }).alert.seq, seq);
});

test('status, epoch and foreign topics', () => {
  assert.deepEqual(parseMessage('shop', 'shop/status', Buffer.from('online')), { kind: 'status', text: 'online' });
  assert.deepEqual(parseMessage('shop', 'shop/epoch', Buffer.from('x:1')), { kind: 'other' });
  assert.deepEqual(parseMessage('shop', 'other/sku/A', Buffer.from('{}')), { kind: 'other' });
});

test('contract violations throw', () => {
  const v1 = { v: 1, sku: 'A', on_hand: 1, lsn: '0/1', prev_lsn: '0/0' };
  assert.throws(() => parseMessage('shop', 'shop/sku/A', json(v1)), /without rev .*format 1/);
  assert.throws(() => parseMessage('shop', 'shop/sku/A', Buffer.from('{"v":2,')), SyntaxError);
  assert.throws(() => parseMessage('shop', 'shop/sku/A', Uint8Array.from([0xff, 0xfe])), /UTF-8/);
  assert.throws(() => parseMessage('shop', 'shop/sku/%E0', json(state('A', rev(1)))), URIError);
  assert.throws(() => parseMessage('shop', 'shop/alerts/A', json({ v: 2, sku: 'A' })), /without id/);
  assert.throws(() => checkItem({ v: 2, sku: 'A', gone: true }), /gone object/);
});
