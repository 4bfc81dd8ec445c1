// The processes `expertmesh up` runs (nats-server, shards, gateways) and what happens to
// them: each spawned in a process group of its own with its output on up's terminal (progress
// lines feed its bar), ready at a line it prints, started again with a back-off when it exits
// while serving (as a Deployment's pod would be), scaled up and down by role, and stopped in
// order (gateways, then shards, then nats-server).
import { type ChildProcess, spawn } from "node:child_process";
import { ExpertMeshError } from "../util/errors.ts";
import { STOP_ON_STDIN_EOF_ENV } from "./parent-watch.ts";
import { PROGRESS_ENV, parseProgressLine } from "./progress.ts";
import type { ProgressBoard } from "./progress-board.ts";

/** A child `up` starts (and starts again when it exits while serving). */
export interface ChildSpec {
  name: string;
  cmd: string;
  args: string[];
  readyLine: RegExp;
  /** A progress bar while it first loads. */
  bar: boolean;
  /** Each time it serves (its ready line). */
  onReady?: (line: string) => void;
  /** Each time it exits, or is told to stop. */
  onStop?: () => void;
  /**
   * A gateway started in a roll (up --watch): one that exits before it first serves is not
   * started again; the roll stops there and the one it was to replace serves on.
   */
  rollout?: boolean;
}

/** A child and its process now. */
export interface Supervised {
  spec: ChildSpec;
  proc: ChildProcess;
  /** Its process printed its ready line (and has not exited since). */
  ready: boolean;
  /** Stopped on purpose (a replica the autoscaler scaled down): not started again. */
  retired: boolean;
  /** Why it was stopped, for the line that says it stopped (default: scaled down). */
  retiredAs?: string;
  /** It has served at least once. */
  served: boolean;
}

/**
 * When a child that exited while serving starts again: after 1 s, then twice as long for each
 * restart of the same child in the last 10 minutes (1, 2, 4, 8, 16 s; a Deployment's pods
 * back off the same way); the 6th exit within 10 minutes stops `up` instead, an error that
 * comes back each time being no use restarting.
 */
export class Restarts {
  static readonly WINDOW_MS = 10 * 60_000;
  static readonly MAX = 5;
  readonly #at = new Map<string, number[]>();
  readonly #now: () => number;

  constructor(now: () => number = Date.now) {
    this.#now = now;
  }

  next(name: string): { count: number; delayS: number; giveUp?: string } {
    const t = this.#now();
    const recent = (this.#at.get(name) ?? []).filter((x) => t - x < Restarts.WINDOW_MS);
    if (recent.length >= Restarts.MAX)
      return {
        count: recent.length,
        delayS: 0,
        giveUp: `for the ${recent.length + 1}th time in ${Restarts.WINDOW_MS / 60_000} minutes`,
      };
    recent.push(t);
    this.#at.set(name, recent);
    return { count: recent.length, delayS: 2 ** (recent.length - 1) };
  }
}

/** The order children stop in: gateways (and prefill gateways), shards, the rest (NATS). */
function stopRank(name: string): number {
  if (name.startsWith("gateway") || name.startsWith("prefill.")) return 0;
  return name.startsWith("shard-") ? 1 : 2;
}

/**
 * up's children. `start` spawns one (or its spec again); once `serving` is set, a child that
 * exits is started again after Restarts' delay, unless it was retired (scaled down, rolled)
 * or `stopping` is set; when Restarts gives up, `onGiveUp` is called (up stops).
 */
export class Supervisor {
  /** In start order; a retired child stays listed (its exit is still awaited on stop). */
  readonly children: Supervised[] = [];
  /** Everything has served once: from now on an exit is a restart, not a failed start. */
  serving = false;
  /** Stopping everything: no more restarts. */
  stopping = false;
  readonly #restarts = new Restarts();
  readonly #board: ProgressBoard;
  readonly #say: (msg: string) => void;
  readonly #onGiveUp: () => void;

  constructor(board: ProgressBoard, say: (msg: string) => void, onGiveUp: () => void) {
    this.#board = board;
    this.#say = say;
    this.#onGiveUp = onGiveUp;
  }

  /**
   * Spawns `spec` (a bar on the board unless `afterStart`: the board is closed once
   * everything serves); resolves with its ready line, rejects when it exits before.
   */
  start(spec: ChildSpec, afterStart: boolean): Promise<string> {
    const c = spawnChild(
      this.#board,
      spec.name,
      spec.cmd,
      spec.args,
      spec.readyLine,
      spec.bar && !afterStart,
    );
    let self = this.children.find((e) => e.spec === spec);
    if (!self) {
      self = { spec, proc: c.proc, ready: false, retired: false, served: false };
      this.children.push(self);
    }
    const entry = self;
    entry.proc = c.proc;
    entry.ready = false;
    c.ready.then(
      (line) => {
        if (entry.proc !== c.proc || c.proc.exitCode !== null) return;
        entry.ready = true;
        entry.served = true;
        spec.onReady?.(line);
      },
      () => {},
    );
    c.proc.on("exit", (code, sig) => this.#exited(entry, sig ?? code));
    return c.ready;
  }

  #exited(e: Supervised, status: NodeJS.Signals | number | null): void {
    e.ready = false;
    e.spec.onStop?.();
    if (!this.serving || this.stopping) return; // while starting, `ready` fails up as a whole
    const name = e.spec.name;
    if (e.retired) {
      this.#say(`${name} stopped (${e.retiredAs ?? "scaled down"}; exit ${status})`);
      return;
    }
    if (e.spec.rollout && !e.served) {
      e.retired = true; // the roll says why (its ready promise failed)
      return;
    }
    const verdict = this.#restarts.next(name);
    if (verdict.giveUp) {
      this.#say(`${name} exited (${status}) ${verdict.giveUp}; stopping`);
      this.#onGiveUp();
      return;
    }
    this.#say(
      `${name} exited (${status}); starting it again in ${verdict.delayS} s (restart ${verdict.count})`,
    );
    setTimeout(() => {
      if (this.stopping || e.retired) return;
      this.start(e.spec, true).then(
        () => this.#say(`${name} is serving again`),
        () => {}, // its exit (above) decides what comes next
      );
    }, verdict.delayS * 1000);
  }

  /** The running (not retired) children of a role: "gateway", "prefill", "shard-<k>". */
  replicasOf(role: string): Supervised[] {
    return this.children.filter((e) => !e.retired && e.spec.name.startsWith(`${role}.`));
  }

  /**
   * Starts children of `role` (`specFor` names each) or stops its newest until `n` run: the
   * autoscaler's decisions and an edit's replica counts.
   */
  scale(role: string, n: number, specFor: () => ChildSpec): void {
    if (this.stopping) return;
    const now = this.replicasOf(role);
    for (let i = now.length; i < n; i++) {
      const spec = specFor();
      this.#say(`starting ${spec.name} (scaled up)`);
      this.start(spec, true).then(
        () => this.#say(`${spec.name} is serving`),
        () => {}, // its exit decides what comes next
      );
    }
    // The newest first: out of the rotation, then each finishes what it has.
    for (const e of now.slice(n).reverse()) {
      e.retired = true;
      this.#say(`stopping ${e.spec.name} (scaled down)`);
      Supervisor.stop(e);
    }
  }

  /** Out of any rotation (onStop), then SIGTERM: it finishes what it has and exits. */
  static stop(e: Supervised): void {
    e.spec.onStop?.();
    if (e.proc.exitCode === null && e.proc.signalCode === null) e.proc.kill("SIGTERM");
  }

  /**
   * Stops every child as Ctrl-C would: the gateways first (each finishes its requests in
   * flight, up to its --shutdown-timeout, and writes its prefix cache's disk tier; SIGINT
   * too, ending the second of draining a front no longer needs), then the shards (drain),
   * then NATS; the replicas of a role together, whatever order they started in.
   */
  async stopInOrder(): Promise<void> {
    for (const rank of [0, 1, 2])
      await Promise.all(
        this.children
          .filter((e) => stopRank(e.spec.name) === rank)
          .map((e) => stopChild(e.proc, rank === 0)),
      );
  }

  /** SIGKILL to every child still running (up is exiting). */
  killAll(): void {
    for (const { proc } of this.children) if (proc.exitCode === null) proc.kill("SIGKILL");
  }
}

/** Calls `onLine` with each complete line of `stream` (a chunk may end mid-line). */
function eachLine(stream: NodeJS.ReadableStream, onLine: (line: string) => void): void {
  let rest = "";
  stream.on("data", (d: Buffer) => {
    const parts = (rest + d.toString()).split("\n");
    rest = parts.pop()!;
    for (const l of parts) onLine(l);
  });
  stream.on("end", () => {
    if (rest) onLine(rest);
    rest = "";
  });
}

/**
 * Spawns a child. Its progress lines (src/local/progress.ts) feed its bar on `board` when
 * `bar`; every other line is printed with the child's name in front. `ready` resolves with
 * the first line that matches `readyLine`, and rejects (failing the bar) when the child
 * exits first.
 */
function spawnChild(
  board: ProgressBoard,
  name: string,
  cmd: string,
  args: string[],
  readyLine: RegExp,
  bar: boolean,
): { proc: ChildProcess; ready: Promise<string> } {
  const proc = spawn(cmd, args, {
    // Standard input: a pipe `up` never writes to; it closes when `up` exits, however it
    // exits, and the child stops then (src/local/parent-watch.ts).
    stdio: ["pipe", "pipe", "pipe"],
    env: { ...process.env, [PROGRESS_ENV]: "1", [STOP_ON_STDIN_EOF_ENV]: "1" },
    // A process group of its own: Ctrl-C in a terminal signals the whole foreground group,
    // and nats-server would stop at once under the draining shards. `up` alone gets it and
    // stops the children in order (gateway, shards, then NATS).
    detached: true,
  });
  if (bar) board.add(name);
  let isReady = false;
  let resolveReady!: (line: string) => void;
  let rejectReady!: (e: Error) => void;
  const ready = new Promise<string>((res, rej) => {
    resolveReady = res;
    rejectReady = rej;
  });
  const onLine = (line: string) => {
    const progress = parseProgressLine(line);
    if (progress) {
      if (bar) board.update(name, progress);
      return;
    }
    if (!line.trim()) return;
    board.log(`[${name}] ${line.replace(/^\S+Z (shard \S+: |gateway \S+: |gateway: )?/, "")}`);
    if (!isReady && readyLine.test(line)) {
      isReady = true;
      resolveReady(line);
    }
  };
  eachLine(proc.stdout!, onLine);
  eachLine(proc.stderr!, onLine);
  proc.on("error", (e) =>
    rejectReady(
      new ExpertMeshError("EM_LOCAL_CHILD_EXITED", `${name} did not start: ${e.message}`),
    ),
  );
  proc.on("exit", (code, sig) => {
    board.fail(name, `exited (${sig ?? code})`);
    rejectReady(
      new ExpertMeshError(
        "EM_LOCAL_CHILD_EXITED",
        `${name} exited (${sig ?? code}) before it was ready`,
      ),
    );
  });
  return { proc, ready };
}

/**
 * Stops a child as Ctrl-C would (SIGTERM; SIGKILL after 60 s); resolves once it has exited.
 * `skipDelay`: SIGINT too, a second signal (not merged with the first, as a second SIGTERM
 * might be), which ends a gateway's --shutdown-delay at once: for gateways that no front
 * sends anything to any more.
 */
function stopChild(c: ChildProcess, skipDelay = false): Promise<void> {
  return new Promise<void>((r) => {
    if (c.exitCode !== null || c.signalCode !== null) return r();
    const t = setTimeout(() => {
      c.kill("SIGKILL");
      r();
    }, 60_000);
    c.once("exit", () => {
      clearTimeout(t);
      r();
    });
    c.kill("SIGTERM");
    if (skipDelay) c.kill("SIGINT");
  });
}
