// A failing process leaves its error where Kubernetes reads a container's termination
// message (src/cli/termination-log.ts); the operator shows it in the model's status.
import { execFile } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { describe, expect, it } from "vitest";
import {
  TERMINATION_LOG_ENV,
  TERMINATION_MESSAGE_MAX_BYTES,
  writeTerminationMessage,
} from "../../src/cli/termination-log.ts";

const main = fileURLToPath(new URL("../../src/cli/main.ts", import.meta.url));
const dir = mkdtempSync(join(tmpdir(), "em-termination-"));

/** Runs `fn` with the termination log at `path`. */
function withLog(path: string, fn: () => void): void {
  const before = process.env[TERMINATION_LOG_ENV];
  process.env[TERMINATION_LOG_ENV] = path;
  try {
    fn();
  } finally {
    if (before === undefined) delete process.env[TERMINATION_LOG_ENV];
    else process.env[TERMINATION_LOG_ENV] = before;
  }
}

describe("writeTerminationMessage", () => {
  it("writes into the file the kubelet mounted", () => {
    const path = join(dir, "mounted");
    writeFileSync(path, "");
    withLog(path, () => writeTerminationMessage("[EM_CKPT_READ] gone"));
    expect(readFileSync(path, "utf8")).toBe("[EM_CKPT_READ] gone");
  });

  it("creates nothing outside a pod (no such file)", () => {
    const path = join(dir, "absent");
    withLog(path, () => writeTerminationMessage("[EM_CKPT_READ] gone"));
    expect(existsSync(path)).toBe(false);
  });

  it("keeps what the kubelet keeps, cut between characters", () => {
    const path = join(dir, "long");
    writeFileSync(path, "");
    // 4095 ASCII bytes, then a 3-byte character across the limit: cut before it.
    withLog(path, () => writeTerminationMessage(`${"a".repeat(4095)}€tail`));
    const bytes = readFileSync(path);
    expect(bytes.length).toBe(4095);
    expect(bytes.length).toBeLessThanOrEqual(TERMINATION_MESSAGE_MAX_BYTES);
    expect(bytes.toString("utf8")).toBe("a".repeat(4095));
  });
});

/** Runs the CLI with the termination log at `path`; its exit code and standard error. */
function cli(path: string, args: string[], nodeArgs: string[] = []) {
  return new Promise<{ code: number | null; stderr: string }>((resolve) => {
    const child = execFile(
      process.execPath,
      [...nodeArgs, main, ...args],
      { env: { ...process.env, [TERMINATION_LOG_ENV]: path } },
      (_err, _stdout, stderr) => resolve({ code: child.exitCode, stderr }),
    );
  });
}

describe("a command that fails", () => {
  it("leaves its error, code first, as the termination message", async () => {
    const path = join(dir, "shard");
    writeFileSync(path, "");
    const r = await cli(path, [
      "shard",
      `--model=${join(dir, "no-such-model")}`,
      `--plan=${join(dir, "no-such-plan.json")}`,
      "--shard=0",
      "--nats=nats://127.0.0.1:1",
      "--metrics-port=0",
    ]);
    expect(r.code).toBe(1);
    const message = readFileSync(path, "utf8");
    expect(message).toMatch(/^\[EM_[A-Z_]+\] .*no-such-plan\.json/);
    // The same words as the log's last line.
    expect(r.stderr.trim().split("\n").at(-1)).toBe(`expertmesh shard: ${message}`);
  });

  it("a crash nothing caught leaves its error too, and still crashes as Node does", async () => {
    const path = join(dir, "uncaught");
    writeFileSync(path, "");
    // A bug stands in for one: a timer that throws once the command has started.
    const bug = 'data:text/javascript,setTimeout(() => { throw new Error("a bug") }, 100)';
    const r = await cli(path, ["version"], ["--import", bug]);
    expect(r.code).toBe(1);
    expect(r.stderr).toContain("Error: a bug");
    expect(readFileSync(path, "utf8")).toBe("uncaught: a bug");
  });
});
