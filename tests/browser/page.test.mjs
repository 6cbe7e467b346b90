// Browser test of the live demo page: starts the demo stack (dist/demo/stack.sh, no load
// generator), opens the page in headless Chromium (playwright-core, system chromium: no
// browser download), changes one SKU's stock in PostgreSQL and waits until the page shows
// it. Prints the measured commit-to-screen latency; saves target/browser/page.png. Then
// drives SKUs across their low-stock threshold and checks the rows show the alert state
// skusync holds (state member `alert_state`), live and on a page opened afterwards.
//
// Env: SKUSYNC_BIN (skusync binary; default target/debug/skusync), CHROMIUM (default
// /usr/bin/chromium).
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, execFileSync } from 'node:child_process';
import { mkdtempSync, mkdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const SKU = 'SKU-00001';
const LOC = 'WH-BER';
const NEW_ON_HAND = 4242;
const UPDATE_DEADLINE_MS = 10_000;
const SKU_ALERTS = 'SKU-00002'; // hot SKUs (seed.sql): low_stock 12, nothing else changes them
const SKU_LATE = 'SKU-00003';
const SKUS = Number(process.env.DEMO_SKUS || 1500);

let stack = null; // the stack.sh child (own process group)
let stackExit = null;
let browser = null;
let profileDir = null;

// Tear everything down, also when the test failed half-way.
async function teardown() {
  if (browser) await browser.close().catch(() => {});
  browser = null;
  if (profileDir) rmSync(profileDir, { recursive: true, force: true });
  profileDir = null;
  if (stack && stack.exitCode === null && stack.signalCode === null) {
    try { process.kill(-stack.pid, 'SIGTERM'); } catch {}
    const done = await Promise.race([stackExit.then(() => true), sleep(20_000).then(() => false)]);
    if (!done) try { process.kill(-stack.pid, 'SIGKILL'); } catch {}
  }
  stack = null;
}
after(teardown);
for (const sig of ['SIGINT', 'SIGTERM']) process.once(sig, () => teardown().finally(() => process.exit(130)));

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// Starts stack.sh and resolves with its DEMO_* lines once it prints DEMO_READY.
function startStack(skus) {
  const bin = process.env.SKUSYNC_BIN || path.join(root, 'target/debug/skusync');
  stack = spawn(path.join(root, 'dist/demo/stack.sh'), ['--no-load', '--quiet', '--duration', '300'], {
    cwd: root,
    env: { ...process.env, SKUSYNC_BIN: bin, DEMO_SKUS: String(skus) },
    detached: true, // own process group, so teardown can signal all of it
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  stackExit = new Promise((r) => stack.once('exit', r));
  let stderr = '';
  stack.stderr.on('data', (d) => { stderr += d; });
  return new Promise((resolve, reject) => {
    const info = {};
    let buf = '';
    const timer = setTimeout(() => reject(new Error(`stack not ready in 120 s\n${stderr}`)), 120_000);
    stack.stdout.on('data', (d) => {
      buf += d;
      let i;
      while ((i = buf.indexOf('\n')) >= 0) {
        const line = buf.slice(0, i).trim();
        buf = buf.slice(i + 1);
        const m = /^DEMO_([A-Z_]+)=(.*)$/.exec(line);
        if (m) info[m[1]] = m[2];
        if (line === 'DEMO_READY') { clearTimeout(timer); resolve(info); }
      }
    });
    stack.once('exit', (code) => { clearTimeout(timer); reject(new Error(`stack.sh exited (${code})\n${stderr}`)); });
  });
}

function psql(info, sql) {
  return execFileSync('psql', ['-X', '-At', '-v', 'ON_ERROR_STOP=1', '-h', '127.0.0.1', '-p', info.PG_PORT,
    '-U', 'postgres', '-d', 'postgres', '-c', sql], { encoding: 'utf8' }).trim();
}

let info = null; // the stack's DEMO_* values
let page = null;
const errors = []; // page errors and console errors of every page

let blank = null; // the page the persistent context opened with (used first)

async function openPage(url) {
  const p = blank ?? (await browser.newPage());
  blank = null;
  p.on('pageerror', (e) => errors.push(String(e)));
  p.on('console', (m) => { if (m.type() === 'error') errors.push(m.text()); });
  await p.goto(url);
  await p.waitForSelector('#conn[data-state="connected"]', { timeout: 15_000 });
  // retained status arrives even behind >1000 retained SKU states (broker queue limits)
  await p.waitForSelector('#daemon[data-state="online"]', { timeout: 15_000 });
  return p;
}

before(async () => {
  info = await startStack(SKUS);
  console.log(`stack ready: page ${info.PAGE_URL}, broker ws ${info.WS_PORT}, postgres ${info.PG_PORT}, api ${info.API_URL}`);
  profileDir = mkdtempSync(path.join(tmpdir(), 'skusync-chromium-'));
  browser = await chromium.launchPersistentContext(profileDir, {
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    headless: true,
    viewport: { width: 1500, height: 900 },
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
  blank = browser.pages()[0] ?? null;
}, { timeout: 180_000 });

test('live page shows a stock change made in PostgreSQL', { timeout: 240_000 }, async () => {
  page = await openPage(info.PAGE_URL);
  await page.fill('#pin', SKU);
  await page.press('#pin', 'Enter');
  const cell = `tr[data-sku="${SKU}"] td[data-field="available"]`;
  // the retained state arrives first: a number
  await page.waitForFunction((sel) => /^-?\d+$/.test(document.querySelector(sel)?.textContent ?? ''), cell,
    { timeout: 15_000 });
  const before = await page.textContent(cell);
  // measure in steady state: every SKU has reached the page (over MQTT or the catch-up;
  // `demo.client` is the page's skusync client)
  await page.waitForFunction((n) => window.demo.client.states().size >= n, SKUS, { timeout: 60_000 });
  // the catch-up over [api] ran (CORS and all)
  await page.waitForFunction(() => window.demo.catchUps >= 1, null, { timeout: 30_000 });

  const t0 = performance.now();
  const expected = psql(info,
    `UPDATE inventory SET on_hand = ${NEW_ON_HAND} WHERE sku = '${SKU}' AND location = '${LOC}';
     SELECT sum(on_hand - reserved) FROM inventory WHERE sku = '${SKU}'`).split('\n').pop();
  await page.waitForFunction(([sel, want]) => document.querySelector(sel)?.textContent === want,
    [cell, expected], { timeout: UPDATE_DEADLINE_MS, polling: 'raf' });
  const ms = Math.round(performance.now() - t0);
  console.log(`${SKU} available ${before} -> ${expected}: shown in the browser ${ms} ms after the UPDATE was sent`);

  const loc = await page.textContent(`tr[data-sku="${SKU}"] td[data-field="loc:${LOC}"]`);
  assert.match(loc, new RegExp(`^${NEW_ON_HAND - Number(psql(info,
    `SELECT reserved FROM inventory WHERE sku = '${SKU}' AND location = '${LOC}'`))}\\b`));
  // times are UTC, 24-hour
  assert.match(await page.textContent(`tr[data-sku="${SKU}"] td[data-field="ts"]`), /^([01]\d|2[0-3]):[0-5]\d:[0-5]\d$/);

  mkdirSync(path.join(root, 'target/browser'), { recursive: true });
  await page.waitForTimeout(300);
  await page.screenshot({ path: path.join(root, 'target/browser/page.png'), fullPage: true });
  assert.deepEqual(errors, [], 'no errors in the page');
});

// The SKU's state as the [api] serves it.
async function apiState(sku) {
  const r = await fetch(`${info.API_URL}/v1/sku/${sku}`);
  assert.equal(r.status, 200, `GET /v1/sku/${sku}`);
  return r.json();
}

// Sets the SKU's availability to `x` in one transaction (all of it in LOC) and returns
// what PostgreSQL then holds.
function setAvailable(sku, x) {
  return Number(psql(info,
    `UPDATE inventory SET on_hand = reserved + CASE WHEN location = '${LOC}' THEN ${x} ELSE 0 END WHERE sku = '${sku}';
     SELECT sum(on_hand - reserved) FROM inventory WHERE sku = '${sku}'`).split('\n').pop());
}

// Waits until the SKU's row shows `available` and the alert state `alert` (data-alert).
async function rowShows(p, sku, available, alert, what) {
  try {
    await p.waitForFunction(([sku, want, alert]) => {
      const tr = document.querySelector(`tr[data-sku="${sku}"]`);
      return !!tr && tr.querySelector('td[data-field="available"]').textContent === want && tr.dataset.alert === alert;
    }, [sku, String(available), alert], { timeout: UPDATE_DEADLINE_MS });
  } catch (e) {
    const now = await p.evaluate((sku) => {
      const tr = document.querySelector(`tr[data-sku="${sku}"]`);
      return tr ? `available ${tr.querySelector('td[data-field="available"]').textContent}, data-alert ${tr.dataset.alert}` : 'no row';
    }, sku);
    throw new Error(`${what}: ${sku} should show available ${available} and ${alert}; shows ${now}`);
  }
}

const alertListed = (p, type, sku) => p.waitForFunction(([type, sku]) =>
  [...document.querySelectorAll(`#alerts li.${type} .s`)].some((e) => e.textContent.startsWith(sku)),
[type, sku], { timeout: UPDATE_DEADLINE_MS });

test('a row shows the alert state skusync holds: low, recovered, out, recovered, without a reload', { timeout: 120_000 }, async () => {
  assert.ok(page, 'the first test opened the page');
  const { threshold } = await apiState(SKU_ALERTS);
  assert.equal(typeof threshold, 'number', 'the state carries its threshold');
  const hysteresis = Math.max(1, Math.floor(threshold / 5));
  const high = threshold + hysteresis + 30;
  const low = Math.max(1, threshold - 2);
  await page.evaluate(() => { window.sameDocument = true; });
  await page.fill('#pin', SKU_ALERTS);
  await page.press('#pin', 'Enter');

  await rowShows(page, SKU_ALERTS, setAvailable(SKU_ALERTS, high), 'ok', 'well stocked');
  await rowShows(page, SKU_ALERTS, setAvailable(SKU_ALERTS, low), 'low', 'below the threshold');
  await alertListed(page, 'low_stock', SKU_ALERTS);
  // above the threshold but within the hysteresis: skusync keeps it low (no re-arm yet);
  // a page computing the state from `available` would say ok
  await rowShows(page, SKU_ALERTS, setAvailable(SKU_ALERTS, threshold + hysteresis), 'low', 'within the hysteresis');
  // recovered: no alert is sent for low -> ok, only the state says so
  await rowShows(page, SKU_ALERTS, setAvailable(SKU_ALERTS, high), 'ok', 'recovered from low');
  await rowShows(page, SKU_ALERTS, setAvailable(SKU_ALERTS, 0), 'out', 'out of stock');
  await alertListed(page, 'out_of_stock', SKU_ALERTS);
  await rowShows(page, SKU_ALERTS, setAvailable(SKU_ALERTS, high), 'ok', 'back in stock');
  await alertListed(page, 'back_in_stock', SKU_ALERTS);

  assert.equal(await page.evaluate(() => window.sameDocument), true, 'the page was not reloaded');
  await page.screenshot({ path: path.join(root, 'target/browser/page-alerts.png'), fullPage: true });
  assert.deepEqual(errors, [], 'no errors in the page');
});

test('a page opened after an alert made a SKU low shows it low at once', { timeout: 120_000 }, async () => {
  const { threshold } = await apiState(SKU_LATE);
  const high = threshold + Math.max(1, Math.floor(threshold / 5)) + 30;
  const low = Math.max(1, threshold - 3);
  // make sure the next step crosses (the seed may have started it low): ok first
  setAvailable(SKU_LATE, high);
  await until(async () => (await apiState(SKU_LATE)).alert_state === 'ok', `${SKU_LATE} ok`);
  setAvailable(SKU_LATE, low);
  await until(async () => (await apiState(SKU_LATE)).alert_state === 'low', `${SKU_LATE} low`);
  // the alert is in the history too
  await until(async () => {
    const r = await (await fetch(`${info.API_URL}/v1/alerts?limit=500`)).json();
    return r.alerts.some((a) => a.sku === SKU_LATE && a.type === 'low_stock' && a.available === low);
  }, `the low_stock alert of ${SKU_LATE} in /v1/alerts`);

  // nothing changes any more: the second page learns it from the state alone
  const t0 = performance.now();
  const late = await openPage(`${info.PAGE_URL}?pin=${SKU_LATE}`);
  await rowShows(late, SKU_LATE, low, 'low', 'a page opened after the alert');
  console.log(`${SKU_LATE} shown low ${Math.round(performance.now() - t0)} ms after opening the page`);
  // and the alert itself, from the history (/v1/alerts) it fetched on connecting
  await alertListed(late, 'low_stock', SKU_LATE);
  assert.equal(await late.locator(`tr[data-sku="${SKU_LATE}"]`).getAttribute('data-alert'), 'low');
  await late.close();
  assert.deepEqual(errors, [], 'no errors in the pages');
});

async function until(pred, what, timeoutMs = UPDATE_DEADLINE_MS) {
  const t0 = Date.now();
  while (!(await pred())) {
    if (Date.now() - t0 > timeoutMs) throw new Error(`timed out waiting for ${what}`);
    await sleep(250);
  }
}
