// A process killed by a fatal signal (a fault or an abort in the native engine, or a fatal
// error of Node.js) leaves why in its termination log, the file Kubernetes copies into the
// pod's status (shards/addon/crash_report.cpp; ADR 0036). Real processes, real signals.
import { execFile } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { describe, expect, it } from "vitest";
import { TERMINATION_LOG_ENV } from "../../src/cli/termination-log.ts";

const child = fileURLToPath(new URL("../fixtures/native-crash.ts", import.meta.url));
const dir = mkdtempSync(join(tmpdir(), "em-native-crash-"));

interface Ended {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
}

/** Runs the fixture's `what` case with the termination log at `log`. */
function run(what: string, log: string): Promise<Ended> {
  return new Promise((resolve) => {
    const p = execFile(
      process.execPath,
      [child, what],
      { env: { ...process.env, [TERMINATION_LOG_ENV]: log }, timeout: 120_000 },
      (_err, stdout, stderr) => resolve({ code: p.exitCode, signal: p.signalCode, stdout, stderr }),
    );
  });
}

/** An empty file where the kubelet would mount it. */
function mounted(name: string): string {
  const path = join(dir, name);
  writeFileSync(path, "");
  return path;
}

describe("a fatal signal in a pod", () => {
  it("an abort between ops (Node's fatal errors abort): the reason is in the termination log and on stderr", async () => {
    const log = mounted("abort");
    const ended = await run("abort", log);
    expect(ended.signal).toBe("SIGABRT");
    const message = readFileSync(log, "utf8");
    expect(message).toMatch(/^\[EM_NATIVE_CRASH\] SIGABRT outside the native engine's ops: /);
    expect(message.endsWith("\n")).toBe(true);
    expect(ended.stderr).toContain(message.trim());
  });

  it("a signal while an op runs names the op and the device", async () => {
    const log = mounted("during-op");
    const ended = await run("during-op", log);
    expect(ended.stdout).not.toContain("finished before the signal");
    expect(ended.signal).toBe("SIGSEGV");
    expect(readFileSync(log, "utf8")).toMatch(
      /^\[EM_NATIVE_CRASH\] SIGSEGV while the native engine ran matmul on cpu: a bug in the native engine/,
    );
  });

  it("leaves Node's WebAssembly trap handler working: an out-of-bounds load is an exception, nothing is written", async () => {
    const log = mounted("wasm");
    const ended = await run("wasm-trap", log);
    expect(ended.stdout).toContain("trapped: memory access out of bounds");
    expect(ended.stdout).toContain("still serving:");
    expect(ended.code).toBe(0);
    expect(readFileSync(log, "utf8")).toBe("");
  });
});

describe("a fatal signal outside a pod", () => {
  it("installs nothing: no file is created and the process dies as before", async () => {
    const log = join(dir, "absent");
    const ended = await run("abort", log);
    expect(ended.signal).toBe("SIGABRT");
    expect(existsSync(log)).toBe(false);
    expect(ended.stderr).not.toContain("EM_NATIVE_CRASH");
  });
});
