// Opens a notebook in JupyterLab in a headless Chromium, runs all its cells as a person would
// (Run > Run All Cells), and reports what each cell shows; tests/test_browser.py reads the report.
//
//   node run_notebook.mjs URL OUT_PREFIX [--wait SECONDS] [--change SELECT_VALUE]
//
// Writes OUT_PREFIX_full.png (the whole notebook), OUT_PREFIX_cellNN.png for every cell whose
// output holds an image, a widget or an error, and OUT_PREFIX.json: per cell its output MIME
// types, images, text and problems. With --change, the first cell holding a dropdown with that
// option gets it chosen; the report says whether the cell's image changed
// (OUT_PREFIX_changed_before.png / _after.png).
import fs from "node:fs";
import chromium from "@sparticuz/chromium";
import puppeteer from "puppeteer-core";

const [url, prefix] = process.argv.slice(2);
const option = (name, fallback) => {
  const i = process.argv.indexOf(name);
  return i > 0 ? process.argv[i + 1] : fallback;
};
const waitS = Number(option("--wait", 600));
const changeTo = option("--change", null);
const sleep = (s) => new Promise((r) => setTimeout(r, s * 1000));
const PANEL = ".jp-NotebookPanel:not(.lm-mod-hidden)";

const browser = await puppeteer.launch({
  args: chromium.args, executablePath: await chromium.executablePath(), headless: true,
  defaultViewport: { width: 1400, height: 1000 },
});
const report = { url, console: [], cells: [], change: null, seconds: 0, finished: false };
const started = Date.now();
try {
  const page = await browser.newPage();
  page.on("console", (m) => { if (m.type() === "error") report.console.push(m.text()); });
  page.on("pageerror", (e) => report.console.push(`[pageerror] ${e.message}`));
  await page.goto(url, { waitUntil: "networkidle2", timeout: 180000 });
  await page.waitForSelector(`${PANEL} .jp-Notebook .jp-Cell`, { timeout: 180000 });
  report.opened_after = (Date.now() - started) / 1000;
  // as a person does: wait until the status bar says the kernel is idle (a loaded machine can
  // take a while to start it), then Run > Run All Cells through the menu
  const kernelIdle = () => page.evaluate(() => /\bIdle\b/.test(
    (document.querySelector("#jp-main-statusbar") || document.body).innerText || ""));
  for (let i = 0; i < 90 && !(await kernelIdle()); i++) await sleep(2);
  report.kernel_idle_after = (Date.now() - started) / 1000;
  const clickLabel = async (selector, text) => {
    for (const item of await page.$$(selector)) {
      if ((await item.evaluate((e) => e.textContent)) === text) { await item.click(); return true; }
    }
    return false;
  };
  const started_cells = () => page.evaluate((panel) => [...document.querySelectorAll(
    `${panel} .jp-CodeCell .jp-InputArea-prompt`)].some((e) => /\[(\*|\d+)\]/.test(e.textContent)),
    PANEL);
  let t0 = Date.now();
  report.run_all_clicks = 0;
  for (let attempt = 0; attempt < 3 && !(await started_cells()); attempt++) {
    await page.click(`${PANEL} .jp-Notebook`);
    await page.keyboard.press("Escape");
    if (!(await clickLabel(".lm-MenuBar-itemLabel", "Run"))) throw new Error("no Run menu");
    await sleep(1);
    if (!(await clickLabel(".lm-Menu-itemLabel", "Run All Cells"))) throw new Error("no Run All Cells");
    report.run_all_clicks += 1;
    t0 = Date.now();
    for (let i = 0; i < 15 && !(await started_cells()); i++) await sleep(1);
  }
  await sleep(2);
  // busy while any cell shows [*]; an error stops Run All, leaving the rest unrun
  while ((Date.now() - t0) / 1000 < waitS) {
    const busy = await page.evaluate((panel) => [...document.querySelectorAll(
      `${panel} .jp-InputArea-prompt`)].some((e) => e.textContent.includes("[*]")), PANEL);
    if (!busy) { report.finished = true; break; }
    await sleep(2);
  }
  report.seconds = (Date.now() - t0) / 1000;
  await sleep(3); // last outputs and widget views render

  // every cell: its input's first line, outputs' MIME types, images, text and problems
  report.cells = await page.evaluate((panel) => [...document.querySelectorAll(
    `${panel} .jp-Notebook .jp-Cell`)].map((cell, i) => {
    const outputs = [...cell.querySelectorAll(".jp-OutputArea-output")];
    const text = outputs.map((o) => o.innerText || "").join("\n");
    return {
      index: i,
      code: cell.classList.contains("jp-CodeCell"),
      input: (cell.querySelector(".jp-InputArea-editor")?.innerText || "").split("\n")[0],
      prompt: cell.querySelector(".jp-InputArea-prompt")?.textContent || "",
      mimes: outputs.map((o) => o.getAttribute("data-mime-type")),
      images: [...cell.querySelectorAll(".jp-OutputArea-output img")].filter(
        (img) => img.naturalWidth > 50 && img.naturalHeight > 50).length,
      widgets: cell.querySelectorAll(".jupyter-widgets, .widget-box").length,
      stderr: outputs.filter((o) => o.getAttribute("data-mime-type") ===
        "application/vnd.jupyter.stderr").map((o) => (o.innerText || "").slice(0, 2000)),
      text: text.slice(0, 4000),
    };
  }), PANEL);

  // the whole notebook in one picture, then each cell with an image, a widget or stderr
  const height = await page.evaluate((panel) => {
    const outer = document.querySelector(`${panel} .jp-WindowedPanel-outer`);
    if (outer) outer.scrollTop = 0;
    return outer ? outer.scrollHeight : 3000;
  }, PANEL);
  await page.setViewport({ width: 1400, height: Math.min(height + 200, 16000) });
  await sleep(2);
  await page.screenshot({ path: `${prefix}_full.png` });
  await page.setViewport({ width: 1400, height: 1000 });
  await sleep(1);
  const handles = await page.$$(`${PANEL} .jp-Notebook .jp-Cell`);
  for (const c of report.cells) {
    if (c.images || c.widgets || c.stderr.length) {
      await handles[c.index].evaluate((e) => e.scrollIntoView());
      await sleep(0.5);
      c.screenshot = `${prefix}_cell${String(c.index).padStart(2, "0")}.png`;
      await handles[c.index].screenshot({ path: c.screenshot });
    }
  }

  // a control changed: the cell's chart must be drawn again, for the new value
  if (changeTo) {
    report.change = { to: changeTo, found: false, changed: false };
    for (const handle of handles) {
      const select = await handle.$(`select:has(option[value="${changeTo}"])`);
      if (!select) continue;
      const imageOf = () => handle.evaluate((e) => [...e.querySelectorAll(
        ".jp-OutputArea-output img")].map((img) => img.src).join("|"));
      const textOf = () => handle.evaluate((e) => e.querySelector(".jp-OutputArea")?.innerText || "");
      await handle.evaluate((e) => e.scrollIntoView());
      await sleep(0.5);
      await handle.screenshot({ path: `${prefix}_changed_before.png` });
      const before = await imageOf();
      report.change.found = true;
      report.change.text_before = (await textOf()).slice(-400);
      await select.select(changeTo);
      const t1 = Date.now();
      while ((Date.now() - t1) / 1000 < 60) {
        await sleep(1);
        const now = await imageOf();
        if (now && now !== before) { report.change.changed = true; break; }
      }
      await sleep(1);
      report.change.text_after = (await textOf()).slice(-400);
      report.change.screenshot = `${prefix}_changed_after.png`;
      await handle.screenshot({ path: report.change.screenshot });
      break;
    }
  }
  // keep what ran (outputs included) beside the screenshots
  await page.keyboard.down("Control"); await page.keyboard.press("s"); await page.keyboard.up("Control");
  await sleep(2);
  report.total_seconds = (Date.now() - started) / 1000;
} finally {
  fs.writeFileSync(`${prefix}.json`, JSON.stringify(report, null, 1));
  await browser.close();
}
