// What the browser tests share: the `wardflow demo` they run against (its
// accounts read from what it prints), Debian's Chromium driven by
// playwright-core, an MQTT subscriber (mosquitto_sub), and where
// screenshots go.

import { spawn } from 'node:child_process';
import { mkdirSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

export const HERE = dirname(fileURLToPath(import.meta.url));
export const ROOT = resolve(HERE, '..', '..');
/** Screenshots and reports: the repository's test output. */
export const OUTPUT = process.env.WARDFLOW_TEST_OUTPUT ?? join(ROOT, 'tests', 'output', 'browser');
export const BIN = process.env.WARDFLOW_BIN ?? join(ROOT, 'target', 'release', 'wardflow');
export const CHROMIUM = process.env.CHROMIUM ?? '/usr/bin/chromium';

mkdirSync(OUTPUT, { recursive: true });

/** Waits until `fn` returns something truthy, or throws after `ms`. */
export async function waitFor(fn, ms, what) {
  const until = Date.now() + ms;
  for (;;) {
    const v = await fn();
    if (v) return v;
    if (Date.now() > until) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/**
 * Starts `wardflow demo` on free loopback ports with its own data directory
 * and reads the addresses and accounts it prints.
 */
export async function startDemo({ patients = 20, rate = 7, extra = [] } = {}) {
  const dataDir = mkdtempSync(join(tmpdir(), 'wardflow-browser-'));
  const args = [
    '--data-dir', dataDir, 'demo',
    '--patients', String(patients), '--rate', String(rate),
    '--mqtt', '127.0.0.1:0', '--http', '127.0.0.1:0', '--flight', '127.0.0.1:0',
    ...extra,
  ];
  const child = spawn(BIN, args, { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, RUST_LOG: 'warn' } });
  let out = '';
  let err = '';
  child.stdout.on('data', (d) => { out += d; });
  child.stderr.on('data', (d) => { err += d; });
  const exited = new Promise((r) => child.on('exit', (code) => r(code)));
  let code = null;
  exited.then((c) => { code = c; });
  await waitFor(() => {
    if (code !== null) throw new Error(`wardflow demo exited (${code}):\n${out}\n${err}`);
    return out.includes('one line a second');
  }, 60_000, 'the demo to start');
  const pick = (re, what) => {
    const m = out.match(re);
    if (!m) throw new Error(`the demo did not print ${what}:\n${out}`);
    return m[1];
  };
  const demo = {
    child,
    dataDir,
    mqttPort: Number(pick(/on MQTT 127\.0\.0\.1:(\d+)/, 'its MQTT port')),
    url: pick(/the web console: (http:\/\/\S+)/, 'the console URL'),
    rn: pick(/-u demo-rn -P (\S+)/, 'the secret of demo-rn'),
    rnA: pick(/clinician demo-rn-a \(icu-a\), secret (\S+)/, 'the secret of demo-rn-a'),
    rnB: pick(/clinician demo-rn-b \(icu-b\), secret ([0-9a-f]+)/, 'the secret of demo-rn-b'),
    admin: pick(/administrator demo-admin, secret (\S+)/, 'the secret of demo-admin'),
    keysDir: pick(/their keys are in (\S+)/, 'where the patient keys are'),
    output: () => out + err,
    patientKey(patient) {
      return readFileSync(join(this.keysDir, patient), 'utf8').trim();
    },
    async stop() {
      if (code === null) {
        child.kill('SIGTERM');
        await Promise.race([exited, new Promise((r) => setTimeout(r, 30_000))]);
        if (code === null) child.kill('SIGKILL');
      }
      rmSync(dataDir, { recursive: true, force: true });
    },
  };
  return demo;
}

/** Runs a wardflow command to its end (stdout, or throws). */
export function wardflow(args, { timeoutMs = 120_000 } = {}) {
  return new Promise((resolvePromise, reject) => {
    const child = spawn(BIN, args, { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, RUST_LOG: 'warn' } });
    let out = '';
    child.stdout.on('data', (d) => { out += d; });
    child.stderr.on('data', (d) => { out += d; });
    const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs);
    child.on('exit', (code) => {
      clearTimeout(timer);
      if (code === 0) resolvePromise(out);
      else reject(new Error(`wardflow ${args.join(' ')} exited ${code}:\n${out}`));
    });
  });
}

/** Starts a long-running wardflow command; `stop()` ends it. */
export function wardflowBackground(args) {
  const child = spawn(BIN, args, { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, RUST_LOG: 'warn' } });
  let out = '';
  child.stdout.on('data', (d) => { out += d; });
  child.stderr.on('data', (d) => { out += d; });
  return {
    output: () => out,
    stop() { child.kill('SIGTERM'); },
  };
}

/**
 * mosquitto_sub as a clinician on `topics`: every message with the time it
 * arrived here (ms), parsed as JSON.
 */
export async function subscribe({ port, user, password, topics }) {
  const args = ['-h', '127.0.0.1', '-p', String(port), '-u', user, '-P', password, '-q', '1', '-V', 'mqttv5', '-F', '%t\t%p'];
  for (const t of topics) args.push('-t', t);
  const child = spawn('mosquitto_sub', args, { stdio: ['ignore', 'pipe', 'pipe'] });
  const messages = [];
  let buffer = '';
  let err = '';
  child.stdout.on('data', (d) => {
    buffer += d;
    let i;
    while ((i = buffer.indexOf('\n')) >= 0) {
      const line = buffer.slice(0, i);
      buffer = buffer.slice(i + 1);
      const [topic, payload] = line.split('\t');
      try {
        messages.push({ at: Date.now(), topic, json: JSON.parse(payload) });
      } catch {
        messages.push({ at: Date.now(), topic, raw: payload });
      }
    }
  });
  child.stderr.on('data', (d) => { err += d; });
  // mosquitto_sub has no "subscribed" signal: give it a moment, then make
  // sure it is still running (a refused connection ends it).
  await new Promise((r) => setTimeout(r, 500));
  if (child.exitCode !== null) throw new Error(`mosquitto_sub ended: ${err}`);
  return { messages, stop: () => child.kill('SIGTERM'), stderr: () => err };
}

/** Debian's Chromium, headless, with the flags a closed network needs. */
export async function launch() {
  return chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: [
      '--no-sandbox',
      '--disable-gpu',
      '--disable-quic',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
      '--disable-dev-shm-usage',
    ],
  });
}

/** Signs in on a new page of `context`. */
export async function signIn(context, url, login) {
  const page = await context.newPage();
  page.on('pageerror', (e) => console.error(`page error: ${e.message}`));
  await page.goto(url);
  await page.getByTestId('login-role').selectOption(login.role);
  if (login.role === 'patient') {
    await page.getByTestId('login-patient').fill(login.patient);
    await page.getByTestId('login-key').fill(login.key);
  } else {
    await page.getByTestId('login-id').fill(login.id);
    await page.getByTestId('login-secret').fill(login.secret);
  }
  await page.getByTestId('login-submit').click();
  await page.getByTestId('logout').waitFor({ timeout: 10_000 });
  return page;
}

export async function screenshot(page, name) {
  const path = join(OUTPUT, `${name}.png`);
  await page.screenshot({ path, fullPage: true });
  return path;
}
