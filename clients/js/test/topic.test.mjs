import { test } from 'node:test';
import assert from 'node:assert/strict';
import { encodeSku, decodeSku, skuPath, parseTopic, skuTopic, alertTopic } from '../build/index.js';

test('encodeSku: the examples of docs/mobile.md', () => {
  assert.equal(encodeSku('a/b'), 'a%2Fb');
  assert.equal(encodeSku('100%'), '100%25');
  assert.equal(encodeSku('ünï'), '%C3%BCn%C3%AF');
  assert.equal(encodeSku(''), '%');
  assert.equal(encodeSku('SKU-00042'), 'SKU-00042');
});

test('encodeSku: wildcards, space, controls and DEL are escaped, other printable ASCII is not', () => {
  assert.equal(encodeSku('a+b#c d'), 'a%2Bb%23c%20d');
  assert.equal(encodeSku('\u0000\t\u007f'), '%00%09%7F');
  assert.equal(encodeSku('!"$&\'()*,-.:;<=>?@[\\]^_`{|}~'), '!"$&\'()*,-.:;<=>?@[\\]^_`{|}~');
  assert.equal(encodeSku('€'), '%E2%82%AC');
  assert.equal(encodeSku('📦'), '%F0%9F%93%A6');
});

test('decodeSku: the examples, the empty SKU, lower-case hex', () => {
  assert.equal(decodeSku('a%2Fb'), 'a/b');
  assert.equal(decodeSku('%'), '');
  assert.equal(decodeSku('100%25'), '100%');
  assert.equal(decodeSku('%C3%BCn%C3%AF'), 'ünï');
  assert.equal(decodeSku('%c3%bcn%c3%af'), 'ünï');
  assert.equal(decodeSku('%25'), '%'); // the SKU "%" is not the empty SKU
});

test('decodeSku: malformed levels throw', () => {
  assert.throws(() => decodeSku('%zz'), URIError);
  assert.throws(() => decodeSku('%C3'), URIError); // a lone UTF-8 lead byte
  assert.throws(() => decodeSku('a%'), URIError);
});

test('encodeSku and decodeSku round-trip', () => {
  for (const sku of ['', '%', '%%', 'a/b/c', '+', '#', ' ', 'ünï', '100%', 'x\u0001y', 'SKU-1/2#3+4%5', '日本語', '📦/📦']) {
    const level = encodeSku(sku);
    assert.ok(!/[/+#\s]/.test(level), `level ${level} is one safe topic level`);
    assert.equal(decodeSku(level), sku);
  }
});

test('parseTopic: kinds and SKUs under a prefix, also one with a slash', () => {
  assert.deepEqual(parseTopic('shop', 'shop/sku/a%2Fb'), { kind: 'sku', sku: 'a/b' });
  assert.deepEqual(parseTopic('shop', 'shop/sku/%'), { kind: 'sku', sku: '' });
  assert.deepEqual(parseTopic('shop', 'shop/alerts/100%25'), { kind: 'alerts', sku: '100%' });
  assert.deepEqual(parseTopic('shop', 'shop/status'), { kind: 'status' });
  assert.deepEqual(parseTopic('shop', 'shop/epoch'), { kind: 'other' });
  assert.deepEqual(parseTopic('shop', 'shopx/sku/a'), { kind: 'other' });
  assert.deepEqual(parseTopic('shop', 'shop/sku/a/b'), { kind: 'other' });
  assert.deepEqual(parseTopic('eu/shop', 'eu/shop/sku/%C3%BCn%C3%AF'), { kind: 'sku', sku: 'ünï' });
  assert.equal(skuTopic('shop', 'a/b'), 'shop/sku/a%2Fb');
  assert.equal(alertTopic('shop', ''), 'shop/alerts/%');
});

test('skuPath: survives URL parsing, and decodes to the SKU', () => {
  for (const sku of ['plain', 'a/b', '{x}', 'q?1 %', 'a\\b', '#5', 'ünï', 'A.1', '^|`"<>']) {
    const seg = skuPath(sku);
    const url = new URL('http://api.test/v1/sku/' + seg);
    assert.equal(url.pathname, '/v1/sku/' + seg, sku);
    assert.equal(url.search + url.hash, '', sku);
    assert.equal(decodeURIComponent(url.pathname.slice('/v1/sku/'.length)), sku);
  }
  assert.equal(skuPath(''), '%');
  assert.equal(new URL('http://api.test/v1/sku/' + skuPath('')).pathname, '/v1/sku/%');
});
