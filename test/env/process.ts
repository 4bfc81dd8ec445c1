// Child processes of the test environment. Every service is started through
// `setpriv --pdeathsig SIGKILL`, so the kernel kills it when the process that started it
// dies for any reason (Ctrl-C, a crash, SIGKILL of vitest): nothing is ever left behind.
// Each one also runs in its own process group, so a terminal's Ctrl-C reaches only the
// test runner, which then stops the services in order.
import { type ChildProcess, spawn } from "node:child_process";
import { createWriteStream, existsSync, readFileSync, writeFileSync } from "node:fs";
import { createServer } from "node:net";
import { join } from "node:path";
import { setTimeout as sleep } from "node:timers/promises";

/** A free TCP port on 127.0.0.1 (the kernel picks it; the socket is closed at once). */
export async function freePort(): Promise<number> {
  // Below the kernel's ephemeral range (32768-60999 by default): a port the OS hands out for
  // "port 0" (a shard's metrics server, any outgoing connection) is never one of ours, so a
  // port chosen here stays free until its process binds it. (Ephemeral picks collided once:
  // a shard's metrics server took the port meant for the gateway.)
  // Test files run in parallel processes, and a port is chosen some time before it is bound
  // (a NATS server started late on purpose, or restarted on its port): each choice is
  // claimed in the run's registry (a file per port, created exclusively), so no two choices
  // of one run meet. (Two once did: a late nats-server found its port taken and exited.)
  const registry = process.env["EXPERTMESH_TEST_PORTS"];
  for (let attempt = 0; attempt < 50; attempt++) {
    const port = 20_000 + Math.floor(Math.random() * 12_000);
    if (registry) {
      try {
        writeFileSync(join(registry, String(port)), "", { flag: "wx" });
      } catch {
        continue; // claimed by another choice of this run
      }
    }
    const free = await new Promise<boolean>((resolve) => {
      const srv = createServer();
      srv.unref();
      srv.once("error", () => resolve(false));
      srv.listen(port, "127.0.0.1", () => srv.close(() => resolve(true)));
    });
    if (free) return port;
  }
  throw new Error("no free port in 20000-31999 after 50 tries");
}

/** A running service: its pid, its log file, and how to stop it. */
export class ManagedProcess {
  readonly name: string;
  readonly logPath: string;
  readonly child: ChildProcess;
  #exit: Promise<number | null>;
  #exited = false;

  constructor(
    name: string,
    binary: string,
    args: string[],
    logDir: string,
    env?: NodeJS.ProcessEnv,
  ) {
    if (!existsSync(binary))
      throw new Error(`${name}: binary not found at ${binary}; run test/env/provision.sh`);
    this.name = name;
    this.logPath = join(logDir, `${name}.log`);
    const log = createWriteStream(this.logPath);
    this.child = spawn("setpriv", ["--pdeathsig", "SIGKILL", "--", binary, ...args], {
      stdio: ["ignore", "pipe", "pipe"],
      detached: true,
      env: env ?? process.env,
    });
    this.child.stdout?.pipe(log);
    this.child.stderr?.pipe(log);
    this.#exit = new Promise((resolve) => {
      this.child.on("exit", (code, signal) => {
        this.#exited = true;
        resolve(code ?? (signal ? 128 : null));
      });
      this.child.on("error", () => {
        this.#exited = true;
        resolve(null);
      });
    });
  }

  get pid(): number | undefined {
    return this.child.pid;
  }

  get exited(): boolean {
    return this.#exited;
  }

  /** The last lines of the log, for error messages. */
  tail(lines = 25): string {
    try {
      return readFileSync(this.logPath, "utf8").trimEnd().split("\n").slice(-lines).join("\n");
    } catch {
      return "(no log)";
    }
  }

  /**
   * Polls `ready` until it returns true. Fails fast, with the log tail, when the process
   * exits, and after `timeoutMs`.
   */
  async waitUntil(what: string, ready: () => Promise<boolean>, timeoutMs = 60_000): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    let lastError: unknown;
    while (Date.now() < deadline) {
      if (this.#exited) {
        throw new Error(
          `${this.name} exited before it was ${what}; log ${this.logPath}:\n${this.tail()}`,
        );
      }
      try {
        if (await ready()) return;
      } catch (err) {
        lastError = err;
      }
      await sleep(200);
    }
    const why = lastError instanceof Error ? ` (last error: ${lastError.message})` : "";
    throw new Error(
      `${this.name} not ${what} after ${timeoutMs} ms${why}; log ${this.logPath}:\n${this.tail()}`,
    );
  }

  /** SIGTERM, then SIGKILL after `graceMs`; resolves when the process is gone. */
  async stop(graceMs = 10_000): Promise<void> {
    if (this.#exited || this.child.pid === undefined) return;
    this.#signal("SIGTERM");
    const timer = setTimeout(() => this.#signal("SIGKILL"), graceMs);
    await this.#exit;
    clearTimeout(timer);
  }

  #signal(sig: NodeJS.Signals): void {
    try {
      // The whole process group: setpriv execs the binary, but a binary may fork helpers.
      if (this.child.pid !== undefined) process.kill(-this.child.pid, sig);
    } catch {
      // already gone
    }
  }
}
