// withDirLock (src/util/fs.ts): the lock a conversation's log is appended under, so that
// gateways on an NFS folder (where O_APPEND is not atomic between clients) never write over
// each other's records. Another process holds it here, as another gateway would.
import { spawn } from "node:child_process";
import {
  appendFileSync,
  existsSync,
  mkdirSync,
  mkdtempSync,
  readFileSync,
  utimesSync,
} from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { DIR_LOCK_STALE_MS, withDirLock } from "../../src/util/fs.ts";

const scratch = () => mkdtempSync(join(tmpdir(), "dir-lock-"));

describe("withDirLock", () => {
  it("runs the function holding the lock, and lets go after (a throw too)", () => {
    const lock = join(scratch(), "a.lock");
    expect(withDirLock(lock, () => existsSync(lock))).toBe(true);
    expect(existsSync(lock)).toBe(false);
    expect(() =>
      withDirLock(lock, () => {
        throw new Error("inside");
      }),
    ).toThrow("inside");
    expect(existsSync(lock)).toBe(false);
  });

  it("waits for another process that holds it: what it writes comes first", async () => {
    const dir = scratch();
    const lock = join(dir, "log.lock");
    const log = join(dir, "log");
    const holder = spawn(
      process.execPath,
      [
        "-e",
        `const fs = require("node:fs");
         fs.mkdirSync(${JSON.stringify(lock)});
         process.stdout.write("held\\n");
         setTimeout(() => {
           fs.appendFileSync(${JSON.stringify(log)}, "theirs\\n");
           fs.rmdirSync(${JSON.stringify(lock)});
         }, 400);`,
      ],
      { stdio: ["ignore", "pipe", "inherit"] },
    );
    await new Promise<void>((resolve) => holder.stdout.once("data", () => resolve()));
    withDirLock(lock, () => appendFileSync(log, "ours\n"));
    expect(readFileSync(log, "utf8")).toBe("theirs\nours\n");
    await new Promise((r) => holder.once("exit", r));
  });

  it("breaks a lock left by a process that died holding it; gives up on a live one after waitMs", () => {
    const lock = join(scratch(), "b.lock");
    mkdirSync(lock);
    expect(() => withDirLock(lock, () => 1, 50)).toThrow(/held by another process/);
    const old = new Date(Date.now() - DIR_LOCK_STALE_MS - 1000);
    utimesSync(lock, old, old);
    expect(withDirLock(lock, () => 2, 50)).toBe(2);
    expect(existsSync(lock)).toBe(false);
  });
});
