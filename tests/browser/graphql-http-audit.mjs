// Runs the graphql-http project's own server audit (GraphQL over HTTP) against a running DataAPI and exits
// non-zero when any MUST (error) or SHOULD (warn) item fails. The MAY items not followed are printed as
// NOTICE lines; README lists them with the reason. Used by tests/api/service.rs.
import { auditServer } from 'graphql-http';

const url = process.argv[2];
if (!url) {
  console.error('usage: node graphql-http-audit.mjs http://127.0.0.1:PORT/graphql');
  process.exit(2);
}
const results = await auditServer({ url });
let failures = 0;
for (const result of results) {
  if (result.status === 'ok') continue;
  console.log(`${result.status.toUpperCase()} ${result.id} ${result.name}: ${result.reason}`);
  if (result.status === 'error' || result.status === 'warn') failures++;
}
const passed = results.filter((result) => result.status === 'ok').length;
console.log(`${results.length} items audited, ${passed} ok, ${failures} MUST or SHOULD failed`);
process.exit(failures === 0 && results.length > 0 ? 0 : 1);
