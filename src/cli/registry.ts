import { ExpertMeshError, formatError } from "../util/errors.ts";
import { failureLine, type LogFormat, logFormat, logFormatInArgv } from "../util/log.ts";
import { writeTerminationMessage } from "./termination-log.ts";

/** One CLI subcommand. `run` returns the process exit code. */
export interface Command {
  readonly name: string;
  readonly summary: string;
  readonly usage: string;
  run(argv: string[]): Promise<number>;
}

type Loader = () => Promise<Command>;

/** Commands by name. Add a command here once it does real work. */
const commands: Record<string, Loader> = {
  batch: async () => (await import("./commands/batch.ts")).batchCommand,
  bench: async () => (await import("./commands/bench.ts")).benchCommand,
  crd: async () => (await import("./commands/crd.ts")).crdCommand,
  fetch: async () => (await import("./commands/fetch.ts")).fetchCommand,
  generate: async () => (await import("./commands/generate.ts")).generateCommand,
  gateway: async () => (await import("./commands/gateway.ts")).gatewayCommand,
  "make-tiny-model": async () =>
    (await import("./commands/make-tiny-model.ts")).makeTinyModelCommand,
  operator: async () => (await import("./commands/operator.ts")).operatorCommand,
  shard: async () => (await import("./commands/shard.ts")).shardCommand,
  plan: async () => (await import("./commands/plan.ts")).planCommand,
  up: async () => (await import("./commands/up.ts")).upCommand,
  version: async () => (await import("./commands/version.ts")).versionCommand,
};

export function commandNames(): string[] {
  return Object.keys(commands).sort();
}

async function printHelp(out: (s: string) => void): Promise<void> {
  const lines = ["usage: expertmesh <command> [options]", "", "commands:"];
  for (const name of commandNames()) {
    const cmd = await commands[name]!();
    lines.push(`  ${name.padEnd(18)} ${cmd.summary}`);
  }
  lines.push("", "Run `expertmesh <command> --help` for a command's options.");
  out(lines.join("\n"));
}

/** Parses argv (without node and script) and runs the named command; returns the exit code. */
export async function runCli(argv: string[]): Promise<number> {
  const [name, ...rest] = argv;
  if (name === undefined || name === "help" || name === "--help" || name === "-h") {
    await printHelp((s) => process.stdout.write(`${s}\n`));
    return name === undefined ? 2 : 0;
  }
  const load = commands[name];
  if (!load) {
    process.stderr.write(`expertmesh: unknown command '${name}'\n`);
    await printHelp((s) => process.stderr.write(`${s}\n`));
    return 2;
  }
  const cmd = await load();
  if (rest.includes("--help") || rest.includes("-h")) {
    process.stdout.write(`usage: ${cmd.usage}\n\n${cmd.summary}\n`);
    return 0;
  }
  try {
    return await cmd.run(rest);
  } catch (err) {
    // node:util parseArgs's own errors (unknown option, missing value) are usage errors.
    const code = (err as { code?: unknown })?.code;
    const e =
      typeof code === "string" && code.startsWith("ERR_PARSE_ARGS_")
        ? new ExpertMeshError("EM_CLI_USAGE", `${(err as Error).message} (see --help)`)
        : err;
    // A log pipeline reading JSON lines gets the failure as one too.
    let format: LogFormat = "text";
    try {
      format = logFormat(logFormatInArgv(rest));
    } catch {}
    process.stderr.write(`${failureLine(format, name, e)}\n`);
    writeTerminationMessage(formatError(e));
    return 1;
  }
}
