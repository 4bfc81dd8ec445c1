// The lines of batches, run by parts (batch-runner.ts) on a real folder, with a line runner
// in place of the gateway's routes (test/gateway/batches.test.ts runs them through a real
// gateway): parts shared by two runners, each line answered once; a stop; a lease lost.
import { mkdtempSync, readdirSync, readFileSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { afterEach, describe, expect, it } from "vitest";
import { type OpenBatch, PartRunner, partLines, partPath } from "../../src/gateway/batch-runner.ts";
import type { BatchLine, RunLine } from "../../src/gateway/batches.ts";
import { Leases } from "../../src/util/leases.ts";
import { waitFor } from "../support/env.ts";

const ID = "batch_0123456789abcdef01234567";
const open: PartRunner[] = [];
afterEach(() => {
  for (const r of open.splice(0)) r.close();
});

function folder(total: number): { dir: string; batch: OpenBatch; lines: BatchLine[] } {
  const dir = mkdtempSync(join(tmpdir(), "parts-"));
  writeFileSync(
    join(dir, `${ID}.json`),
    JSON.stringify({ batch: { id: ID, status: "in_progress" } }),
  );
  const lines = Array.from({ length: total }, (_, i) => ({
    custom_id: `r${i}`,
    body: { n: i },
  })) as unknown as BatchLine[];
  const batch: OpenBatch = {
    id: ID,
    endpoint: "/v1/chat/completions",
    expiresAt: Math.floor(Date.now() / 1000) + 3600,
    total,
    partLines: partLines(total),
    ms: Date.now(),
    owner: "owner-1",
  };
  return { dir, batch, lines };
}

function runner(
  dir: string,
  lines: BatchLine[],
  run: RunLine,
  o: { concurrency?: number; ended?: (id: string) => void; log?: string[] } = {},
) {
  const r = new PartRunner({
    dir,
    leases: new Leases(30_000),
    quota: null,
    run,
    concurrency: o.concurrency ?? 3,
    busyMs: 50,
    lines: () => lines,
    wrote: () => {},
    ended: o.ended ?? (() => {}),
    log: (l) => o.log?.push(l),
  });
  open.push(r);
  return r;
}

const ok =
  (ms: number, calls: number[] = [], owners = new Set<string>()): RunLine =>
  async (_url, body, owner) => {
    calls.push(body["n"] as number);
    owners.add(owner);
    await sleep(ms);
    return { status: 200, requestId: "x", body: { n: body["n"] } };
  };

/** Every answer in the parts' output files: custom_id -> how often. */
function answers(dir: string): Map<string, number> {
  const seen = new Map<string, number>();
  for (const name of readdirSync(dir).filter((n) => n.endsWith(".output.jsonl")))
    for (const l of readFileSync(join(dir, name), "utf8").trim().split("\n")) {
      const id = (JSON.parse(l) as { custom_id: string }).custom_id;
      seen.set(id, (seen.get(id) ?? 0) + 1);
    }
  return seen;
}

const leaseOf = (dir: string, k: number) =>
  JSON.parse(readFileSync(partPath(dir, ID, k, "lease"), "utf8")) as { done?: boolean };

describe("PartRunner", () => {
  it("two runners share a batch's parts: every line answered once, every part's lease done", async () => {
    const { dir, batch, lines } = folder(100); // (7 parts of 16, the last of 4)
    const ended: number[] = [];
    const owners = new Set<string>();
    const a = runner(dir, lines, ok(5, [], owners), { ended: () => ended.push(1) });
    const b = runner(dir, lines, ok(5, [], owners));
    a.offer(batch);
    b.offer(batch);
    await waitFor("every part done", async () =>
      Array.from({ length: 7 }, (_, k) => k).every((k) => leaseOf(dir, k).done === true)
        ? true
        : undefined,
    );
    const seen = answers(dir);
    expect(seen.size).toBe(100);
    expect([...seen.values()].every((n) => n === 1)).toBe(true);
    expect([...owners]).toEqual(["owner-1"]); // (each line runs as its batch's owner)
    expect(a.answered.completed + b.answered.completed).toBe(100);
    expect(a.answered.completed).toBeGreaterThan(0);
    expect(b.answered.completed).toBeGreaterThan(0);
    expect(ended.length).toBeGreaterThan(0);
    expect(a.inflight + b.inflight).toBe(0);
    expect(a.parts + b.parts).toBe(0);
  });

  it("holds at most --batch-concurrency lines in flight, taking a part once the last has none left to start", async () => {
    const { dir, batch, lines } = folder(40);
    let running = 0;
    let most = 0;
    const r = runner(
      dir,
      lines,
      async (_url, body) => {
        running++;
        most = Math.max(most, running);
        await sleep(2);
        running--;
        return { status: 200, requestId: "x", body: { n: body["n"] } };
      },
      { concurrency: 4 },
    );
    r.offer(batch);
    await waitFor("all answered", async () => (answers(dir).size === 40 ? true : undefined));
    expect(most).toBe(4);
  });

  it("stop: no more lines start; the parts held end (their leases done) once their lines in flight do", async () => {
    const { dir, batch, lines } = folder(64);
    const calls: number[] = [];
    const r = runner(dir, lines, ok(20, calls), { concurrency: 2 });
    r.offer(batch);
    await waitFor("some answered", async () => (r.answered.completed >= 2 ? true : undefined));
    r.stop(ID);
    await waitFor("nothing in flight", async () => (r.inflight === 0 ? true : undefined));
    const started = calls.length;
    await sleep(100);
    expect(calls.length).toBe(started);
    expect(answers(dir).size).toBeLessThan(64);
    expect(leaseOf(dir, 0).done).toBe(true);
    expect(r.parts).toBe(0);
  });

  it("a part whose lease another gateway took: its answers are no longer written here", async () => {
    const { dir, batch, lines } = folder(16);
    const log: string[] = [];
    const r = runner(dir, lines, ok(30), { concurrency: 1, log });
    r.offer(batch);
    await waitFor("an answer", async () => (r.answered.completed >= 1 ? true : undefined));
    writeFileSync(
      partPath(dir, ID, 0, "lease"),
      JSON.stringify({ holder: "another", host: "elsewhere", pid: 1, at: Date.now() }),
    );
    r.tick(true);
    expect(log.join("\n")).toContain("another gateway runs part 0 now");
    const written = answers(dir).size;
    await sleep(150);
    expect(answers(dir).size).toBe(written);
    expect(leaseOf(dir, 0)).toMatchObject({ holder: "another" }); // (not marked done by this one)
  });

  it("a line answered 429 runs again after a wait; none fails", async () => {
    const { dir, batch, lines } = folder(3);
    const tries = new Map<number, number>();
    const r = runner(dir, lines, async (_url, body) => {
      const n = body["n"] as number;
      tries.set(n, (tries.get(n) ?? 0) + 1);
      return tries.get(n) === 1
        ? { status: 429, requestId: "x", body: { error: "full" } }
        : { status: 200, requestId: "x", body: { n } };
    });
    r.offer(batch);
    await waitFor("all answered", async () => (answers(dir).size === 3 ? true : undefined), 10_000);
    expect(r.answered).toEqual({ completed: 3, failed: 0, retried: 3 });
  });

  it("a part taken up again runs only the lines without an answer (a line cut short runs again)", async () => {
    const { dir, batch, lines } = folder(16);
    const before = `${JSON.stringify({ custom_id: "r0", response: { status_code: 200 } })}\n{"custom_id":"r1","res`;
    writeFileSync(partPath(dir, ID, 0, "output"), before);
    const calls: number[] = [];
    const r = runner(dir, lines, ok(1, calls));
    r.offer(batch);
    await waitFor("all answered", async () => (answers(dir).size === 16 ? true : undefined));
    expect(calls.sort((x, y) => x - y)).toEqual(Array.from({ length: 15 }, (_, i) => i + 1));
  });
});
