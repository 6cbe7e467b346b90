// dist/ is committed so the demo page loads the library without a build step; it must be
// exactly what tsc makes of src/ (npm test builds that into build/ first).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readdirSync, readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';

const dist = fileURLToPath(new URL('../dist/', import.meta.url));
const fresh = fileURLToPath(new URL('../build/', import.meta.url));

test('the committed dist/ matches a fresh tsc build of src/ (else: npm run build)', () => {
  const files = readdirSync(fresh).sort();
  assert.ok(files.includes('index.js') && files.includes('index.d.ts'), 'build/ holds a fresh build');
  assert.deepEqual(readdirSync(dist).sort(), files, 'the same files');
  for (const f of files) {
    assert.ok(readFileSync(dist + f, 'utf8') === readFileSync(fresh + f, 'utf8'), `dist/${f} is stale: run npm run build`);
  }
});
