// A dashboard's data, with typed queries: messages and dialogs per language and day (Berlin time), the
// consent rate, and the latest German messages paged with cursors. The types come from schema.graphql
// (npm run codegen); `tsc --strict` fails if a query asks for a field the API does not have, or if the
// code reads one the query did not ask for.
//
//   DATAAPI_URL=http://localhost:8000 DATAAPI_KEY=dak_… npm run build && npm start [SINCE]
import type { TypedDocumentNode } from "@graphql-typed-document-node/core";
import { print } from "graphql";

import { graphql } from "./gql/index.js";
import type { GermanMessagesQuery } from "./gql/graphql.js";

const url = process.env["DATAAPI_URL"] ?? "http://localhost:8000";
const key = process.env["DATAAPI_KEY"];

interface GraphQLError {
  message: string;
  extensions?: { code?: string };
}

/** Runs one typed operation; throws with the API's codes and messages on any error. */
async function run<Result, Variables>(
  document: TypedDocumentNode<Result, Variables>,
  variables: Variables,
): Promise<Result> {
  const response = await fetch(`${url}/graphql`, {
    method: "POST",
    headers: {
      "Content-Type": "application/json",
      ...(key ? { Authorization: `Bearer ${key}` } : {}),
    },
    body: JSON.stringify({ query: print(document), variables }),
  });
  const body = (await response.json()) as { data?: Result | null; errors?: GraphQLError[] };
  if (body.errors?.length) {
    const errors = body.errors.map((e) => `${e.extensions?.code ?? "ERROR"}: ${e.message}`);
    throw new Error(errors.join("; "));
  }
  if (!body.data) throw new Error(`no data (HTTP ${response.status})`);
  return body.data;
}

const MessagesPerLanguageAndDay = graphql(`
  query MessagesPerLanguageAndDay($since: DateTime!, $zone: String!) {
    stats(filter: { since: $since }, groupBy: [LANGUAGE], bucket: DAY, timeZone: $zone) {
      language
      bucketStart
      messageCount
      dialogCount
    }
  }
`);

const ConsentRate = graphql(`
  query ConsentRate {
    consentStats {
      granted
      refused
      withdrawn
    }
  }
`);

const GermanMessages = graphql(`
  query GermanMessages($after: String) {
    messages(filter: { language: "de" }, first: 2, after: $after) {
      nodes {
        id
        text
        createdAt
      }
      pageInfo {
        hasNextPage
        endCursor
      }
    }
  }
`);

const since = process.argv[2] ?? new Date(Date.now() - 7 * 24 * 3600 * 1000).toISOString();

const perDay = await run(MessagesPerLanguageAndDay, { since, zone: "Europe/Berlin" });
const chart = perDay.stats.map((group) => ({
  language: group.language ?? "(all)",
  day: group.bucketStart ?? "",
  messages: group.messageCount,
  dialogs: group.dialogCount,
}));

const totals = (await run(ConsentRate, {})).consentStats[0];
const decided = totals ? totals.granted + totals.refused : 0;
const consentRate = totals && decided > 0 ? totals.granted / decided : null;

const german: string[] = [];
let after: string | null = null;
do {
  const page: GermanMessagesQuery = await run(GermanMessages, { after });
  german.push(...page.messages.nodes.map((message) => message.text));
  after = page.messages.pageInfo.hasNextPage ? (page.messages.pageInfo.endCursor ?? null) : null;
} while (after !== null);

console.log(JSON.stringify({ chart, consentRate, withdrawn: totals?.withdrawn ?? 0, german }));
