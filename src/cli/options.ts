// Parsing of the option values the commands share, with EM_CLI_USAGE errors that name
// the flag, and listening on a flag's address.
import { existsSync, readFileSync } from "node:fs";
import type { Server } from "node:net";
import {
  checkNatsIdentity,
  checkNatsTls,
  checkNatsUrlCredentials,
  type NatsAuth,
  type NatsIdentity,
  secretText,
} from "../moe/nats-connection.ts";
import { ExpertMeshError, formatError } from "../util/errors.ts";
import { writeTerminationMessage } from "./termination-log.ts";

/** A port flag (`dflt` when absent): an integer in 0..65535 (0: any free port). */
export function portFlag(v: string | undefined, flag: string, dflt: number): number {
  if (v === undefined) return dflt;
  if (!/^\d+$/.test(v) || Number(v) > 65535)
    throw new ExpertMeshError("EM_CLI_USAGE", `${flag} must be a port, 0..65535, got '${v}'`);
  return Number(v);
}

/** Listens on host:port; EM_LISTEN_FAILED names the flag when that fails (port in use...). */
export async function listenOn(
  server: Server,
  port: number,
  host: string,
  flag: string,
): Promise<void> {
  await new Promise<void>((resolve, reject) => {
    const fail = (err: Error) =>
      reject(
        new ExpertMeshError(
          "EM_LISTEN_FAILED",
          `${flag}: cannot listen on ${host}:${port}: ${err.message}`,
        ),
      );
    server.once("error", fail);
    server.listen(port, host, () => {
      server.off("error", fail);
      resolve();
    });
  });
}

/** The contents of a file an option names; EM_CLI_FILE names the option when it cannot. */
export function readOptionFile(path: string, flag: string): Buffer {
  try {
    return readFileSync(path);
  } catch (err) {
    const why = (err as { code?: string }).code === "ENOENT" ? "no such file" : String(err);
    throw new ExpertMeshError("EM_CLI_FILE", `${flag} ${path}: cannot read it: ${why}`, {
      cause: err,
    });
  }
}

/**
 * The template of --chat-template, as vLLM reads the flag: the value itself when it is a
 * Jinja template (it holds `{{`, `{%` or `{#`) and names no file, else the file it names.
 * Throws EM_CLI_FILE for a file that cannot be read.
 */
export function chatTemplateOption(value: string): string {
  if (/\{[{%#]/.test(value) && !existsSync(value)) return value;
  return readOptionFile(value, "--chat-template").toString("utf8");
}

/** Seconds to wait for NATS at start (`--nats-wait`), in milliseconds. */
export function natsWaitFlag(v: string | undefined): number {
  if (v === undefined) return 60_000;
  const s = Number(v);
  if (!/^\d+(\.\d+)?$/.test(v) || s > 3600)
    throw new ExpertMeshError("EM_CLI_USAGE", `--nats-wait must be seconds, 0..3600, got '${v}'`);
  return s * 1000;
}

/** The flags of every command that connects to NATS: who it is, and TLS (parseArgs options). */
export const NATS_AUTH_FLAGS = {
  "nats-creds": { type: "string" },
  "nats-user": { type: "string" },
  "nats-user-file": { type: "string" },
  "nats-password-file": { type: "string" },
  "nats-token-file": { type: "string" },
  "nats-nkey": { type: "string" },
  "nats-tls-ca": { type: "string" },
  "nats-tls-cert": { type: "string" },
  "nats-tls-key": { type: "string" },
} as const;

/** Their lines in a command's help, the flag column `width` characters wide. */
export function natsAuthUsage(width: number): string {
  return [
    ["--nats-creds FILE", "NATS credentials (.creds: a user JWT and its seed)"],
    ["--nats-user NAME", "a NATS user (or --nats-user-file FILE), with:"],
    ["--nats-password-file FILE", "its password"],
    ["--nats-token-file FILE", "a NATS token"],
    ["--nats-nkey FILE", "an NKEY user seed (SU...)"],
    ["--nats-tls-ca FILE", "TLS to NATS, trusting the CA certificate(s) in FILE (PEM)"],
    ["--nats-tls-cert FILE", "with --nats-tls-key: a client certificate (mutual TLS)"],
    ["--nats-tls-key FILE", "its private key (PEM)"],
  ]
    .map(([flag, what]) =>
      flag!.length < width
        ? `  ${flag!.padEnd(width)}${what}`
        : `  ${flag}\n  ${"".padEnd(width)}${what}`,
    )
    .join("\n");
}

type NatsAuthFlag = keyof typeof NATS_AUTH_FLAGS;

/**
 * What those flags name: the files read (EM_CLI_FILE names the flag), the identity checked
 * (EM_NATS_AUTH: one kind at most, none empty; none in the --nats URL) and so is TLS
 * (EM_NATS_TLS). Any --nats-tls-* flag makes TLS required. Undefined: none given.
 */
export function natsAuthFlags(
  values: { [F in NatsAuthFlag | "nats"]?: string | undefined },
): NatsAuth | undefined {
  if (values.nats !== undefined) checkNatsUrlCredentials(values.nats);
  const bytes = (flag: NatsAuthFlag) => {
    const path = values[flag];
    return path === undefined ? undefined : readOptionFile(path, `--${flag}`);
  };
  const text = (flag: NatsAuthFlag) => bytes(flag)?.toString("utf8");
  const named = (flag: NatsAuthFlag) =>
    values[flag] === undefined ? `--${flag}` : `--${flag} ${values[flag]}`;
  const auth: NatsAuth = {};
  const identity = natsIdentityFlags(values, bytes);
  if (identity) {
    checkNatsIdentity(identity, {
      creds: named("nats-creds"),
      user: values["nats-user"] !== undefined ? "--nats-user" : named("nats-user-file"),
      password: named("nats-password-file"),
      token: named("nats-token-file"),
      nkey: named("nats-nkey"),
    });
    auth.identity = identity;
  }
  const [ca, cert, key] = [text("nats-tls-ca"), text("nats-tls-cert"), text("nats-tls-key")];
  if (ca !== undefined || cert !== undefined || key !== undefined) {
    auth.tls = {
      ca,
      cert,
      key,
      files: {
        ca: values["nats-tls-ca"],
        cert: values["nats-tls-cert"],
        key: values["nats-tls-key"],
      },
    };
    checkNatsTls(auth.tls, {
      ca: named("nats-tls-ca"),
      cert: named("nats-tls-cert"),
      key: named("nats-tls-key"),
    });
  }
  return auth.identity || auth.tls ? auth : undefined;
}

/** The identity the flags give, read from their files; EM_NATS_AUTH for more than one kind. */
function natsIdentityFlags(
  values: { [F in NatsAuthFlag]?: string | undefined },
  bytes: (flag: NatsAuthFlag) => Buffer | undefined,
): NatsIdentity | undefined {
  const fail = (message: string): never => {
    throw new ExpertMeshError("EM_NATS_AUTH", message);
  };
  const given = (flag: NatsAuthFlag) => values[flag] !== undefined;
  if (given("nats-user") && given("nats-user-file"))
    fail("--nats-user and --nats-user-file both name the NATS user: give one");
  const userGiven = given("nats-user") || given("nats-user-file");
  if (userGiven !== given("nats-password-file"))
    fail(
      userGiven
        ? "a NATS user needs its password: --nats-password-file"
        : "--nats-password-file needs the user it is the password of: --nats-user",
    );
  const kinds = [
    ["nats-creds", "creds"],
    ["nats-password-file", "user"],
    ["nats-token-file", "token"],
    ["nats-nkey", "nkey"],
  ] as const;
  const chosen = kinds.filter(([flag]) => given(flag));
  if (chosen.length > 1)
    fail(
      `${chosen.map(([flag]) => (flag === "nats-password-file" ? "--nats-user/--nats-password-file" : `--${flag}`)).join(", ")}: a NATS connection authenticates one way, give one`,
    );
  switch (chosen[0]?.[1]) {
    case undefined:
      return undefined;
    case "creds":
      return { kind: "creds", creds: bytes("nats-creds")!, file: values["nats-creds"] };
    case "user":
      return {
        kind: "user",
        user: values["nats-user"] ?? secretText(bytes("nats-user-file")!),
        password: secretText(bytes("nats-password-file")!),
        files: { user: values["nats-user-file"], password: values["nats-password-file"] },
      };
    case "token":
      return {
        kind: "token",
        token: secretText(bytes("nats-token-file")!),
        file: values["nats-token-file"],
      };
    case "nkey":
      return { kind: "nkey", seed: bytes("nats-nkey")!, file: values["nats-nkey"] };
  }
}

/**
 * --load-stall-timeout: seconds without progress while loading weights before the process
 * gives up (default 300; 0: never).
 */
export function loadStallFlag(v: string | undefined): number {
  if (v === undefined) return 300;
  const s = Number(v);
  if (!/^\d+(\.\d+)?$/.test(v) || s > 86_400)
    throw new ExpertMeshError(
      "EM_CLI_USAGE",
      `--load-stall-timeout must be seconds, 0..86400, got '${v}'`,
    );
  return s;
}

/**
 * Ends a starting process whose load stalled (Startup.watchStalls): its code on stderr,
 * then SIGKILL. process.exit() would wait for the read that hangs: Node joins its I/O
 * threads on exit, and one of them is stuck in the hung open() or read().
 */
export function exitOnStall(log: (m: string) => void): (why: string) => void {
  return (why) => {
    const message = formatError(new ExpertMeshError("EM_CKPT_READ_STALLED", why));
    log(`${message}; killing this process (a pod's container is restarted)`);
    writeTerminationMessage(message);
    process.kill(process.pid, "SIGKILL");
  };
}

/** An integer flag (`dflt` when absent), at least `min`. */
export function intFlag(v: string | undefined, flag: string, dflt: number, min = 1): number {
  if (v === undefined) return dflt;
  const n = Number(v);
  if (!Number.isSafeInteger(n) || n < min)
    throw new ExpertMeshError("EM_CLI_USAGE", `${flag} must be an integer >= ${min}, got '${v}'`);
  return n;
}

/** A number flag (`dflt` when absent), at least `min`. */
export function numberFlag(v: string | undefined, flag: string, dflt: number, min = 0): number {
  if (v === undefined) return dflt;
  const n = Number(v);
  if (!Number.isFinite(n) || n < min)
    throw new ExpertMeshError("EM_CLI_USAGE", `${flag} must be a number >= ${min}, got '${v}'`);
  return n;
}

/**
 * The model's NATS subject prefix parts (--namespace, --model-name or the folder's name):
 * no '*', '>', spaces or empty tokens (a '*' namespace subscribed to every namespace's
 * traffic; a space made every subject illegal). Dots are kept: 'DeepSeek-V2.5' is a name.
 */
export function subjectRef(namespace: string, model: string): { namespace: string; model: string } {
  for (const [what, v] of [
    ["--namespace", namespace],
    ["the model name (--model-name, or the checkpoint folder's name)", model],
  ] as const) {
    if (!/^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$/.test(v))
      throw new ExpertMeshError(
        "EM_CLI_USAGE",
        `${what} must be letters, digits, '-', '_' and inner dots (NATS subject tokens), got '${v}'`,
      );
  }
  return { namespace, model };
}

/** A true/false flag (`dflt` when absent). */
export function boolFlag(v: string | undefined, flag: string, dflt: boolean): boolean {
  if (v === undefined) return dflt;
  if (v === "true") return true;
  if (v === "false") return false;
  throw new ExpertMeshError("EM_CLI_USAGE", `${flag} must be true or false, got '${v}'`);
}

/** The model name in NATS subjects when --model-name is absent: the checkpoint folder's name. */
export function defaultModelName(modelDir: string): string {
  return modelDir.replace(/\/+$/, "").split("/").pop()!;
}
