// Opens DataAPI's GraphiQL in headless Chromium, runs the default `dialogs` query with the run button,
// waits for the result, and saves a screenshot; opens the Explorer and finds the schema's fields in it;
// checks that the Headers tab is remembered across a reload; runs a subscription (opened from a
// `?query=` link) and sees the message a consent stores meanwhile. Fails if the page asks for anything
// outside the service or its Content-Security-Policy blocks anything.
//
//   node tests/browser/graphiql.mjs BASE_URL SCREENSHOT_PATH EXPECTED_TEXT [KEY]
//
// With KEY (a service with API keys): the key is typed into the Headers tab after the page opened; the
// schema (the Explorer's fields) must load then, the default query must run, and the key must still be
// there after a reload.
//
// Prints one JSON line: { "result": "<text of the result pane>" }.
import { chromium } from "playwright-core";

const [baseUrl, screenshotPath, expectedText, key] = process.argv.slice(2);
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
  if (key) {
    // Without a key the schema cannot load; typed into the Headers tab, it loads at once.
    await page.getByLabel("Show GraphiQL Explorer").click();
    const headers = page.locator(".graphiql-editor-tool .graphiql-editor:not(.hidden) .CodeMirror").first();
    await headers.click();
    await page.keyboard.insertText(`{"Authorization": "Bearer ${key}"}`);
    await page.locator(".graphiql-plugin").getByText("dialogs", { exact: true }).first()
      .waitFor({ timeout: 30_000 });
  }
  await page.click(".graphiql-execute-button");
  const resultPane = page.locator(".result-window");
  await resultPane.getByText(expectedText, { exact: false }).first().waitFor({ timeout: 30_000 });
  const result = await resultPane.innerText();
  await page.screenshot({ path: screenshotPath, fullPage: true });

  if (key) {
    // The key is remembered across a reload, and works.
    await page.reload({ waitUntil: "load" });
    await page.waitForSelector(".graphiql-execute-button", { timeout: 30_000 });
    await page.getByText("Authorization", { exact: false }).first().waitFor({ timeout: 30_000 });
    await page.click(".graphiql-execute-button");
    await page.locator(".result-window").getByText(expectedText, { exact: false }).first()
      .waitFor({ timeout: 30_000 });
  } else {
    await keylessChecks(page);
  }

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

/** The Explorer, remembered headers, and a subscription opened from a link, on a keyless service. */
async function keylessChecks(page) {
  // The Explorer plugin: point-and-click query building, from the schema.
  await page.getByLabel("Show GraphiQL Explorer").click();
  await page.locator(".graphiql-plugin").getByText("dialogs", { exact: true }).first()
    .waitFor({ timeout: 30_000 });

  // The Headers tab is remembered across reloads.
  await page.evaluate(() => localStorage.setItem("graphiql:headers", '{"X-Remembered": "yes"}'));
  await page.reload({ waitUntil: "load" });
  await page.waitForSelector(".graphiql-execute-button", { timeout: 30_000 });
  await page.getByText("X-Remembered", { exact: false }).first().waitFor({ timeout: 30_000 });
  await page.evaluate(() => localStorage.removeItem("graphiql:headers"));

  // A subscription from a link, over the WebSocket; a consent meanwhile shows up in the result pane.
  const subscription = "subscription { messageStored { message { dialogId text } } }";
  await page.goto(`${baseUrl}?query=${encodeURIComponent(subscription)}`, { waitUntil: "load" });
  await page.waitForSelector(".graphiql-execute-button", { timeout: 30_000 });
  await page.click(".graphiql-execute-button");
  const live = "Live from GraphiQL";
  // The subscription starts once the server has read it: store a message until one shows up.
  for (let attempt = 0; ; attempt++) {
    await page.evaluate(async ([n, text]) => {
      const post = (query) => fetch("/graphql", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ query }),
      });
      await post(`mutation { pushMessage(input: {customerId: "c", dialogId: "live-${n}", text: "${text}", language: "en"}) { status } }`);
      await post(`mutation { giveConsent(dialogId: "live-${n}", value: true) { value } }`);
    }, [attempt, live]);
    try {
      await page.locator(".result-window").getByText(live, { exact: false }).first()
        .waitFor({ timeout: 3_000 });
      break;
    } catch (error) {
      if (attempt >= 10) throw new Error(`the subscription showed nothing: ${error}`);
    }
  }
}
