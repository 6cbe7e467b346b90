// Browser test of the live demo page: starts the demo stack (dist/demo/stack.sh, no load
// generator), opens the page in headless Chromium (playwright-core, system chromium: no
// browser download), changes one SKU's stock in PostgreSQL and waits until the page shows
// it. Prints the measured commit-to-screen latency; saves target/browser/page.png.
//
// Env: SKUSYNC_BIN (skusync binary; default target/debug/skusync), CHROMIUM (default
// /usr/bin/chromium).
import { test, after } from 'node:test';
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

test('live page shows a stock change made in PostgreSQL', { timeout: 240_000 }, async () => {
  const skus = Number(process.env.DEMO_SKUS || 1500);
  const info = await startStack(skus);
  console.log(`stack ready: page ${info.PAGE_URL}, broker ws ${info.WS_PORT}, postgres ${info.PG_PORT}`);

  profileDir = mkdtempSync(path.join(tmpdir(), 'skusync-chromium-'));
  browser = await chromium.launchPersistentContext(profileDir, {
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    headless: true,
    viewport: { width: 1500, height: 900 },
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
  const page = browser.pages()[0] || (await browser.newPage());
  const errors = [];
  page.on('pageerror', (e) => errors.push(String(e)));
  page.on('console', (m) => { if (m.type() === 'error') errors.push(m.text()); });

  await page.goto(info.PAGE_URL);
  await page.waitForSelector('#conn[data-state="connected"]', { timeout: 15_000 });
  // retained status arrives even behind >1000 retained SKU states (broker queue limits)
  await page.waitForSelector('#daemon[data-state="online"]', { timeout: 15_000 });
  await page.fill('#pin', SKU);
  await page.press('#pin', 'Enter');
  const cell = `tr[data-sku="${SKU}"] td[data-field="available"]`;
  // the retained state arrives first: a number
  await page.waitForFunction((sel) => /^-?\d+$/.test(document.querySelector(sel)?.textContent ?? ''), cell,
    { timeout: 15_000 });
  const before = await page.textContent(cell);
  // measure in steady state: skusync's first publish of every SKU has reached the page
  // (`held` is app.js's SKU map)
  await page.waitForFunction((n) => held.size >= n, skus, { timeout: 60_000 });

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

  mkdirSync(path.join(root, 'target/browser'), { recursive: true });
  await page.waitForTimeout(300);
  await page.screenshot({ path: path.join(root, 'target/browser/page.png'), fullPage: true });
  assert.deepEqual(errors, [], 'no errors in the page');
});
