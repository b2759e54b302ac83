// Does the web console stay responsive with a full ward? 64 beds (62 simulated
// patients and the demo's 2 scripted ones), each monitor sending its 7 vitals
// once a second, watched by an administrator on the unit overview for
// `--minutes N` (default 10), while a nurse's routine visits the alert list
// (5 s every minute) and a patient's 24 h trends (10 s every 2 minutes).
//
// Measured in the page: every animation-frame interval and every long task
// (PerformanceObserver 'longtask'); through the DevTools protocol every 10 s:
// JS heap, DOM nodes, layout and style counts, script and task time; and every
// 10 s the age of the heart rate each tile shows (now - its data-t), the
// end-to-end staleness a nurse would see; and, as each tile's heart rate and
// temperature change, their age at that moment (a MutationObserver on data-t).
//
//   WARDFLOW_BIN=target/release/wardflow node benches/console/perf.mjs [--minutes N] [--out FILE]
//
// Writes a JSON report (default tests/output/browser/console-perf.json), a
// screenshot of the overview at the end, and prints a summary. Headless
// Chromium without a GPU rasterises in software: frame numbers are as
// measured on this machine, not what a central-station display would show.

import { readFileSync, writeFileSync, mkdirSync } from 'node:fs';
import { cpus, loadavg, totalmem, release, platform } from 'node:os';
import { dirname, isAbsolute, join, relative, resolve } from 'node:path';
import {
  BIN, OUTPUT, ROOT, launch, screenshot, signIn, startDemo, waitFor,
} from '../../tests/browser/lib.mjs';

const BEDS = 64;
const SAMPLE_MS = 10_000;
const ALERTS_EVERY_S = 60;
const ALERTS_AT_S = 20; // seconds into each minute
const ALERTS_FOR_S = 5;
const PATIENT_EVERY_S = 120;
const PATIENT_AT_S = 45; // seconds into each 2 minutes
const PATIENT_FOR_S = 10;
const TRACKED = 8; // tiles whose heart-rate age is kept sample by sample
const TILE_ROOTS = '[data-testid^="tile-"][data-offline]';
const METRICS = [
  'JSHeapUsedSize', 'JSHeapTotalSize', 'Nodes', 'Documents', 'JSEventListeners',
  'LayoutCount', 'RecalcStyleCount', 'LayoutDuration', 'RecalcStyleDuration',
  'ScriptDuration', 'TaskDuration',
];

function usage(msg) {
  if (msg) console.error(msg);
  console.error('usage: node benches/console/perf.mjs [--minutes N] [--out FILE]');
  process.exit(2);
}

function parseArgs(argv) {
  const opts = { minutes: 10, out: join(OUTPUT, 'console-perf.json') };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const value = () => {
      const v = a.includes('=') ? a.slice(a.indexOf('=') + 1) : argv[++i];
      if (v === undefined) usage(`${a} needs a value`);
      return v;
    };
    if (a === '--minutes' || a.startsWith('--minutes=')) {
      opts.minutes = Number(value());
      if (!(opts.minutes > 0)) usage('--minutes must be a positive number');
    } else if (a === '--out' || a.startsWith('--out=')) {
      const v = value();
      opts.out = isAbsolute(v) ? v : resolve(process.cwd(), v);
    } else if (a === '-h' || a === '--help') {
      usage();
    } else {
      usage(`unknown argument ${a}`);
    }
  }
  return opts;
}

// ---------------------------------------------------------------- statistics

function quantile(sorted, q) {
  if (!sorted.length) return null;
  const i = Math.min(sorted.length - 1, Math.max(0, Math.ceil(q * sorted.length) - 1));
  return sorted[i];
}

function frameStats(intervals, seconds) {
  const s = Float64Array.from(intervals).sort();
  const over = (ms) => s.filter((x) => x > ms).length;
  return {
    frames: s.length,
    fps: seconds > 0 ? s.length / seconds : null,
    p50: quantile(s, 0.5),
    p95: quantile(s, 0.95),
    p99: quantile(s, 0.99),
    max: s.length ? s[s.length - 1] : null,
    over33: over(33.4),
    over50: over(50),
    over50Share: s.length ? over(50) / s.length : null,
    over100: over(100),
  };
}

function distribution(values) {
  const s = Float64Array.from(values).sort();
  return { n: s.length, p50: quantile(s, 0.5), p95: quantile(s, 0.95), max: s.length ? s[s.length - 1] : null };
}

/** Least-squares slope of y over x. */
function slope(points) {
  if (points.length < 2) return null;
  const n = points.length;
  const mx = points.reduce((a, p) => a + p[0], 0) / n;
  const my = points.reduce((a, p) => a + p[1], 0) / n;
  let sxy = 0;
  let sxx = 0;
  for (const [x, y] of points) {
    sxy += (x - mx) * (y - my);
    sxx += (x - mx) ** 2;
  }
  return sxx > 0 ? sxy / sxx : null;
}

const round = (x, d = 1) => (x == null || Number.isNaN(x) ? null : Math.round(x * 10 ** d) / 10 ** d);
const mb = (bytes) => round(bytes / 2 ** 20, 2);

// ------------------------------------------------------------------- helpers

const sleep = (ms) => new Promise((r) => setTimeout(r, Math.max(0, ms)));

/** CPU seconds and resident memory of a process, from /proc (Linux). */
function procStat(pid) {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    const ticks = Number(fields[11]) + Number(fields[12]); // utime + stime
    const status = readFileSync(`/proc/${pid}/status`, 'utf8');
    const rss = Number(/VmRSS:\s+(\d+)/.exec(status)?.[1] ?? 0) * 1024;
    return { cpuSeconds: ticks / 100, rss };
  } catch {
    return null;
  }
}

/** The in-page probe: frame intervals and long tasks, tagged with the page they happened on. */
function installProbe() {
  const pageOf = () => {
    const h = location.hash.replace(/^#/, '') || '/';
    if (h === '/') return 'overview';
    if (h === '/alerts') return 'alerts';
    if (h.startsWith('/patient/')) return 'patient';
    return 'other';
  };
  const probe = { frames: [], pages: [], longTasks: [], arrivals: { hr: [], temp: [] }, observer: false, stopped: false };
  window.__wardflowPerf = probe;
  let last = null;
  const loop = (t) => {
    if (probe.stopped) return;
    if (last !== null) {
      probe.frames.push(t - last);
      probe.pages.push(pageOf());
    }
    last = t;
    requestAnimationFrame(loop);
  };
  requestAnimationFrame(loop);
  try {
    const obs = new PerformanceObserver((list) => {
      for (const e of list.getEntries()) {
        probe.longTasks.push({ start: e.startTime, duration: e.duration, page: pageOf(), wall: performance.timeOrigin + e.startTime });
      }
    });
    obs.observe({ type: 'longtask', buffered: false });
    probe.observer = true;
  } catch {
    probe.observer = false;
  }
  // The age of each heart rate and temperature the moment a tile shows it (now - data-t),
  // whatever the page.
  new MutationObserver((records) => {
    const now = Date.now();
    for (const r of records) {
      const el = r.target;
      const id = el.getAttribute('data-testid') ?? '';
      const metric = id.endsWith('-hr') ? 'hr' : id.endsWith('-temp') ? 'temp' : null;
      if (!metric) continue;
      const t = Number(el.getAttribute('data-t'));
      if (t > 0 && String(t) !== r.oldValue) probe.arrivals[metric].push(now - t);
    }
  }).observe(document.body, { subtree: true, attributes: true, attributeFilter: ['data-t'], attributeOldValue: true });
  return { observer: probe.observer };
}

/** Takes what the probe gathered since the last call. */
function drainProbe() {
  const p = window.__wardflowPerf;
  const out = { frames: p.frames, pages: p.pages, longTasks: p.longTasks, arrivals: p.arrivals };
  p.frames = [];
  p.pages = [];
  p.longTasks = [];
  p.arrivals = { hr: [], temp: [] };
  return out;
}

/** Every tile root with the time of the heart rate it shows. */
function readTiles(selector) {
  const now = Date.now();
  const tiles = [];
  for (const root of document.querySelectorAll(selector)) {
    const id = root.getAttribute('data-testid').slice('tile-'.length);
    const hr = root.querySelector(`[data-testid="tile-${CSS.escape(id)}-hr"]`);
    tiles.push({
      id,
      t: hr && hr.getAttribute('data-t') ? Number(hr.getAttribute('data-t')) : 0,
      stale: hr?.getAttribute('data-stale') === 'true',
      offline: root.getAttribute('data-offline') === 'true',
      alarm: root.getAttribute('data-alarm') || null,
    });
  }
  return { now, hash: location.hash, elements: document.getElementsByTagName('*').length, tiles };
}

// ---------------------------------------------------------------------- main

async function main() {
  const opts = parseArgs(process.argv.slice(2));
  const durationMs = Math.round(opts.minutes * 60_000);
  let stopRequested = false;
  const onSignal = () => {
    if (stopRequested) return;
    stopRequested = true;
    console.error('stopping early: finishing the report');
  };
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);

  const machine = {
    node: process.version,
    platform: `${platform()} ${release()}`,
    cpus: cpus().length,
    cpuModel: cpus()[0]?.model ?? null,
    memoryGiB: round(totalmem() / 2 ** 30, 1),
    loadavgAtStart: loadavg().map((x) => round(x, 2)),
    wardflowBin: BIN,
    chromium: null,
  };

  let demo;
  let browser;
  let page;
  const report = {
    benchmark: 'console-perf',
    startedAt: new Date().toISOString(),
    config: {
      beds: BEDS, patients: 62, rate: 7, minutes: opts.minutes, sampleSeconds: SAMPLE_MS / 1000,
      viewport: { width: 1920, height: 1080 },
      routine: {
        alerts: `every ${ALERTS_EVERY_S} s at +${ALERTS_AT_S} s for ${ALERTS_FOR_S} s`,
        patient: `every ${PATIENT_EVERY_S} s at +${PATIENT_AT_S} s for ${PATIENT_FOR_S} s, 24 h range`,
      },
    },
    machine,
    note: 'Headless Chromium with --disable-gpu: frames are composited and rasterised in software on the CPU this machine shares with the engine and the simulator; frame numbers are as measured here.',
  };
  const samples = [];
  const visits = [];
  const frames = { overview: [], alerts: [], patient: [], other: [] };
  const longTasks = [];
  const pageErrors = [];
  const streamRequests = [];
  const arrivals = { hr: [], temp: [] };
  let exitCode = 0;

  try {
    console.log(`starting the demo: 62 simulated patients + 2 scripted, 7 readings/s each (${BIN})`);
    demo = await startDemo({ patients: 62, rate: 7 });
    browser = await launch();
    machine.chromium = browser.version();
    const context = await browser.newContext({ viewport: report.config.viewport });
    context.on('request', (r) => {
      if (r.url().includes('/v1/console/stream')) streamRequests.push(Date.now());
    });
    page = await signIn(context, demo.url, { role: 'admin', id: 'demo-admin', secret: demo.admin });
    page.on('pageerror', (e) => pageErrors.push({ at: Date.now(), message: e.message }));
    page.on('console', (m) => {
      if (m.type() === 'error') pageErrors.push({ at: Date.now(), message: m.text() });
    });

    // All 64 beds on the overview, each with a heart rate.
    await waitFor(async () => (await page.locator(TILE_ROOTS).count()) >= BEDS, 60_000, `${BEDS} tiles on the overview`);
    const count = await page.locator(TILE_ROOTS).count();
    if (count !== BEDS) throw new Error(`expected ${BEDS} tiles on the overview, found ${count}`);
    await waitFor(async () => {
      const r = await page.evaluate(readTiles, TILE_ROOTS);
      return r.tiles.every((t) => t.t > 0);
    }, 60_000, 'a heart rate on every tile');
    const first = await page.evaluate(readTiles, TILE_ROOTS);
    const ids = first.tiles.map((t) => t.id);
    const scripted = ids.filter((id) => id.startsWith('demo-'));
    const simulated = ids.filter((id) => !id.startsWith('demo-'));
    const step = Math.max(1, Math.floor(simulated.length / (TRACKED - scripted.length)));
    const tracked = [...scripted, ...simulated.filter((_, i) => i % step === 0)].slice(0, TRACKED);
    const patientsToVisit = [...scripted, ...simulated.filter((_, i) => i % 9 === 4)];
    report.config.tiles = count;
    report.config.tracked = tracked;
    console.log(`signed in as demo-admin: ${count} tiles on the overview; Chromium ${machine.chromium}, node ${machine.node}, ${machine.cpus} CPUs`);

    const cdp = await context.newCDPSession(page);
    await cdp.send('Performance.enable', { timeDomain: 'timeTicks' });
    const readMetrics = async () => {
      const { metrics } = await cdp.send('Performance.getMetrics');
      const m = Object.fromEntries(metrics.map((x) => [x.name, x.value]));
      const out = Object.fromEntries(METRICS.map((k) => [k, m[k] ?? null]));
      try {
        const dom = await cdp.send('Memory.getDOMCounters');
        out.domCounters = { documents: dom.documents, nodes: dom.nodes, jsEventListeners: dom.jsEventListeners };
      } catch {
        out.domCounters = null;
      }
      return out;
    };
    const heapAfterGc = async () => {
      await cdp.send('HeapProfiler.enable');
      await cdp.send('HeapProfiler.collectGarbage');
      await cdp.send('HeapProfiler.disable');
      const m = await readMetrics();
      return { heapUsed: m.JSHeapUsedSize, nodes: m.Nodes, domNodes: m.domCounters?.nodes ?? null };
    };
    const gcStart = await heapAfterGc();

    const probeInfo = await page.evaluate(installProbe);
    report.config.longTaskObserver = probeInfo.observer;
    // Check the probe sees what it should: a 120 ms busy task must show as a long task and a slow frame.
    await page.evaluate(() => new Promise((r) => requestAnimationFrame(() => {
      const until = performance.now() + 120;
      while (performance.now() < until) { /* busy */ }
      setTimeout(r, 300);
    })));
    const check = await page.evaluate(drainProbe);
    report.config.probeSelfCheck = {
      longTasks: check.longTasks.map((x) => round(x.duration)),
      slowFrames: check.frames.filter((x) => x > 100).map((x) => round(x)),
    };
    if (probeInfo.observer && !check.longTasks.some((x) => x.duration >= 100)) {
      console.warn('warning: the long-task observer did not see a 120 ms task');
    }
    if (!check.frames.some((x) => x > 100)) console.warn('warning: the frame loop did not see a 120 ms frame');
    const t0 = Date.now();
    const wardflowStart = procStat(demo.child.pid);
    let prevProc = { at: t0, stat: wardflowStart };
    let prevMetrics = null;
    let prevT = new Map(first.tiles.map((t) => [t.id, t.t]));

    const drain = async () => {
      const d = await page.evaluate(drainProbe);
      for (let i = 0; i < d.frames.length; i++) (frames[d.pages[i]] ?? frames.other).push(d.frames[i]);
      for (const lt of d.longTasks) longTasks.push({ ...lt, at: round((lt.wall - t0) / 1000, 2) });
      for (const k of Object.keys(arrivals)) for (const a of d.arrivals[k]) arrivals[k].push(a);
      return d;
    };

    const sample = async () => {
      const at = Date.now();
      const d = await drain();
      const metrics = await readMetrics();
      const tiles = await page.evaluate(readTiles, TILE_ROOTS);
      const onOverview = tiles.hash === '' || tiles.hash === '#/';
      const lags = tiles.tiles.filter((t) => t.t > 0).map((t) => tiles.now - t.t);
      const notAdvanced = onOverview ? tiles.tiles.filter((t) => prevT.has(t.id) && t.t <= prevT.get(t.id)).map((t) => t.id) : [];
      if (onOverview) prevT = new Map(tiles.tiles.map((t) => [t.id, t.t]));
      const stat = procStat(demo.child.pid);
      const wardflowCpu = stat && prevProc.stat
        ? (stat.cpuSeconds - prevProc.stat.cpuSeconds) / ((at - prevProc.at) / 1000)
        : null;
      prevProc = { at, stat };
      const seconds = prevMetrics ? (at - prevMetrics.at) / 1000 : null;
      const rendererBusy = prevMetrics && seconds
        ? (metrics.TaskDuration - prevMetrics.m.TaskDuration) / seconds
        : null;
      const scriptBusy = prevMetrics && seconds
        ? (metrics.ScriptDuration - prevMetrics.m.ScriptDuration) / seconds
        : null;
      prevMetrics = { at, m: metrics };
      const windowFrames = frameStats(d.frames, seconds ?? SAMPLE_MS / 1000);
      const s = {
        t: round((at - t0) / 1000, 2),
        page: onOverview ? 'overview' : tiles.hash,
        metrics,
        domElements: tiles.elements,
        rendererMainThreadBusy: round(rendererBusy, 3),
        scriptBusy: round(scriptBusy, 3),
        window: {
          frames: windowFrames.frames, p50: round(windowFrames.p50), p95: round(windowFrames.p95),
          max: round(windowFrames.max), over50: windowFrames.over50, longTasks: d.longTasks.length,
          longTaskMs: round(d.longTasks.reduce((a, x) => a + x.duration, 0)),
        },
        arrivals: { hr: d.arrivals.hr.length ? distribution(d.arrivals.hr) : null, temp: d.arrivals.temp.length ? distribution(d.arrivals.temp) : null },
        tiles: {
          shown: tiles.tiles.length,
          stale: tiles.tiles.filter((t) => t.stale).length,
          offline: tiles.tiles.filter((t) => t.offline).length,
          alarms: tiles.tiles.filter((t) => t.alarm).length,
          notAdvanced,
          lag: lags.length ? distribution(lags) : null,
          tracked: Object.fromEntries(
            tiles.tiles.filter((t) => tracked.includes(t.id)).map((t) => [t.id, t.t > 0 ? tiles.now - t.t : null]),
          ),
          all: onOverview ? lags : undefined,
        },
        wardflow: stat ? { cpu: round(wardflowCpu, 3), rss: stat.rss } : null,
        loadavg: loadavg().map((x) => round(x, 2)),
      };
      samples.push(s);
      const lagText = s.tiles.lag ? `hr age p50 ${round(s.tiles.lag.p50, 0)} ms max ${round(s.tiles.lag.max, 0)} ms` : 'no tiles';
      console.log(
        `  ${String(Math.round(s.t)).padStart(4)} s ${s.page.padEnd(26)} heap ${mb(metrics.JSHeapUsedSize)} MB, nodes ${metrics.Nodes}, `
        + `frames ${windowFrames.frames} (p95 ${round(windowFrames.p95)} ms, >50 ms ${windowFrames.over50}), `
        + `long tasks ${d.longTasks.length}, ${lagText}, ${d.arrivals.hr.length} HR updates shown, tiles ${s.tiles.shown} (stale ${s.tiles.stale}, not updated ${notAdvanced.length})`,
      );
    };

    const backToOverview = async () => {
      await page.getByTestId('nav-overview').click();
      await waitFor(async () => (await page.locator(TILE_ROOTS).count()) === BEDS, 10_000, 'the overview again');
      await page.evaluate(() => window.scrollTo(0, 0));
    };

    const visitAlerts = async () => {
      const start = Date.now();
      await page.getByTestId('nav-alerts').click();
      await waitFor(() => page.evaluate(() => location.hash === '#/alerts'), 5_000, 'the alert list');
      await sleep(start + ALERTS_FOR_S * 1000 - Date.now());
      const rows = await page.locator('[data-testid^="alert-"][data-state]').count();
      await backToOverview();
      visits.push({ t: round((start - t0) / 1000, 2), page: 'alerts', rows, seconds: round((Date.now() - start) / 1000, 2) });
    };

    let visited = 0;
    const visitPatient = async () => {
      const id = patientsToVisit[visited++ % patientsToVisit.length];
      const start = Date.now();
      await page.getByTestId(`tile-${id}`).click();
      await page.getByTestId(`patient-${id}`).waitFor({ timeout: 10_000 });
      // The time from the click on 24 h to its trend answered and its heart-rate chart drawn.
      const answered = page.waitForResponse((r) => r.url().includes(`/trend?hours=24`), { timeout: 10_000 });
      const clicked = Date.now();
      await page.getByTestId('range-24').click();
      let chartMs = null;
      try {
        await answered;
        await page.getByTestId('chart-hr').waitFor({ timeout: 10_000 });
        chartMs = Date.now() - clicked;
      } catch (e) {
        console.error(`  patient ${id}: ${e.message}`);
      }
      await sleep(start + PATIENT_FOR_S * 1000 - Date.now());
      await backToOverview();
      visits.push({ t: round((start - t0) / 1000, 2), page: 'patient', patient: id, range24ChartMs: chartMs, seconds: round((Date.now() - start) / 1000, 2) });
    };

    // The schedule: samples every 10 s, and the nurse's visits in between.
    console.log(`measuring for ${opts.minutes} min (a sample every ${SAMPLE_MS / 1000} s):`);
    let nextSample = t0 + SAMPLE_MS;
    let nextAlerts = t0 + ALERTS_AT_S * 1000;
    let nextPatient = t0 + PATIENT_AT_S * 1000;
    const end = t0 + durationMs;
    while (!stopRequested) {
      const next = Math.min(nextSample, nextAlerts, nextPatient);
      if (next > end) break;
      await sleep(next - Date.now());
      if (stopRequested) break;
      if (next === nextSample) {
        await sample();
        nextSample += SAMPLE_MS;
      } else if (next === nextPatient) {
        await visitPatient();
        nextPatient += PATIENT_EVERY_S * 1000;
      } else {
        await visitAlerts();
        nextAlerts += ALERTS_EVERY_S * 1000;
      }
      // A visit that ran past a sample's time: take it now, late, rather than skip it.
    }
    if (stopRequested || samples.length === 0 || samples[samples.length - 1].t < (Date.now() - t0) / 1000 - 1) await sample();
    const measuredSeconds = (Date.now() - t0) / 1000;
    await page.evaluate(() => { window.__wardflowPerf.stopped = true; });
    const gcEnd = await heapAfterGc();
    const shot = await screenshot(page, 'console-perf-overview');

    // ------------------------------------------------------------ summary
    const pageSeconds = { overview: 0, alerts: 0, patient: 0, other: 0 };
    for (const [k, list] of Object.entries(frames)) pageSeconds[k] = list.reduce((a, x) => a + x, 0) / 1000;
    const all = [...frames.overview, ...frames.alerts, ...frames.patient, ...frames.other];
    const frameSummary = {
      all: frameStats(all, measuredSeconds),
      overview: frameStats(frames.overview, pageSeconds.overview),
      alerts: frameStats(frames.alerts, pageSeconds.alerts),
      patient: frameStats(frames.patient, pageSeconds.patient),
    };
    const ltSummary = (list) => ({
      count: list.length,
      totalMs: round(list.reduce((a, x) => a + x.duration, 0)),
      maxMs: round(list.reduce((a, x) => Math.max(a, x.duration), 0)),
    });
    const heap = samples.map((s) => s.metrics.JSHeapUsedSize);
    const late = samples.filter((s) => s.t >= 60);
    const heapSlope = slope(late.map((s) => [s.t / 60, s.metrics.JSHeapUsedSize]));
    const nodesSlope = slope(late.map((s) => [s.t / 60, s.metrics.Nodes]));
    const overviewSamples = samples.filter((s) => s.page === 'overview');
    const allLags = overviewSamples.flatMap((s) => s.tiles.all ?? []);
    const trackedLags = overviewSamples.flatMap((s) => Object.values(s.tiles.tracked).filter((x) => x != null));
    const notUpdated = {};
    for (const s of overviewSamples) for (const id of s.tiles.notAdvanced) notUpdated[id] = (notUpdated[id] ?? 0) + 1;
    const wardflowEnd = procStat(demo.child.pid);
    const summary = {
      measuredSeconds: round(measuredSeconds, 1),
      tiles: BEDS,
      frames: frameSummary,
      longTasks: {
        observer: probeInfo.observer,
        all: ltSummary(longTasks),
        overview: ltSummary(longTasks.filter((x) => x.page === 'overview')),
      },
      heap: {
        startMB: mb(heap[0]),
        endMB: mb(heap[heap.length - 1]),
        maxMB: mb(Math.max(...heap)),
        growthMBPerMinute: heapSlope == null ? null : round(heapSlope / 2 ** 20, 3),
        slopeSamples: late.length,
        afterGcStartMB: mb(gcStart.heapUsed),
        afterGcEndMB: mb(gcEnd.heapUsed),
      },
      nodes: {
        start: samples[0]?.metrics.Nodes ?? null,
        end: samples[samples.length - 1]?.metrics.Nodes ?? null,
        max: Math.max(...samples.map((s) => s.metrics.Nodes)),
        growthPerMinute: round(nodesSlope, 1),
        afterGcStart: gcStart.nodes,
        afterGcEnd: gcEnd.nodes,
        domElementsStart: samples[0]?.domElements ?? null,
        domElementsEnd: samples[samples.length - 1]?.domElements ?? null,
        jsEventListenersStart: samples[0]?.metrics.JSEventListeners ?? null,
        jsEventListenersEnd: samples[samples.length - 1]?.metrics.JSEventListeners ?? null,
      },
      layout: {
        layoutsPerSecond: round((samples.at(-1).metrics.LayoutCount - samples[0].metrics.LayoutCount) / (samples.at(-1).t - samples[0].t || 1), 2),
        styleRecalcsPerSecond: round((samples.at(-1).metrics.RecalcStyleCount - samples[0].metrics.RecalcStyleCount) / (samples.at(-1).t - samples[0].t || 1), 2),
        rendererMainThreadBusy: round(distribution(samples.slice(1).map((s) => s.rendererMainThreadBusy)).p50, 3),
        scriptBusy: round(distribution(samples.slice(1).map((s) => s.scriptBusy)).p50, 3),
      },
      dataLag: {
        tracked: { tiles: tracked.length, ...distribution(trackedLags) },
        allTiles: distribution(allLags),
        atArrival: { hr: distribution(arrivals.hr), temp: distribution(arrivals.temp) },
        samplesOnOverview: overviewSamples.length,
        staleTilesMax: Math.max(0, ...samples.map((s) => s.tiles.stale)),
        offlineTilesMax: Math.max(0, ...samples.map((s) => s.tiles.offline)),
        tilesNotUpdatedBetweenSamples: notUpdated,
      },
      stream: { connections: streamRequests.length, reconnects: Math.max(0, streamRequests.length - 1) },
      pageErrors: pageErrors.length,
      wardflow: wardflowEnd && wardflowStart ? {
        cpu: round((wardflowEnd.cpuSeconds - wardflowStart.cpuSeconds) / measuredSeconds, 3),
        rssStartMB: mb(wardflowStart.rss),
        rssEndMB: mb(wardflowEnd.rss),
      } : null,
      visits: { alerts: visits.filter((v) => v.page === 'alerts').length, patient: visits.filter((v) => v.page === 'patient').length },
      screenshot: shot,
    };
    machine.loadavgAtEnd = loadavg().map((x) => round(x, 2));
    Object.assign(report, {
      finishedAt: new Date().toISOString(),
      summary,
      samples,
      visits,
      longTasks: longTasks.map((x) => ({ at: x.at, page: x.page, duration: round(x.duration) })),
      pageErrors,
      frameIntervals: Object.fromEntries(Object.entries(frames).map(([k, v]) => [k, v.map((x) => round(x, 1))])),
    });
    mkdirSync(dirname(opts.out), { recursive: true });
    writeFileSync(opts.out, JSON.stringify(report, null, 1));
    printSummary(report, opts.out);
  } catch (e) {
    exitCode = 1;
    console.error(`console-perf failed: ${e.stack ?? e}`);
    if (demo) console.error(`demo output (tail):\n${demo.output().slice(-2000)}`);
    try {
      if (page) console.error(`screenshot: ${await screenshot(page, 'console-perf-failure')}`);
    } catch { /* the page is gone */ }
    try {
      if (samples.length) {
        mkdirSync(dirname(opts.out), { recursive: true });
        writeFileSync(opts.out, JSON.stringify({ ...report, error: String(e.stack ?? e), samples, visits, pageErrors }, null, 1));
        console.error(`partial report: ${opts.out}`);
      }
    } catch { /* nothing more to save */ }
  } finally {
    await browser?.close().catch(() => {});
    await demo?.stop().catch(() => {});
  }
  return exitCode;
}

function printSummary(report, out) {
  const { summary: s, machine: m } = report;
  const f = (x, d = 1) => (x == null ? 'n/a' : String(round(x, d)));
  const pct = (x) => (x == null ? 'n/a' : `${round(x * 100, 2)} %`);
  const row = (cells, widths) => cells.map((c, i) => (i === 0 ? String(c).padEnd(widths[i]) : String(c).padStart(widths[i]))).join('  ');
  const w = [22, 9, 7, 7, 7, 7, 8, 9];
  console.log('');
  console.log(`Wardflow console under load: ${s.tiles} beds x 7 vitals at 1 Hz, ${f(s.measuredSeconds / 60, 2)} min measured`);
  console.log(`machine: node ${m.node}, Chromium ${m.chromium} (headless, software rendering), ${m.cpus} CPUs (${m.cpuModel}), load ${m.loadavgAtStart.join(' ')} -> ${m.loadavgAtEnd.join(' ')}`);
  console.log('');
  console.log(row(['frame interval (ms)', 'frames', 'fps', 'p50', 'p95', 'p99', 'max', '>50 ms'], w));
  for (const k of ['overview', 'alerts', 'patient', 'all']) {
    const x = s.frames[k];
    console.log(row([k, x.frames, f(x.fps), f(x.p50), f(x.p95), f(x.p99), f(x.max), pct(x.over50Share)], w));
  }
  console.log('');
  const lt = s.longTasks;
  console.log(`long tasks (>50 ms)   all: ${lt.all.count}, total ${lt.all.totalMs} ms, max ${lt.all.maxMs} ms; on the overview: ${lt.overview.count}, total ${lt.overview.totalMs} ms, max ${lt.overview.maxMs} ms${lt.observer ? '' : ' (no longtask observer in this browser)'}`);
  console.log(`JS heap used          start ${s.heap.startMB} MB, end ${s.heap.endMB} MB, max ${s.heap.maxMB} MB, growth ${f(s.heap.growthMBPerMinute, 3)} MB/min (slope over ${s.heap.slopeSamples} samples after the first minute); after a forced GC: ${s.heap.afterGcStartMB} -> ${s.heap.afterGcEndMB} MB`);
  console.log(`DOM nodes (renderer)  start ${s.nodes.start}, end ${s.nodes.end}, max ${s.nodes.max}, growth ${f(s.nodes.growthPerMinute)} /min; after a forced GC ${s.nodes.afterGcStart} -> ${s.nodes.afterGcEnd}; elements in the document ${s.nodes.domElementsStart} -> ${s.nodes.domElementsEnd}; JS listeners ${s.nodes.jsEventListenersStart} -> ${s.nodes.jsEventListenersEnd}`);
  console.log(`renderer              main thread busy ${pct(s.layout.rendererMainThreadBusy)} (script ${pct(s.layout.scriptBusy)}), ${s.layout.layoutsPerSecond} layouts/s, ${s.layout.styleRecalcsPerSecond} style recalcs/s`);
  console.log(`age of the HR shown   ${s.dataLag.tracked.tiles} tracked tiles: p50 ${f(s.dataLag.tracked.p50, 0)} ms, p95 ${f(s.dataLag.tracked.p95, 0)} ms, max ${f(s.dataLag.tracked.max, 0)} ms (n=${s.dataLag.tracked.n}); all ${s.tiles} tiles: p50 ${f(s.dataLag.allTiles.p50, 0)} ms, p95 ${f(s.dataLag.allTiles.p95, 0)} ms, max ${f(s.dataLag.allTiles.max, 0)} ms (now - data-t, includes up to 1 s between readings)`);
  const nu = Object.entries(s.dataLag.tilesNotUpdatedBetweenSamples);
  const arr = s.dataLag.atArrival;
  console.log(`age on arrival        when a tile shows a new HR: p50 ${f(arr.hr.p50, 0)} ms, p95 ${f(arr.hr.p95, 0)} ms, max ${f(arr.hr.max, 0)} ms (n=${arr.hr.n}); a new temperature: p50 ${f(arr.temp.p50, 0)} ms, p95 ${f(arr.temp.p95, 0)} ms, max ${f(arr.temp.max, 0)} ms (n=${arr.temp.n})`);
  console.log("                      (the demo's simulated monitors stamp their 7 vitals over the second before they send them, HR first and");
  console.log("                      temperature last: the temperature's age on arrival is the time from monitor to screen)");
  console.log(`tiles                 stale at most ${s.dataLag.staleTilesMax}, offline at most ${s.dataLag.offlineTilesMax}, not updated between two overview samples: ${nu.length ? nu.map(([k, v]) => `${k} x${v}`).join(', ') : 'none'}`);
  console.log(`live stream           ${s.stream.connections} connection(s) opened, ${s.stream.reconnects} reconnect(s); page errors ${s.pageErrors}`);
  if (s.wardflow) console.log(`engine (demo)         CPU ${pct(s.wardflow.cpu)} of a core, RSS ${s.wardflow.rssStartMB} -> ${s.wardflow.rssEndMB} MB`);
  console.log(`routine               ${s.visits.alerts} visits to the alert list, ${s.visits.patient} to a patient's 24 h trends`);
  console.log('');
  console.log('Frames are drawn by headless Chromium in software (no GPU), on the same CPUs as the engine and the simulator.');
  console.log(`report: ${out}${out.startsWith(ROOT) ? ` (${relative(ROOT, out)})` : ''}`);
  console.log(`screenshot: ${s.screenshot}`);
}

process.exitCode = await main();
