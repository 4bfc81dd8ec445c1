// `expertmesh up --watch`: runs `up` (without --watch) as a child process and, whenever the
// manifest's file changes to a valid manifest, does what `kubectl apply` of the edit would
// make the operator do (ADR 0041). An edit that reaches the gateways alone (their serving
// flags: sampling, limits, KV cache, parsers; src/local/manifest-change.ts) or the replica
// counts goes to the child as a line on its standard input, and the child rolls its gateways
// onto it while nats-server and the shards run on, or starts and stops replicas. Any other
// edit stops the child as on Ctrl-C (gateways finish their requests, shards drain), then a
// new one starts with the new manifest. A manifest that fails to parse or validate is
// reported and the running one is left alone, as the API server would refuse it. The other -f
// files (Secrets, ConfigMaps) are watched too: an edit is a line `{"files": true}`, and the
// child reads them again, giving its gateways new API keys or a new certificate (ADR 0043).
// A new value of a spec.env valueFrom variable (in any -f file) stops the child and starts a
// new one, which reads it: processes read their environment at start, and the operator rolls
// every role's pods onto such a value (ADR 0048).
//
// The child runs in a process group of its own, so that a Ctrl-C in the terminal reaches this
// supervisor alone, which passes each signal on once (the second Ctrl-C stops at once, as
// without --watch). Its standard input is a pipe this process never writes: if the supervisor
// is killed outright, the child sees end-of-file and stops (parent-watch.ts).
import { type ChildProcess, spawn } from "node:child_process";
import { type FSWatcher, readFileSync, watch } from "node:fs";
import { basename, dirname, resolve } from "node:path";
import { readManifest } from "../api/manifest.ts";
import type { DeepSeekModel } from "../api/schema.ts";
import { formatError } from "../util/errors.ts";
import { envChanges, envFromObjects, type FileValue } from "./gateway-secrets.ts";
import { fieldList, liveChangeSummary, manifestChange } from "./manifest-change.ts";
import { objectsOf } from "./objects.ts";
import { STOP_ON_STDIN_EOF_ENV, UP_WATCHED_ENV } from "./parent-watch.ts";

/** How long the file must be quiet before a change counts (editors write in several steps). */
export const WATCH_SETTLE_MS = 300;

export interface WatchOptions {
  /** The manifest's path (as given with -f). */
  file: string;
  /** The other -f files (Secrets, ConfigMaps; ADR 0043), as given. */
  others?: string[];
  /** `up`'s arguments without --watch. */
  upArgs: string[];
  say: (line: string) => void;
}

/** Runs until a signal stops it; resolves with the exit code the last child stopped with. */
export async function watchAndRun(opts: WatchOptions): Promise<number> {
  const { file, upArgs, say } = opts;
  const path = resolve(file);
  let text = readText(path);
  const others = new Map(
    (opts.others ?? []).map((f) => [resolve(f), { file: f, text: readText(resolve(f)) }]),
  );
  // What the manifest says (an invalid one at the start fails as without --watch), which each
  // edit is compared with: one that leaves it the same (a comment, the order of keys)
  // restarts nothing, as kubectl apply of it changes nothing.
  let current = readManifest(path);
  const single = upArgs.includes("--single-process");
  let child: ChildProcess | undefined;
  let stopping = false;
  let lastCode = 0;
  let finish: (code: number) => void = () => {};
  const finished = new Promise<number>((r) => (finish = r));

  // spec.env's valueFrom values in the -f files as they are now (null: a file that does not
  // parse, which the child reports), and as the running child started with them.
  const envNow = (m: DeepSeekModel): Map<string, FileValue> | null => {
    const texts: [string, string][] = [
      [file, text ?? ""],
      ...[...others.values()].map((o): [string, string] => [o.file, o.text ?? ""]),
    ];
    try {
      return envFromObjects(m, objectsOf(texts, m.metadata.namespace ?? "default"));
    } catch {
      return null;
    }
  };
  let startedEnv = new Map<string, FileValue>();

  const start = () => {
    startedEnv = envNow(current) ?? new Map();
    const c = spawn(process.execPath, [process.argv[1]!, "up", ...upArgs], {
      stdio: ["pipe", "inherit", "inherit"],
      detached: true,
      env: { ...process.env, [STOP_ON_STDIN_EOF_ENV]: "1", [UP_WATCHED_ENV]: "1" },
    });
    child = c;
    c.on("exit", (code, signal) => {
      if (child === c) child = undefined;
      lastCode = code ?? (signal ? 1 : 0);
      if (stopping) finish(lastCode);
      else if (!restarting)
        say(
          `up stopped (exit ${signal ?? code}); waiting for ${file} to change to start it again (Ctrl-C quits)`,
        );
    });
  };

  // A change: the new text, validated, replaces the running one (one restart at a time; a
  // change during a restart is looked at once it is done).
  let restarting = false;
  let again = false;
  const changed = async () => {
    if (stopping) return;
    if (restarting) {
      again = true;
      return;
    }
    const now = readText(path);
    if (now === null || now === text) return; // gone for a moment (an editor's rename), or the same
    let next: DeepSeekModel;
    try {
      next = readManifest(path);
    } catch (err) {
      text = now;
      say(
        `${file} changed, but ${formatError(err)}; ${child ? "the previous manifest runs on" : "nothing runs"} until it is fixed`,
      );
      return;
    }
    text = now;
    const change = manifestChange(current, next, single);
    // (a new spec.env entry is a change of the manifest's: "all")
    const env = change.kind === "all" ? null : envEdit(next);
    if (change.kind === "same" && child && env === null) {
      say(`${file} changed, but the model says what it said: nothing to restart`);
      tell({ files: true, quiet: true }); // (its Secrets, if it holds any)
      return;
    }
    current = next;
    if (change.kind === "live" && child?.stdin?.writable && env === null) {
      say(`${file} changed (${fieldList(change.fields)}): ${liveChangeSummary(change)}`);
      tell({ manifest: next });
      tell({ files: true, quiet: true });
      return;
    }
    if (!child) say(`${file} changed: starting it`);
    const why = change.kind === "all" ? change.why : (env ?? "the running up could not be told");
    await restart(`${file} changed (${why})`);
  };

  // A new value of a spec.env valueFrom variable in the -f files: why the processes must
  // start again (null: none). A variable no file holds any more is said, and the processes
  // keep the value they have.
  const envEdit = (m: DeepSeekModel): string | null => {
    const now = envNow(m);
    if (now === null) return null; // (the child reports the file)
    const { changed, kept } = envChanges(m, startedEnv, now);
    for (const line of kept) say(line);
    if (changed.length === 0) return null;
    return `${changed.join("; ")}: processes read their environment at start, and the operator rolls every role's pods onto a new value`;
  };

  // Stops the running child as on Ctrl-C (gateways finish their requests, shards drain), then
  // starts a new one on the current manifest and files.
  const restart = async (what: string) => {
    restarting = true;
    const old = child;
    if (old) {
      say(`${what}: stopping everything, then starting it again with the new manifest`);
      await new Promise<void>((r) => {
        old.once("exit", () => r());
        old.kill("SIGTERM");
      });
    }
    restarting = false;
    if (stopping) return;
    start();
    if (again) {
      again = false;
      void changed();
    }
  };

  // The running up reads the -f files' Secrets again: the API keys and certificate reach
  // its gateways (src/local/gateway-secrets.ts). One that is restarting reads them anyway.
  const tell = (message: object) => {
    if (child?.stdin?.writable && !restarting) child.stdin.write(`${JSON.stringify(message)}\n`);
  };
  const otherChanged = (at: string) => {
    const other = others.get(at);
    if (stopping || !other) return;
    const now = readText(at);
    if (now === null || now === other.text) return;
    other.text = now;
    if (!child || restarting) return; // (the next up reads it)
    const env = envEdit(current);
    if (env !== null) {
      void restart(`${other.file} changed (${env})`);
      return;
    }
    say(`${other.file} changed: its Secrets' new content goes to the running processes`);
    tell({ files: true });
  };

  // The folders, not the files: editors that save by renaming a new file over the old one
  // would leave a watch on the file itself watching nothing.
  const timers = new Map<string, NodeJS.Timeout>();
  const watched = [path, ...others.keys()];
  const watchers: FSWatcher[] = [...new Set(watched.map((p) => dirname(p)))].map((dir) =>
    watch(dir, (_event, name) => {
      for (const p of watched) {
        if (dirname(p) !== dir || (name !== null && name !== basename(p))) continue;
        clearTimeout(timers.get(p));
        timers.set(
          p,
          setTimeout(() => (p === path ? void changed() : otherChanged(p)), WATCH_SETTLE_MS),
        );
      }
    }),
  );

  const stop = (signal: NodeJS.Signals) => {
    if (!stopping) {
      stopping = true;
      for (const w of watchers) w.close();
      for (const t of timers.values()) clearTimeout(t);
      if (!child) finish(lastCode);
    }
    // Every signal is passed on: the child's second one stops it at once.
    child?.kill(signal);
  };
  for (const s of ["SIGINT", "SIGTERM", "SIGHUP"] as const) process.on(s, () => stop(s));

  say(
    `watching ${file}: an edit of the gateways' flags alone rolls the gateways, one of the replica counts starts or stops processes, any other stops everything and starts it again`,
  );
  if (others.size > 0)
    say(
      `watching ${[...others.values()].map((o) => o.file).join(", ")} too: new API keys and certificates in their Secrets reach the gateways without a restart, a new value of spec.env's starts every process again`,
    );
  start();
  return await finished;
}

function readText(path: string): string | null {
  try {
    return readFileSync(path, "utf8");
  } catch {
    return null;
  }
}
