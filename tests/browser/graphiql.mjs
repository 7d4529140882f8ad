// Opens DataAPI's GraphiQL in headless Chromium, runs the default `dialogs` query with the run button,
// waits for the result, and saves a screenshot. Fails if the page asks for anything outside the service.
//
//   node tests/browser/graphiql.mjs BASE_URL SCREENSHOT_PATH EXPECTED_TEXT
//
// Prints one JSON line: { "result": "<text of the result pane>" }.
import { chromium } from "playwright-core";

const [baseUrl, screenshotPath, expectedText] = process.argv.slice(2);
if (!baseUrl || !screenshotPath || !expectedText) {
  console.error("usage: graphiql.mjs BASE_URL SCREENSHOT_PATH EXPECTED_TEXT");
  process.exit(2);
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM_PATH || "/usr/bin/chromium",
  args: [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
  ],
});
const outside = [];
try {
  const page = await browser.newPage({ viewport: { width: 1400, height: 900 } });
  page.on("request", (request) => {
    const url = request.url();
    if (!url.startsWith(baseUrl) && !url.startsWith("data:") && !url.startsWith("blob:")) {
      outside.push(url);
    }
  });
  const pageErrors = [];
  page.on("pageerror", (error) => pageErrors.push(String(error)));
  // The page's Content-Security-Policy must not block anything it needs.
  page.on("console", (message) => {
    if (/Content Security Policy|Refused to/i.test(message.text())) pageErrors.push(message.text());
  });

  await page.goto(baseUrl, { waitUntil: "load" });
  await page.waitForSelector(".graphiql-execute-button", { timeout: 30_000 });
  await page.click(".graphiql-execute-button");
  const resultPane = page.locator(".result-window");
  await resultPane.getByText(expectedText, { exact: false }).first().waitFor({ timeout: 30_000 });
  const result = await resultPane.innerText();
  await page.screenshot({ path: screenshotPath, fullPage: true });

  if (pageErrors.length > 0) {
    throw new Error(`the page raised errors: ${pageErrors.join("; ")}`);
  }
  if (outside.length > 0) {
    throw new Error(`the page requested resources outside the service: ${outside.join(", ")}`);
  }
  console.log(JSON.stringify({ result }));
} finally {
  await browser.close();
}
