import { readFileSync } from "node:fs";
import type { Command } from "../registry.ts";

export const versionCommand: Command = {
  name: "version",
  summary: "print the expertmesh version and the Node.js runtime",
  usage: "expertmesh version",
  async run() {
    const pkgUrl = new URL("../../../package.json", import.meta.url);
    const pkg = JSON.parse(readFileSync(pkgUrl, "utf8")) as { version: string };
    process.stdout.write(`expertmesh ${pkg.version} (node ${process.version})\n`);
    return 0;
  },
};
