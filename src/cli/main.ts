#!/usr/bin/env node
// `expertmesh <command>`: one CLI for every process of the system (see ARCHITECTURE.md).
// Each command lives in its own module under src/cli/commands and is loaded on demand.
import { runCli } from "./registry.ts";

process.exitCode = await runCli(process.argv.slice(2));
