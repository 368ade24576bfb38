// Prints the YAML file given as JSON (js-yaml 4, its default schema), for
// the tests that read the action, the template or gitlab-ci-local's
// expansion of it. NODE_PATH names the node_modules holding js-yaml
// (scripts/install-node-tools.sh shims/tests/lint-tools).
//
//   node shims/tests/yaml-to-json.cjs FILE.yml
"use strict";
const fs = require("node:fs");
const yaml = require("js-yaml");

const [file] = process.argv.slice(2);
if (!file) {
  console.error("usage: node yaml-to-json.cjs FILE.yml");
  process.exit(2);
}
process.stdout.write(JSON.stringify(yaml.load(fs.readFileSync(file, "utf8"))) + "\n");
