// End-to-end tests of the web console in Debian's Chromium (playwright-core)
// against `wardflow demo`: a clinician signs in and watches the unit's tiles
// move; a scripted desaturation raises an alert that reaches the browser
// within 2 s of the MQTT feed; acknowledging it in the browser is seen by an
// MQTT subscriber; a patient signs in with their key, revokes a consent, and
// the clinician of another unit loses access. Each test saves screenshots
// under tests/output/browser.

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { join } from 'node:path';
import {
  HERE, launch, screenshot, signIn, startDemo, subscribe, waitFor, wardflowBackground,
} from './lib.mjs';

let demo;
let browser;

/** axe-core's script, injected into pages to check them (WCAG 2.1 AA). */
const AXE = readFileSync(createRequire(import.meta.url).resolve('axe-core/axe.min.js'), 'utf8');

/** The WCAG A and AA violations axe finds on the page, serious or critical. */
async function accessibilityViolations(page) {
  await page.addScriptTag({ content: AXE });
  const result = await page.evaluate(async () =>
    // eslint-disable-next-line no-undef
    axe.run(document, { runOnly: { type: 'tag', values: ['wcag2a', 'wcag2aa', 'wcag21a', 'wcag21aa'] } }));
  return result.violations
    .filter((v) => v.impact === 'serious' || v.impact === 'critical')
    .map((v) => `${v.id} (${v.impact}): ${v.help} — ${v.nodes.slice(0, 3).map((n) => n.target.join(' ')).join('; ')}`);
}

before(async () => {
  demo = await startDemo({ patients: 20 });
  browser = await launch();
});

after(async () => {
  await browser?.close();
  await demo?.stop();
});

/** The `data-t` of a tile's value (ms of the reading it shows). */
async function valueTime(page, patient, metric) {
  const t = await page.getByTestId(`tile-${patient}-${metric}`).getAttribute('data-t');
  return t ? Number(t) : 0;
}

describe('console', () => {
  test('a clinician signs in and sees the unit tiles update live', async () => {
    const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
    const page = await signIn(context, demo.url, { role: 'clinician', id: 'demo-rn-a', secret: demo.rnA });
    // demo-rn-a covers icu-a: the demo puts even-numbered patients there.
    const tile = page.getByTestId('tile-bed-patient-0000');
    await tile.waitFor({ timeout: 10_000 });
    assert.equal(await page.getByTestId('tile-bed-patient-0001').count(), 0, 'an icu-b bed is not shown');
    const first = await waitFor(() => valueTime(page, 'bed-patient-0000', 'hr'), 10_000, 'a heart rate');
    const later = await waitFor(async () => {
      const t = await valueTime(page, 'bed-patient-0000', 'hr');
      return t > first ? t : 0;
    }, 5_000, 'the heart rate to update');
    assert.ok(later > first);
    const hr = await page.getByTestId('tile-bed-patient-0000-hr').innerText();
    assert.match(hr, /\d/, 'the tile shows a number');
    assert.equal(await tile.getAttribute('data-offline'), 'false');
    // Updates arrive on the stream: no request is made for them.
    const requests = [];
    page.on('request', (r) => requests.push(r.url()));
    await page.waitForTimeout(2_000);
    assert.deepEqual(requests.filter((u) => u.includes('/v1/console/tiles')), [], 'no polling');
    await screenshot(page, '01-unit-overview');
    await context.close();
  });

  test('a scripted desaturation reaches the browser within 2 s, and an acknowledgement there reaches MQTT', async () => {
    const sub = await subscribe({
      port: demo.mqttPort,
      user: 'demo-rn',
      password: demo.rn,
      topics: ['wardflow/v1/alerts/icu-a/#'],
    });
    const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
    const page = await signIn(context, demo.url, { role: 'clinician', id: 'demo-rn-a', secret: demo.rnA });
    await page.getByTestId('nav-alerts').click();
    const script = wardflowBackground([
      '--data-dir', demo.dataDir, 'simulate', '--register',
      '--scenario', join(HERE, 'desaturation.toml'),
      '--target', `mqtt://127.0.0.1:${demo.mqttPort}`,
    ]);
    try {
      // Watch for the row in the page itself, so the time is the page's.
      const seen = page.evaluate(() => new Promise((resolve) => {
        const find = () => document.querySelector('[data-testid^="alert-"][data-patient="e2e-desat"][data-rule="spo2-low"]');
        const done = () => resolve({ at: Date.now(), id: find().getAttribute('data-testid').slice('alert-'.length) });
        if (find()) return done();
        new MutationObserver((_, obs) => { if (find()) { obs.disconnect(); done(); } })
          .observe(document.body, { childList: true, subtree: true, attributes: true });
      }));
      const raised = await waitFor(
        () => sub.messages.find((m) => m.json?.patient === 'e2e-desat' && m.json.rule === 'spo2-low' && m.json.event === 'raised'),
        90_000,
        `the desaturation alert on MQTT (simulator: ${script.output()})`,
      );
      const inBrowser = await Promise.race([
        seen,
        new Promise((_, reject) => setTimeout(() => reject(new Error('the alert never appeared in the browser')), 10_000)),
      ]);
      const behindMqtt = inBrowser.at - raised.at;
      const behindRaise = inBrowser.at - raised.json.at_ns / 1e6;
      console.log(`alert in the browser ${behindMqtt} ms after the MQTT subscriber, ${behindRaise.toFixed(0)} ms after it was raised`);
      assert.equal(inBrowser.id, raised.json.id);
      assert.ok(behindMqtt < 2_000, `the browser showed the alert ${behindMqtt} ms after MQTT`);
      assert.ok(behindRaise < 2_000, `the browser showed the alert ${behindRaise} ms after it was raised`);
      const row = page.getByTestId(`alert-${raised.json.id}`);
      assert.equal(await row.getAttribute('data-priority'), 'medium');
      await screenshot(page, '02-desaturation-alert');

      // Acknowledge in the browser: the MQTT subscriber sees it.
      await page.getByTestId(`ack-${raised.json.id}`).click();
      const acked = await waitFor(
        () => sub.messages.find((m) => m.json?.id === raised.json.id && m.json.state === 'acknowledged'),
        5_000,
        'the acknowledgement on MQTT',
      );
      assert.equal(acked.json.by, 'demo-rn-a');
      await waitFor(async () => (await row.getAttribute('data-state')) === 'acknowledged', 5_000, 'the row to show it');
      await screenshot(page, '03-alert-acknowledged');
    } finally {
      script.stop();
      sub.stop();
      await context.close();
    }
  });

  test('a patient revokes a consent and the clinician of another unit loses access', async () => {
    // demo-rn-b covers icu-b; demo-desat lies in icu-a and consented to them.
    const nurse = await browser.newContext({ viewport: { width: 1024, height: 768 } });
    const rnB = await signIn(nurse, demo.url, { role: 'clinician', id: 'demo-rn-b', secret: demo.rnB });
    await rnB.getByTestId('tile-demo-desat').waitFor({ timeout: 10_000 });
    await rnB.goto(`${demo.url}#/patient/demo-desat`);
    await rnB.getByTestId('patient-demo-desat').waitFor({ timeout: 10_000 });
    await rnB.getByTestId('chart-spo2').waitFor({ timeout: 10_000 });
    assert.equal(await rnB.getByTestId('access-denied').count(), 0);
    await screenshot(rnB, '04-consented-patient');

    // A tablet: the patient's own view.
    const home = await browser.newContext({ viewport: { width: 820, height: 1180 }, hasTouch: true });
    const patient = await signIn(home, demo.url, { role: 'patient', patient: 'demo-desat', key: demo.patientKey('demo-desat') });
    await patient.getByTestId('nav-me').click();
    const row = patient.locator('[data-testid^="consent-"][data-revoked="false"]').filter({ hasText: 'demo-rn-b' });
    await row.waitFor({ timeout: 10_000 });
    const grant = (await row.getAttribute('data-testid')).slice('consent-'.length);
    await screenshot(patient, '05-patient-consents');
    await patient.getByTestId(`revoke-${grant}`).click();
    await waitFor(
      async () => (await patient.getByTestId(`consent-${grant}`).getAttribute('data-revoked')) === 'true',
      10_000,
      'the consent to show revoked',
    );
    await patient.getByTestId('access-row').first().waitFor({ timeout: 10_000 });
    await screenshot(patient, '06-consent-revoked');

    // The clinician's page loses the patient, and the server refuses them.
    await rnB.getByTestId('access-denied').waitFor({ timeout: 10_000 });
    const status = await rnB.evaluate(async () => (await fetch('/v1/console/patients/demo-desat/trend?hours=1')).status);
    assert.equal(status, 403);
    await rnB.getByTestId('nav-overview').click();
    await rnB.getByTestId('tile-bed-patient-0001').waitFor({ timeout: 10_000 });
    assert.equal(await rnB.getByTestId('tile-demo-desat').count(), 0, 'the tile is gone');
    await screenshot(rnB, '07-access-lost');
    await nurse.close();
    await home.close();
  });

  test('an administrator sees every unit and the devices page', async () => {
    const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
    const page = await signIn(context, demo.url, { role: 'admin', id: 'demo-admin', secret: demo.admin });
    await page.getByTestId('tile-bed-patient-0000').waitFor({ timeout: 10_000 });
    await page.getByTestId('tile-bed-patient-0001').waitFor({ timeout: 10_000 });
    await page.getByTestId('nav-devices').click();
    const device = page.getByTestId('device-bed-0000');
    await device.waitFor({ timeout: 10_000 });
    assert.equal(await device.getAttribute('data-status'), 'online');
    // Keyboard only: Tab reaches the navigation.
    await page.keyboard.press('Tab');
    const focused = await page.evaluate(() => document.activeElement?.tagName);
    assert.ok(['A', 'BUTTON', 'SELECT', 'INPUT'].includes(focused), `focus on ${focused}`);
    await screenshot(page, '08-devices');
    await context.close();
  });

  test('every screen passes axe-core\'s WCAG 2.1 AA checks, and a tablet can use the overview', async () => {
    // The sign-in page.
    // The console's policy allows only its own scripts: axe comes in past it.
    const anon = await browser.newContext({ bypassCSP: true });
    const login = await anon.newPage();
    await login.goto(demo.url);
    await login.getByTestId('login-submit').waitFor();
    assert.deepEqual(await accessibilityViolations(login), [], 'sign-in page');
    await anon.close();
    // A clinician's screens, on a tablet (768 px wide, touch).
    const tablet = await browser.newContext({ viewport: { width: 768, height: 1024 }, hasTouch: true, isMobile: true, bypassCSP: true });
    const page = await signIn(tablet, demo.url, { role: 'clinician', id: 'demo-rn-b', secret: demo.rnB });
    await page.getByTestId('tile-bed-patient-0001').waitFor({ timeout: 10_000 });
    assert.deepEqual(await accessibilityViolations(page), [], 'overview');
    const width = await page.evaluate(() => document.documentElement.scrollWidth);
    assert.ok(width <= 768, `no sideways scrolling on a tablet (${width} px)`);
    const target = await page.getByTestId('nav-alerts').boundingBox();
    assert.ok(target.height >= 44, `touch targets are at least 44 px (${target.height})`);
    await screenshot(page, '10-tablet-overview');
    for (const [nav, ready] of [['nav-alerts', 'nav-alerts'], ['nav-devices', 'device-bed-0001']]) {
      await page.getByTestId(nav).click();
      await page.getByTestId(ready).first().waitFor({ timeout: 10_000 });
      assert.deepEqual(await accessibilityViolations(page), [], nav);
    }
    await page.goto(`${demo.url}#/patient/bed-patient-0001`);
    await page.getByTestId('chart-hr').waitFor({ timeout: 10_000 });
    assert.deepEqual(await accessibilityViolations(page), [], 'patient page');
    await tablet.close();
    // The patient's own page.
    const home = await browser.newContext({ bypassCSP: true });
    const patient = await signIn(home, demo.url, { role: 'patient', patient: 'demo-tachy', key: demo.patientKey('demo-tachy') });
    await patient.getByTestId('nav-me').click();
    await patient.getByTestId('access-row').first().waitFor({ timeout: 10_000 }).catch(() => {});
    assert.deepEqual(await accessibilityViolations(patient), [], 'my data');
    await home.close();
  });

  test('a wrong secret is refused with a message, and the API refuses without a session', async () => {
    const context = await browser.newContext();
    const page = await context.newPage();
    await page.goto(demo.url);
    await page.getByTestId('login-role').selectOption('clinician');
    await page.getByTestId('login-id').fill('demo-rn-a');
    await page.getByTestId('login-secret').fill('not-the-secret-at-all');
    await page.getByTestId('login-submit').click();
    await page.getByTestId('login-error').waitFor({ timeout: 10_000 });
    const status = await page.evaluate(async () => (await fetch('/v1/console/tiles')).status);
    assert.equal(status, 401);
    await screenshot(page, '09-sign-in-refused');
    await context.close();
  });
});
