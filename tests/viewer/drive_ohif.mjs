// Drive the real OHIF v3 viewer in headless Chromium (playwright-core) like a radiologist would,
// and report what it drew: screenshots plus where OHIF put things on the page.
//
// Usage: node drive_ohif.mjs SPEC.json REPORT.json
//   env PLAYWRIGHT_CORE = the playwright-core package folder, CHROMIUM = the browser binary.
// SPEC: {baseUrl, outDir, studyUid, viewport: {width, height}, voi: [lower, upper] (CT window, HU),
//        ct: {thumbnail, slices: [{sop, points: {name: [x, y, z]}}]},  open the CT series (OHIF may open
//                                                              another first: it sorts by series number),
//                                                              show each CT slice, project the LPS points
//        sr: {thumbnail, count, slices},                       open the SR, visit `count` measurements
//        seg: {thumbnail, slices: [{sop, points}]},            open the SEG, show the same way
//        keyimage: {thumbnail, sop},                           open the key image series
//        reports: [{thumbnail, name, title, expect}]}          open SRs OHIF renders as text (not 126000);
//                                                              is `expect` on screen without scrolling?
// Every step is optional except ct. The Python test (test_ohif.py) judges the pixels; this script only
// acts and measures. Page coordinates are CSS pixels of the screenshots (deviceScaleFactor 1).
import fs from 'node:fs';
import path from 'node:path';

const [specPath, reportPath] = process.argv.slice(2);
const spec = JSON.parse(fs.readFileSync(specPath, 'utf8'));
const { chromium } = await import(path.join(process.env.PLAYWRIGHT_CORE, 'index.mjs'));

const CHROMIUM_ARGS = ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync'];
const LOAD_TIMEOUT_MS = 60000;
const SETTLE_MS = 600;

const report = { steps: {}, console: [], errors: [] };
const writeReport = () => fs.writeFileSync(reportPath, JSON.stringify(report, null, 1));

const userDataDir = fs.mkdtempSync(path.join(spec.outDir, 'chromium-profile-'));
const context = await chromium.launchPersistentContext(userDataDir, {
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  headless: true,
  args: CHROMIUM_ARGS,
  viewport: spec.viewport || { width: 1400, height: 900 },
  deviceScaleFactor: 1,
});
const page = context.pages()[0] || await context.newPage();
let crash = null; // OHIF caught an exception in a React error boundary: its viewport is gone
page.on('console', (m) => {
  const text = m.text();
  if (m.type() === 'error' || m.type() === 'warning' || text.includes('Error Boundary')) {
    report.console.push(`${m.type()}: ${text.slice(0, 600)}`);
  }
  if (text.includes('Error Boundary') && !crash) crash = text.slice(0, 600);
});
page.on('pageerror', (e) => report.errors.push(`pageerror: ${e.message}`));
// OHIF's onboarding tour covers the viewport on a fresh profile.
await page.addInitScript(() => localStorage.setItem('shownTours', JSON.stringify(['basicViewerTour'])));

// ---- helpers evaluated in the page ------------------------------------------------------------

/** The active viewport's state: displayed SOP, canvas rectangle, and projected LPS points. */
async function viewportState(points = {}) {
  return page.evaluate((pts) => {
    const engine = window.cornerstone.getRenderingEngines()[0];
    const vp = engine.getViewports()[0];
    const imageId = vp.getCurrentImageId ? vp.getCurrentImageId() : null;
    const sop = imageId && (imageId.match(/\/instances\/([0-9.]+)/) || [])[1];
    const rect = vp.canvas.getBoundingClientRect();
    const toPage = (world) => {
      const [x, y] = vp.worldToCanvas(world);
      return [rect.left + x, rect.top + y];
    };
    const projected = {};
    for (const [name, world] of Object.entries(pts)) projected[name] = toPage(world);
    let imageCorners = null;
    if (imageId) {
      const plane = window.cornerstone.metaData.get('imagePlaneModule', imageId);
      if (plane) {
        const { imageToWorldCoords } = window.cornerstone.utilities;
        imageCorners = {
          topLeft: toPage(imageToWorldCoords(imageId, [0, 0])),
          bottomRight: toPage(imageToWorldCoords(imageId, [plane.columns, plane.rows])),
          rows: plane.rows, columns: plane.columns,
        };
      }
    }
    return {
      viewportType: vp.type, imageId, sop, index: vp.getCurrentImageIdIndex(), count: vp.getImageIds().length,
      canvas: [rect.left, rect.top, rect.width, rect.height], projected, imageCorners,
      hasImage: Boolean(vp.getImageData && vp.getImageData()),
    };
  }, points);
}

/** Circles, ellipses and texts that cornerstone's annotation layer drew (SVG in the viewport). */
async function svgShapes() {
  return page.evaluate(() => {
    const svg = document.querySelector('svg.svg-layer');
    if (!svg) return { ellipses: [], texts: [] };
    const ellipses = [...svg.querySelectorAll('ellipse, circle')].map((e) => {
      const r = e.getBoundingClientRect();
      return { center: [r.left + r.width / 2, r.top + r.height / 2], size: [r.width, r.height],
        stroke: e.getAttribute('stroke') };
    });
    const texts = [...svg.querySelectorAll('text')].map((t) => t.textContent).filter(Boolean);
    return { ellipses, texts };
  });
}

/** The window a reader picks for the liver (spec.voi = [lower, upper] HU); some series carry none usable. */
async function applyWindow() {
  if (!spec.voi) return;
  await page.evaluate(([lower, upper]) => {
    const vp = window.cornerstone.getRenderingEngines()[0].getViewports()[0];
    vp.setProperties({ voiRange: { lower, upper } });
    vp.render();
  }, spec.voi);
}

/** page.waitForFunction that gives up at once when OHIF crashes, with OHIF's own error. */
async function waitInPage(fn, arg, timeout = LOAD_TIMEOUT_MS) {
  const deadline = Date.now() + timeout;
  for (;;) {
    if (crash) throw new Error(`OHIF crashed: ${crash}`);
    if (await page.evaluate(fn, arg).catch(() => false)) return;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeout} ms waiting for ${fn}`);
    await page.waitForTimeout(250);
  }
}

async function renderAndSettle() {
  // The SR overlay is only drawn on the next render (see ohif-notes.md): force one.
  await page.evaluate(() => window.cornerstone.getRenderingEngines().forEach((e) => e.render()));
  await page.waitForTimeout(SETTLE_MS);
}

async function showSop(sop) {
  await page.waitForFunction((uid) => {
    const vp = window.cornerstone.getRenderingEngines()[0].getViewports()[0];
    return vp.getImageIds().some((id) => id.includes(`/instances/${uid}/`));
  }, sop, { timeout: LOAD_TIMEOUT_MS });
  await page.evaluate(async (uid) => {
    const vp = window.cornerstone.getRenderingEngines()[0].getViewports()[0];
    const index = vp.getImageIds().findIndex((id) => id.includes(`/instances/${uid}/`));
    await vp.setImageIdIndex(index);
  }, sop);
  await page.waitForFunction((uid) => {
    const vp = window.cornerstone.getRenderingEngines()[0].getViewports()[0];
    return (vp.getCurrentImageId() || '').includes(`/instances/${uid}/`) && vp.getImageData();
  }, sop, { timeout: LOAD_TIMEOUT_MS });
  await applyWindow();
  await renderAndSettle();
}

async function shoot(name) {
  const file = path.join(spec.outDir, `${name}.png`);
  await page.screenshot({ path: file });
  return file;
}

async function openSeries(thumbnailText) {
  const thumbnail = page.locator('[data-cy^="study-browser-thumbnail"]').filter({ hasText: new RegExp(thumbnailText) });
  await thumbnail.first().dblclick();
}

// ---- steps ------------------------------------------------------------------------------------

async function showSlices(slices, prefix) {
  const shown = [];
  for (const [i, slice] of slices.entries()) {
    await showSop(slice.sop);
    shown.push({ state: await viewportState(slice.points), screenshot: await shoot(`${prefix}-${i + 1}`) });
  }
  return shown;
}

async function ctStep() {
  const t0 = Date.now();
  await page.goto(`${spec.baseUrl}/viewer?StudyInstanceUIDs=${spec.studyUid}`);
  await page.waitForFunction(() => {
    const engine = window.cornerstone && window.cornerstone.getRenderingEngines()[0];
    const vp = engine && engine.getViewports()[0];
    return Boolean(vp && vp.getImageData && vp.getImageData());
  }, null, { timeout: LOAD_TIMEOUT_MS });
  const firstImageMs = Date.now() - t0;
  const thumbnails = await page.locator('[data-cy^="study-browser-thumbnail"]').allInnerTexts();
  if (spec.ct.thumbnail) await openSeries(spec.ct.thumbnail);
  return { firstImageMs, thumbnails, slices: await showSlices(spec.ct.slices, '01-ct') };
}

async function srStep() {
  const sr = spec.sr;
  await openSeries(sr.thumbnail);
  await waitInPage((n) => {
    const all = window.cornerstoneTools.annotation.state.getAllAnnotations();
    return all.filter((a) => a.metadata.toolName === 'DICOMSRDisplay').length >= n;
  }, sr.count);
  await page.waitForTimeout(SETTLE_MS);
  if (crash) throw new Error(`OHIF crashed: ${crash}`);
  const annotations = await page.evaluate(() => window.cornerstoneTools.annotation.state.getAllAnnotations()
    .filter((a) => a.metadata.toolName === 'DICOMSRDisplay')
    .map((a) => ({ sop: (a.metadata.referencedImageId.match(/\/instances\/([0-9.]+)/) || [])[1],
      label: a.data.label, points: a.data.handles.points.map((p) => [p[0], p[1], p[2]]) })));
  const visits = [];
  for (let i = 0; i < sr.count; i += 1) {
    if (i > 0) await page.locator('[data-cy="viewport-action-arrows-right"]').click();
    await applyWindow();
    await renderAndSettle();
    await page.waitForSelector('svg.svg-layer ellipse, svg.svg-layer circle', { timeout: 20000 })
      .catch(() => renderAndSettle());
    await renderAndSettle();
    const state = await viewportState();
    const probe = (sr.slices || []).find((s) => s.sop === state.sop);
    const here = annotations.filter((a) => a.sop === state.sop);
    const centres = {};
    here.forEach((a, k) => {
      // four points on the circle, opposite in pairs (LPS): their mean is the centre
      centres[`circle${k}`] = [0, 1, 2].map((axis) => a.points.reduce((sum, p) => sum + p[axis], 0) / a.points.length);
    });
    const annotationCentres = (await viewportState(centres)).projected;
    const { projected } = await viewportState(probe ? probe.points : {});
    visits.push({ state, projected, annotationCentres, shapes: await svgShapes(),
      screenshot: await shoot(`02-sr-${i + 1}`) });
  }
  const badge = await page.locator('[data-cy="viewport-overlay-top-right"]').innerText().catch(() => '');
  return { annotations, visits, badge };
}

async function segStep() {
  const seg = spec.seg;
  const t0 = Date.now();
  await openSeries(seg.thumbnail);
  // OHIF asks "Do you want to open this Segmentation?" before it hydrates a SEG
  const yes = page.getByRole('button', { name: 'Yes', exact: true });
  const prompted = await yes.waitFor({ timeout: 20000 }).then(() => yes.click()).then(() => Date.now() - t0, () => null);
  await waitInPage(() => {
    const seg = window.cornerstoneTools.segmentation;
    return seg && seg.state.getSegmentations().length > 0;
  }, null);
  const segmentations = await page.evaluate(() => window.cornerstoneTools.segmentation.state.getSegmentations()
    .map((s) => ({ label: s.label, segments: Object.values(s.segments).filter(Boolean)
      .map((x) => ({ index: x.segmentIndex, label: x.label })) })));
  const loadedMs = Date.now() - t0;
  const slices = await showSlices(seg.slices, '03-seg');
  await page.locator('[data-cy="panelSegmentation-btn"]').click().catch(() => null);
  await page.waitForTimeout(1500);
  await renderAndSettle();
  const panel = await page.evaluate(() => document.body.innerText);
  return { promptedMs: prompted, loadedMs, segmentations, slices, panelText: panel,
    panelScreenshot: await shoot('04-seg-panel') };
}

async function keyImageStep() {
  const key = spec.keyimage;
  await openSeries(key.thumbnail);
  await page.waitForFunction((uid) => {
    const vp = window.cornerstone.getRenderingEngines()[0].getViewports()[0];
    return (vp.getCurrentImageId() || '').includes(`/instances/${uid}/`) && vp.getImageData();
  }, key.sop, { timeout: LOAD_TIMEOUT_MS });
  await renderAndSettle();
  await page.waitForTimeout(1000);
  return { state: await viewportState(), screenshot: await shoot('05-keyimage') };
}

/** SRs that are not an "Imaging Measurement Report": OHIF shows their content tree as text. */
async function reportsStep() {
  const shown = [];
  for (const report of spec.reports) {
    await openSeries(report.thumbnail);
    const pane = page.locator('[data-cy="viewport-pane"]').first();
    await page.waitForFunction((title) => {
      const el = document.querySelector('[data-cy="viewport-pane"]');
      return el && el.innerText.includes(title);
    }, report.title, { timeout: LOAD_TIMEOUT_MS });
    await page.waitForTimeout(SETTLE_MS);
    // is the expected sentence on screen without scrolling (inside the pane's visible rectangle)?
    const visible = await page.evaluate((sentence) => {
      const paneRect = document.querySelector('[data-cy="viewport-pane"]').getBoundingClientRect();
      const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
      for (let node = walker.nextNode(); node; node = walker.nextNode()) {
        const at = node.textContent.indexOf(sentence);
        if (at < 0) continue;
        const range = document.createRange();
        range.setStart(node, at);
        range.setEnd(node, at + sentence.length);
        const r = range.getBoundingClientRect();
        return r.top >= paneRect.top && r.bottom <= Math.min(paneRect.bottom, window.innerHeight);
      }
      return false;
    }, report.expect || '');
    shown.push({ name: report.name, text: await pane.innerText(), visible,
      screenshot: await shoot(`06-report-${report.name}`) });
  }
  return { shown };
}

const steps = [['ct', ctStep], ['sr', srStep], ['seg', segStep], ['keyimage', keyImageStep], ['reports', reportsStep]];
try {
  for (const [name, step] of steps) {
    if (!spec[name]) continue;
    const t0 = Date.now();
    crash = null; // each step starts from what the reader does next, not from an earlier crash
    try {
      report.steps[name] = { ...(await step()), seconds: (Date.now() - t0) / 1000 };
    } catch (error) {
      report.steps[name] = { error: String(error && error.stack ? error.stack : error),
        screenshot: await shoot(`failed-${name}`).catch(() => null) };
      if (name === 'ct') break; // nothing else can work without the viewer
    }
    writeReport();
  }
} finally {
  writeReport();
  await context.close();
  fs.rmSync(userDataDir, { recursive: true, force: true });
}
