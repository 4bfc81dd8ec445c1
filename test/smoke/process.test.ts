// The guarantee behind "Ctrl-C leaves nothing behind": a service started by the test
// environment dies with the process that started it, even on SIGKILL (no cleanup code runs).
import { spawn } from "node:child_process";
import { setTimeout as sleep } from "node:timers/promises";
import { describe, expect, it } from "vitest";
import { alive, track } from "../support/procs.ts";

describe("service processes", () => {
  it.each(["SIGKILL", "SIGINT", "SIGTERM"] as const)(
    "die when their starter gets %s",
    async (signal) => {
      const holder = spawn(
        process.execPath,
        [new URL("../fixtures/hold-nats.ts", import.meta.url).pathname],
        {
          stdio: ["ignore", "pipe", "inherit"],
        },
      );
      const pid = await new Promise<number>((resolve, reject) => {
        let out = "";
        holder.stdout.on("data", (c: Buffer) => {
          out += c.toString();
          if (out.includes("\n")) resolve(Number(out.trim()));
        });
        holder.on("exit", () => reject(new Error("holder exited early")));
      });
      expect(alive(track(pid))).toBe(true);
      holder.kill(signal);
      let gone = false;
      for (let i = 0; i < 50 && !gone; i++) {
        await sleep(100);
        gone = !alive(pid);
      }
      expect(gone).toBe(true);
    },
  );
});
