// The long-running processes' log lines (gateway, shard, operator) on stderr: text for a
// terminal (`<time> <who>: <message>`, as always), or with `--log-format json` /
// EXPERTMESH_LOG_FORMAT=json one JSON object per line for a log pipeline (Loki, Elasticsearch,
// Cloud Logging): {time, level, component, instance, msg, ...fields}. A line's fields (a
// request's id, status, tokens, trace id) are its own keys in JSON; the text line already
// says them in its message.
import { ExpertMeshError, formatError } from "./errors.ts";

export const LOG_FORMATS = ["text", "json"] as const;
export type LogFormat = (typeof LOG_FORMATS)[number];

/** A line's structured fields; undefined ones are left out. */
export type LogFields = Readonly<
  Record<string, string | number | boolean | null | readonly (string | number)[] | undefined>
>;

/** Writes a line: the message, with fields for the JSON format. */
export type Log = (message: string, fields?: LogFields) => void;

/** The keys every JSON line has; a field of the same name is dropped (with an `_` it stays). */
const RESERVED = new Set(["time", "level", "component", "instance", "msg"]);

/** The format: the flag's, else $EXPERTMESH_LOG_FORMAT's, else text. Throws EM_CLI_USAGE. */
export function logFormat(
  flag: string | undefined,
  env: NodeJS.ProcessEnv = process.env,
): LogFormat {
  const given = flag ?? (env["EXPERTMESH_LOG_FORMAT"] || undefined);
  if (given === undefined) return "text";
  if ((LOG_FORMATS as readonly string[]).includes(given)) return given as LogFormat;
  throw new ExpertMeshError(
    "EM_CLI_USAGE",
    `${flag !== undefined ? "--log-format" : "EXPERTMESH_LOG_FORMAT"} must be text or json, got '${given}'`,
  );
}

/** The --log-format a command line names (either spelling), for lines written before parsing. */
export function logFormatInArgv(argv: readonly string[]): string | undefined {
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]!;
    if (a.startsWith("--log-format=")) return a.slice("--log-format=".length);
    if (a === "--log-format") return argv[i + 1];
  }
  return undefined;
}

/** One line in `format`, without its newline. */
export function formatLine(
  format: LogFormat,
  o: {
    time: Date;
    level: "info" | "error";
    component: string;
    instance?: string;
    /** The text line's "who" (`gateway pod-1`, `shard 0/pod-2`). */
    who: string;
    message: string;
    fields?: LogFields;
  },
): string {
  if (format === "text") return `${o.time.toISOString()} ${o.who}: ${o.message}`;
  const line: Record<string, unknown> = {
    time: o.time.toISOString(),
    level: o.level,
    component: o.component,
    ...(o.instance !== undefined ? { instance: o.instance } : {}),
    msg: o.message,
  };
  for (const [k, v] of Object.entries(o.fields ?? {}))
    if (v !== undefined && !RESERVED.has(k)) line[k] = v;
  return JSON.stringify(line);
}

/** A process's logger on stderr (or `write`). */
export function processLog(o: {
  format: LogFormat;
  component: string;
  instance?: string;
  who: string;
  write?: (line: string) => void;
}): Log & { error: Log } {
  const write = o.write ?? ((line: string) => process.stderr.write(`${line}\n`));
  const at =
    (level: "info" | "error"): Log =>
    (message, fields) =>
      write(
        formatLine(o.format, {
          time: new Date(),
          level,
          component: o.component,
          ...(o.instance !== undefined ? { instance: o.instance } : {}),
          who: o.who,
          message,
          ...(fields ? { fields } : {}),
        }),
      );
  return Object.assign(at("info"), { error: at("error") });
}

/** A command's failure as its last line: JSON with its code when the format is json. */
export function failureLine(format: LogFormat, command: string, err: unknown): string {
  if (format === "text") return `expertmesh ${command}: ${formatError(err)}`;
  const code = err instanceof ExpertMeshError ? err.code : undefined;
  return formatLine("json", {
    time: new Date(),
    level: "error",
    component: command,
    who: command,
    message: formatError(err),
    fields: { code },
  });
}
