import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Store, compareSeq } from '../build/index.js';
import { rev, stored, state, gone, alert } from './helpers.mjs';

const MS = 1_764_061_200_000;

test('ordering: a greater rev is taken, an equal or smaller one ignored', () => {
  const st = new Store();
  const r1 = rev(100, 0, MS);
  const r2 = rev(200, 0, MS + 5);
  const c1 = st.applyState(state('A', r1, { available: 7 }));
  assert.deepEqual(c1.info, { delta: null, gap: false, previous: null });
  assert.equal(st.applyState(state('A', r1, { available: 7 })), null, 'duplicate');
  const c2 = st.applyState(state('A', r2, { available: 5 }, { base: r1, delta: { available: -2 } }));
  assert.equal(c2.state.available, 5);
  assert.deepEqual(c2.info.delta, { available: -2 });
  assert.equal(c2.info.previous.available, 7);
  assert.equal(st.applyState(state('A', r1, { available: 7 })), null, 'older, late redelivery');
  assert.equal(st.applyState(state('A', r2, { available: 99 })), null, 'same rev again');
  assert.equal(st.state('A').available, 5);
  assert.equal(st.rev('A'), r2);
});

test('ordering: LSNs compare as 16 hex digits, not as X/Y text', () => {
  const st = new Store();
  // 0/FFFFFFFF < 1/0 although "F" > "1"
  st.applyState(state('A', rev(0xffffffffn, 0, MS + 1000), { available: 1 }));
  assert.ok(st.applyState(state('A', rev(0x100000000n, 0, MS), { available: 2 })));
  assert.equal(st.state('A').available, 2);
});

test('ordering: equal-LSN republish (same stored version, later time) is taken; as_of has no delta', () => {
  const st = new Store();
  const r1 = rev(100, 0, MS);
  st.applyState(state('A', r1, { views_5m: 9 }));
  const again = rev(100, 0, MS + 60_000);
  assert.equal(stored(again), stored(r1));
  const c = st.applyState(state('A', again, { views_5m: 4 }, { asOf: '2026-11-25T09:01:00.000Z' }));
  assert.ok(c, 'republish accepted');
  assert.equal(c.state.views_5m, 4);
  assert.deepEqual(c.info, { delta: null, gap: false, previous: state('A', r1, { views_5m: 9 }) });
  // the original message redelivered after the republish is older: ignored
  assert.equal(st.applyState(state('A', r1, { views_5m: 9 })), null);
  // the next change's delta_from is the stored version: it matches the republished rev
  const r3 = rev(101, 0, MS + 61_000);
  const c3 = st.applyState(state('A', r3, { views_5m: 5 }, { base: again, delta: { views: 1 } }));
  assert.deepEqual(c3.info.delta, { views: 1 });
  assert.equal(c3.info.gap, false);
});

test('ordering: pieces of one transaction', () => {
  const st = new Store();
  const p0 = rev(500, 0, MS);
  const p1 = rev(500, 1, MS);
  const p2 = rev(500, 2, MS - 10); // read earlier from Redis, still the later piece
  st.applyState(state('A', p0, { on_hand: 1 }));
  assert.ok(st.applyState(state('A', p2, { on_hand: 3 }, { base: p1 })));
  assert.equal(st.applyState(state('A', p1, { on_hand: 2 }, { base: p0 })), null);
  assert.equal(st.state('A').on_hand, 3);
});

test('gap: delta_from not matching the held rev flags a gap and takes the absolute values', () => {
  const st = new Store();
  const r1 = rev(100);
  const r2 = rev(200);
  const r3 = rev(300);
  st.applyState(state('A', r1, { available: 10 }));
  // r2 was missed; r3's delta is relative to r2
  const c = st.applyState(state('A', r3, { available: 4, on_hand: 4 }, { base: r2, delta: { available: -3 } }));
  assert.equal(c.info.gap, true);
  assert.equal(c.info.delta, null, 'a delta against a state we never had is not reported');
  assert.equal(st.state('A').available, 4);
  assert.equal(st.state('A').on_hand, 4);
  // the next one is contiguous again
  const c4 = st.applyState(state('A', rev(400), { available: 3 }, { base: r3, delta: { available: -1 } }));
  assert.equal(c4.info.gap, false);
  assert.deepEqual(c4.info.delta, { available: -1 });
});

test('gap: a first message with a delta is no gap (nothing was held)', () => {
  const st = new Store();
  const c = st.applyState(state('A', rev(200), {}, { base: rev(100) }));
  assert.deepEqual(c.info, { delta: null, gap: false, previous: null });
});

test('gone: an empty payload removes; older messages stay ignored; a greater rev brings it back', () => {
  const st = new Store();
  const r1 = rev(100);
  st.applyState(state('A', r1, { available: 3 }));
  const g = st.applyGone('A', rev(200));
  assert.equal(g.state, null);
  assert.equal(g.info.previous.available, 3);
  assert.equal(st.state('A'), null);
  assert.equal(st.states().has('A'), false);
  assert.equal(st.applyState(state('A', r1, { available: 3 })), null, 'the old retained state arrives late');
  assert.equal(st.applyGone('A', rev(200)), null, 'duplicate gone');
  const back = st.applyState(state('A', rev(300), { available: 1 }));
  assert.ok(back);
  assert.equal(back.info.previous, null);
  assert.equal(st.state('A').available, 1);
});

test('gone: an older gone is ignored; one without rev removes what is held', () => {
  const st = new Store();
  st.applyState(state('A', rev(200)));
  assert.equal(st.applyGone('A', rev(100)), null);
  assert.ok(st.state('A'));
  assert.ok(st.applyGone('A', null));
  assert.equal(st.state('A'), null);
  assert.equal(st.applyGone('A', null), null, 'nothing left to remove');
  assert.equal(st.applyGone('B', null), null, 'unknown SKU');
  assert.equal(st.applyState(state('A', rev(200))), null, 'the gone kept the rev it removed');
});

test('gone: an HTTP gone object for an unknown SKU orders a late older state', () => {
  const st = new Store();
  assert.equal(st.applyItem(gone('A', rev(300))), null);
  assert.equal(st.applyState(state('A', rev(200))), null);
  assert.ok(st.applyItem(state('A', rev(301))));
});

test('HTTP states and MQTT states are ordered together', () => {
  const st = new Store();
  st.applyItem(state('A', rev(300), { available: 3 }));
  assert.equal(st.applyState(state('A', rev(250), { available: 9 })), null);
  assert.ok(st.applyItem(state('A', rev(300, 0, MS + 1), { available: 3 })));
  assert.deepEqual([...st.states().keys()], ['A']);
});

test('full listing: a SKU held before it, not listed and unchanged, is swept as gone', () => {
  const st = new Store();
  st.applyState(state('A', rev(1)));
  st.applyState(state('B', rev(1)));
  st.applyState(state('C', rev(1)));
  const mark = st.markFull();
  st.applyState(state('C', rev(2))); // changed over MQTT during the listing
  const swept = st.sweepFull(mark, new Set(['A']));
  assert.deepEqual(swept.map((c) => [c.sku, c.state]), [['B', null]]);
  assert.deepEqual([...st.states().keys()].sort(), ['A', 'C']);
});

test('alerts: deduped by id in a bounded set', () => {
  const st = new Store({ alertIdLimit: 3 });
  const a = alert('A', '1000-0');
  assert.equal(st.applyAlert(a), true);
  assert.equal(st.applyAlert({ ...a }), false, 'duplicate id');
  assert.equal(st.applyAlert(alert('B', '1000-1')), true);
  assert.equal(st.applyAlert(alert('C', '1000-2')), true);
  assert.equal(st.applyAlert({ ...a }), false, 'still remembered (3 ids)');
  assert.equal(st.applyAlert(alert('D', '1000-3')), true);
  assert.equal(st.applyAlert({ ...a }), true, 'the oldest id was forgotten');
  assert.equal(st.alertSeq, '1000-3');
});

test('alert seq: numeric by both parts, not string order', () => {
  assert.ok(compareSeq('1764061200123-10', '1764061200123-9') > 0);
  assert.ok(compareSeq('999-5', '1000-0') < 0);
  assert.ok(compareSeq('1000-0', '999-5') > 0);
  assert.equal(compareSeq('1000-7', '1000-7'), 0);
  assert.ok(compareSeq('18446744073709551616-0', '18446744073709551615-99') > 0, 'beyond 2^53');
  assert.ok(compareSeq('bogus', '1-0') < 0, 'malformed orders first');

  const st = new Store();
  st.applyAlert(alert('A', '1764061200123-9'));
  st.applyAlert(alert('B', '1764061200123-10'));
  st.applyAlert(alert('C', '1764061200123-2')); // late
  assert.equal(st.alertSeq, '1764061200123-10');
  st.noteAlertsNext('1764061200123-10');
  st.noteAlertsNext('999999999999-99');
  assert.equal(st.alertsSince, '1764061200123-10');
  st.noteAlertsNext('1764061200124-0');
  assert.equal(st.alertsSince, '1764061200124-0');
  st.resetAlertsSince();
  assert.equal(st.alertsSince, null);
});

test('alert cursor: only /v1/alerts pages move it, never a live alert', () => {
  const st = new Store();
  st.noteAlertsNext('100-0');
  // a live alert, before or after a catch-up: seen, but the cursor stays (an alert of
  // another SKU below it may still be on its way, or lost with the connection)
  assert.equal(st.applyAlert(alert('A', '300-0')), true);
  assert.equal(st.alertSeq, '300-0');
  assert.equal(st.alertsSince, '100-0', '200-0 (not delivered yet) must still be fetched');
  st.noteAlertsNext('300-0');
  st.applyAlert(alert('B', '400-0'));
  assert.equal(st.alertsSince, '300-0');
});
