#!/usr/bin/env node
// `expertmesh <command>`: one CLI for every process of the system (see ARCHITECTURE.md).
// Each command lives in its own module under src/cli/commands and is loaded on demand.
import { formatError } from "../util/errors.ts";
import { runCli } from "./registry.ts";
import { writeTerminationMessage } from "./termination-log.ts";

// A crash nothing caught (a bug) still says why in a pod's status (ADR 0036); the monitor
// changes nothing else: Node prints the stack and exits as it would.
process.on("uncaughtExceptionMonitor", (err) =>
  writeTerminationMessage(`uncaught: ${formatError(err)}`),
);

const code = await runCli(process.argv.slice(2));
// A failed command exits now: a server it opened (NATS, HTTP) must not keep the process alive
// after the error was reported. Serving commands return 0 and run on until stopped.
if (code !== 0) process.exit(code);
process.exitCode = code;
