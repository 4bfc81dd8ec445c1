import { setTimeout as sleep } from "node:timers/promises";
import { describe, expect, it } from "vitest";
import { WorkQueue } from "../../src/operator/workqueue.ts";

/** Polls until `done()` (a generous deadline: these tests assert order and counts, never time). */
async function until(done: () => boolean, deadlineMs = 10_000): Promise<void> {
  const end = Date.now() + deadlineMs;
  while (!done() && Date.now() < end) await sleep(5);
}

describe("WorkQueue", () => {
  it("deduplicates keys waiting to be processed", async () => {
    const q = new WorkQueue();
    const seen: string[] = [];
    for (const k of ["a", "b", "a", "a", "b"]) q.add(k);
    expect(q.depth).toBe(2);
    const run = q.run(async (k) => {
      seen.push(k);
      return undefined;
    }, 1);
    await until(() => seen.length >= 2);
    q.shutdown();
    await run;
    expect(seen).toEqual(["a", "b"]);
  });

  it("never runs one key twice at once, and reruns a key added while it ran", async () => {
    const q = new WorkQueue();
    let running = 0;
    let maxRunning = 0;
    let runs = 0;
    q.add("k");
    const run = q.run(async () => {
      running++;
      maxRunning = Math.max(maxRunning, running);
      runs++;
      if (runs === 1) q.add("k"); // a change arrives during the reconcile
      await sleep(10);
      running--;
      return undefined;
    }, 4);
    await until(() => runs >= 2 && running === 0);
    q.shutdown();
    await run;
    expect(maxRunning).toBe(1);
    expect(runs).toBe(2);
  });

  it.each([
    [1, 10],
    [2, 20],
    [3, 40],
    [4, 80],
    [8, 100], // capped
  ])("after %i failures the next delay is %i ms (base 10, max 100)", (failures, delay) => {
    const q = new WorkQueue({ baseDelayMs: 10, maxDelayMs: 100 });
    let last = 0;
    for (let i = 0; i < failures; i++) last = q.nextBackoff("k");
    expect(last).toBe(delay);
  });

  it("retries a failing key with backoff and forgets failures after a success", async () => {
    const q = new WorkQueue({ baseDelayMs: 5, maxDelayMs: 50 });
    const times: number[] = [];
    q.add("k");
    const run = q.run(async () => {
      times.push(Date.now());
      if (times.length < 3) throw new Error("not yet");
      return undefined;
    }, 1);
    await until(() => times.length >= 3);
    q.shutdown();
    await run;
    expect(times).toHaveLength(3);
    expect(q.failures("k")).toBe(0);
  });

  it("requeues after the delay a worker asks for", async () => {
    const q = new WorkQueue();
    let runs = 0;
    q.add("k");
    const run = q.run(async () => {
      runs++;
      return runs < 3 ? { requeueAfterMs: 5 } : undefined;
    }, 1);
    await until(() => runs >= 3);
    await sleep(20); // a fourth run would come 5 ms later
    q.shutdown();
    await run;
    expect(runs).toBe(3);
  });

  it("lists the keys being processed, and none once they finish", async () => {
    const q = new WorkQueue();
    let release = () => {};
    const gate = new Promise<void>((resolve) => {
      release = resolve;
    });
    for (const k of ["a", "b", "c"]) q.add(k);
    const run = q.run(async () => {
      await gate;
      return undefined;
    }, 2);
    await until(() => q.inFlight.length === 2);
    expect(q.inFlight.sort()).toEqual(["a", "b"]);
    q.shutdown(); // c is never started
    release();
    await run;
    expect(q.inFlight).toEqual([]);
  });
});
