import { packageVersion } from "../../util/version.ts";
import type { Command } from "../registry.ts";

export const versionCommand: Command = {
  name: "version",
  summary: "print the expertmesh version and the Node.js runtime",
  usage: "expertmesh version",
  async run() {
    process.stdout.write(`expertmesh ${packageVersion()} (node ${process.version})\n`);
    return 0;
  },
};
