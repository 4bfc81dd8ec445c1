import { readFileSync, writeFileSync } from "node:fs";
import { parseArgs } from "node:util";
import { CRD_FILES, deepSeekModelCrdYaml } from "../../api/crd.ts";
import type { Command } from "../registry.ts";

const repoRoot = new URL("../../../", import.meta.url);

export const crdCommand: Command = {
  name: "crd",
  summary:
    "print the DeepSeekModel CRD generated from src/api (or --write it to crds/ and the chart)",
  usage: "expertmesh crd [--write | --check]",
  async run(argv) {
    const { values } = parseArgs({
      args: argv,
      options: { write: { type: "boolean" }, check: { type: "boolean" } },
    });
    const yaml = deepSeekModelCrdYaml();
    if (!values.write && !values.check) {
      process.stdout.write(yaml);
      return 0;
    }
    let stale = 0;
    for (const file of CRD_FILES) {
      const url = new URL(file, repoRoot);
      let current = "";
      try {
        current = readFileSync(url, "utf8");
      } catch {}
      if (current === yaml) continue;
      if (values.write) {
        writeFileSync(url, yaml);
        process.stdout.write(`wrote ${file}\n`);
      } else {
        process.stderr.write(`${file} is out of date: run expertmesh crd --write\n`);
        stale++;
      }
    }
    return stale ? 1 : 0;
  },
};
