// The prefix cache's disk tier (ADR 0019): DiskPrefixStore on a real folder (round trips,
// the byte budget, restarts, damaged files, failed writes) and the allocator's use of a
// second tier (eviction hands blocks down, a prefix continues with the tier's blocks).
import { spawn, spawnSync } from "node:child_process";
import { createHash } from "node:crypto";
import {
  existsSync,
  mkdirSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  rmSync,
  statSync,
  utimesSync,
  writeFileSync,
} from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import {
  BlockAllocator,
  BlockKvCache,
  bytesPerBlock,
  type PrefixTier,
} from "../../src/engine/kv-blocks.ts";
import { DISK_HEADER_BYTES, DiskPrefixStore, fingerprintOf } from "../../src/engine/kv-disk.ts";
import { Scheduler, Sequence } from "../../src/engine/scheduler.ts";
import type { ModelConfig } from "../../src/model/config.ts";

const hashOf = (s: string) => createHash("sha256").update(s).digest("base64");
const fileOf = (h: string) => `${Buffer.from(h, "base64").toString("base64url")}.kv`;
/** A block of `per` bytes in each of `layers` layers, filled from `seed`. */
const rows = (seed: number, layers = 2, per = 24) =>
  Array.from({ length: layers }, (_, l) =>
    Uint8Array.from({ length: per }, (_, i) => (seed * 31 + l * 7 + i) & 0xff),
  );
const joined = (parts: Uint8Array[]) => Buffer.concat(parts);

const dirs: string[] = [];
function tempDir(): string {
  const d = mkdtempSync(join(tmpdir(), "em-kv-disk-"));
  dirs.push(d);
  return d;
}
afterEach(() => {
  for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true });
});

const BLOCK = 48; // 2 layers x 24 bytes
const FILE = DISK_HEADER_BYTES + BLOCK;
const open = (
  dir: string,
  files: number,
  more: Partial<{ identity: object; pending: number; staged: number; shared: boolean }> = {},
) =>
  DiskPrefixStore.open({
    dir,
    maxBytes: files * FILE,
    blockBytes: BLOCK,
    identity: { model: "tiny", ...more.identity },
    ...(more.pending !== undefined ? { maxPendingBytes: more.pending } : {}),
    ...(more.staged !== undefined ? { maxStagedBytes: more.staged } : {}),
    ...(more.shared ? { shared: true } : {}),
  });
/** Saves blocks 1..n (hashes of "1".."n") and waits for their files. */
async function saved(s: DiskPrefixStore, n: number): Promise<string[]> {
  const hs = Array.from({ length: n }, (_, i) => hashOf(`${i + 1}`));
  for (const [i, h] of hs.entries()) s.save(h, rows(i + 1));
  await s.flush();
  return hs;
}
/** Resolves once `s` has ended `n` more reads ahead. */
function staged(s: DiskPrefixStore, n: number): Promise<void> {
  return new Promise((resolve) => {
    let left = n;
    s.onStaged = () => {
      if (--left === 0) resolve();
    };
  });
}
const loaded = (s: DiskPrefixStore, h: string): Buffer | null => {
  const p = s.read(h);
  return p && Buffer.from(p);
};

describe("DiskPrefixStore", () => {
  it("gives back the bytes it kept: from the pending copy, then from the file", async () => {
    const s = open(tempDir(), 4);
    const h = hashOf("a");
    expect(s.has(h)).toBe(false);
    expect(loaded(s, h)).toBeNull();
    expect(s.save(h, rows(1))).toBe(true);
    expect(loaded(s, h)).toEqual(joined(rows(1)));
    await s.flush();
    expect(readdirSync(s.dir).sort()).toEqual([fileOf(h), "fingerprint.json"].sort());
    // Users' prompts, in a form: for this user alone.
    expect(statSync(s.dir).mode & 0o777).toBe(0o700);
    expect(statSync(join(s.dir, fileOf(h))).mode & 0o777).toBe(0o600);
    expect(loaded(s, h)).toEqual(joined(rows(1)));
    // Saving again keeps the first bytes (a hash stands for one content).
    expect(s.save(h, rows(2))).toBe(true);
    await s.flush();
    expect(loaded(s, h)).toEqual(joined(rows(1)));
    expect(s.stats).toMatchObject({ files: 1, bytes: FILE, hits: 3, written: 1, errors: 0 });
  });

  it("keeps to its budget, least recently used first", async () => {
    const s = open(tempDir(), 3);
    const [a, b, c, d] = ["a", "b", "c", "d"].map(hashOf) as [string, string, string, string];
    s.save(a, rows(1));
    s.save(b, rows(2));
    s.save(c, rows(3));
    await s.flush();
    expect(loaded(s, a)).not.toBeNull(); // a is now the most recent: b goes first
    s.save(d, rows(4));
    await s.flush();
    expect([a, b, c, d].map((h) => s.has(h))).toEqual([true, false, true, true]);
    expect(existsSync(join(s.dir, fileOf(b)))).toBe(false);
    expect(s.stats).toMatchObject({ files: 3, bytes: 3 * FILE });
  });

  it("finds its files after a restart, and another fingerprint does not", async () => {
    const dir = tempDir();
    const s = open(dir, 4);
    const hs = ["x", "y", "z"].map(hashOf);
    for (const [i, h] of hs.entries()) s.save(h, rows(i));
    await s.flush();
    // A read marks the file used now (its time orders evictions after a restart).
    const mtime = (h: string) => statSync(join(s.dir, fileOf(h))).mtimeMs;
    utimesSync(join(s.dir, fileOf(hs[0]!)), 1000, 1000);
    expect(loaded(s, hs[0]!)).not.toBeNull();
    expect(mtime(hs[0]!)).toBeGreaterThan(Date.now() - 60_000);
    const again = open(dir, 4);
    expect(again.dir).toBe(s.dir);
    expect(hs.map((h, i) => loaded(again, h)?.equals(joined(rows(i))))).toEqual([true, true, true]);
    const other = open(dir, 4, { identity: { model: "other" } });
    expect(other.dir).not.toBe(s.dir);
    expect(hs.some((h) => other.has(h))).toBe(false);
    // A smaller budget at the next start drops the least recently used file (y), and its file.
    for (const [h, t] of [
      [hs[0]!, 3000],
      [hs[1]!, 1000],
      [hs[2]!, 2000],
    ] as const)
      utimesSync(join(s.dir, fileOf(h)), t, t);
    const small = open(dir, 2);
    expect(hs.map((h) => small.has(h))).toEqual([true, false, true]);
    await small.flush();
    expect(existsSync(join(s.dir, fileOf(hs[1]!)))).toBe(false);
    expect(JSON.parse(readFileSync(join(s.dir, "fingerprint.json"), "utf8"))).toMatchObject({
      fingerprint: fingerprintOf({ model: "tiny" }),
      model: "tiny",
    });
  });

  it("removes other fingerprints' folders unused for an hour, oldest first, while over the budget", async () => {
    const dir = tempDir();
    const filled = async (model: string, blocks: number, hoursAgo: number) => {
      const st = open(dir, 100, { identity: { model } }); // a budget that removes nothing
      for (let i = 0; i < blocks; i++) st.save(hashOf(`${model}${i}`), rows(i));
      await st.flush();
      const t = (Date.now() - hoursAgo * 3_600_000) / 1000;
      for (const f of readdirSync(st.dir)) utimesSync(join(st.dir, f), t, t);
      return st.dir;
    };
    const a = await filled("a", 2, 3);
    const b = await filled("b", 2, 2);
    const c = await filled("c", 1, 0.5); // used half an hour ago: kept whatever the budget
    // Not a folder this store writes (a file of another kind): never counted or removed.
    const foreign = join(dir, "0123456789abcdef");
    mkdirSync(foreign);
    writeFileSync(join(foreign, "fingerprint.json"), "{}");
    writeFileSync(join(foreign, "notes.txt"), "x".repeat(10_000));
    const size = (d: string) => readdirSync(d).reduce((n, f) => n + statSync(join(d, f)).size, 0);
    const logs: string[] = [];
    const budget = size(b) + size(c); // room for b and c, not a as well
    const opened = () =>
      DiskPrefixStore.open({
        dir,
        maxBytes: budget,
        blockBytes: BLOCK,
        identity: { model: "d" },
        log: (m) => logs.push(m),
      });
    opened();
    expect([a, b, c, foreign].map((d) => existsSync(d))).toEqual([false, true, true, true]);
    expect(logs).toEqual([
      expect.stringMatching(
        /removed 1 folder\(s\) of other fingerprints .*unused for over an hour/,
      ),
    ]);
    // Under budget now: nothing more goes.
    opened();
    expect(existsSync(b)).toBe(true);
    expect(logs).toHaveLength(1);
  });

  it("the fingerprint ignores key order and sees every value", () => {
    expect(fingerprintOf({ a: 1, b: { c: [1, 2], d: "x" } })).toBe(
      fingerprintOf({ b: { d: "x", c: [1, 2] }, a: 1 }),
    );
    expect(fingerprintOf({ a: 1, b: { c: [1, 2] } })).not.toBe(
      fingerprintOf({ a: 1, b: { c: [2, 1] } }),
    );
    expect(fingerprintOf({ a: 1 })).toMatch(/^[0-9a-f]{16}$/);
  });

  // biome-ignore format: a table
  it.each([
    ["a payload byte flipped", (f: Buffer) => { f[FILE - 1]! ^= 1; }],
    ["a header byte flipped", (f: Buffer) => { f[0]! ^= 1; }],
    ["another block's hash", (f: Buffer) => { f[20]! ^= 1; }],
    ["another version", (f: Buffer) => { f.writeUInt32LE(2, 4); }],
    ["another block size", (f: Buffer) => { f.writeUInt32LE(BLOCK - 1, 8); }],
  ])("a damaged file (%s) is a miss, counted and removed", async (_what, damage) => {
    const s = open(tempDir(), 4);
    const h = hashOf("d");
    s.save(h, rows(5));
    await s.flush();
    const path = join(s.dir, fileOf(h));
    const bytes = readFileSync(path);
    damage(bytes);
    writeFileSync(path, bytes);
    expect(loaded(s, h)).toBeNull();
    expect(s.has(h)).toBe(false);
    expect(existsSync(path)).toBe(false);
    expect(s.stats).toMatchObject({ files: 0, bytes: 0, errors: 1 });
  });

  it("at start drops leftovers of interrupted writes, files of another size and names it would not write", async () => {
    const dir = tempDir();
    const s = open(dir, 4);
    const good = hashOf("good");
    s.save(good, rows(1));
    await s.flush();
    const short = fileOf(hashOf("short"));
    writeFileSync(join(s.dir, short), Buffer.alloc(FILE - 1));
    // Temporary files: of a process that has exited, of this pid (an earlier process with
    // it: a restarted container's), of a live process but too old: removed; of a live
    // process, recent: it is writing.
    const dead = spawnSync("true").pid;
    const live = spawn("sleep", ["30"]);
    const tmp = (what: string, pid: number) => `${fileOf(hashOf(what))}.tmp-${pid}-0`;
    const writing = tmp("w", live.pid!);
    for (const name of [tmp("t", dead), tmp("own", process.pid), tmp("old", live.pid!), writing])
      writeFileSync(join(s.dir, name), Buffer.alloc(FILE));
    utimesSync(join(s.dir, tmp("old", live.pid!)), 1000, 1000);
    // The same 32 bytes under another spelling (base64url's last character has 2 spare bits).
    const name = fileOf(good);
    const last = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    const twin = `${name.slice(0, 42)}${last[last.indexOf(name[42]!) ^ 1]}.kv`;
    expect(Buffer.from(twin.slice(0, -3), "base64url")).toEqual(Buffer.from(good, "base64"));
    writeFileSync(join(s.dir, twin), readFileSync(join(s.dir, name)));
    writeFileSync(join(s.dir, "notes.txt"), "kept");
    const again = open(dir, 4);
    live.kill();
    expect(again.stats).toMatchObject({ files: 1, bytes: FILE });
    expect(readdirSync(s.dir).sort()).toEqual(
      [name, "fingerprint.json", "notes.txt", writing].sort(),
    );
  });

  it("a file gone from under it is a miss; a failed write is counted and forgotten", async () => {
    const s = open(tempDir(), 4);
    const h = hashOf("gone");
    s.save(h, rows(1));
    await s.flush();
    rmSync(join(s.dir, fileOf(h)));
    expect(loaded(s, h)).toBeNull();
    expect(s.has(h)).toBe(false);
    // The folder itself gone: made again, fingerprint.json too.
    rmSync(s.dir, { recursive: true });
    const h2 = hashOf("again");
    expect(s.save(h2, rows(2))).toBe(true);
    await s.flush();
    expect(loaded(s, h2)).toEqual(joined(rows(2)));
    expect(JSON.parse(readFileSync(join(s.dir, "fingerprint.json"), "utf8"))).toMatchObject({
      model: "tiny",
    });
    // A file where the folder was: the write fails, the block is not kept.
    rmSync(s.dir, { recursive: true });
    writeFileSync(s.dir, "");
    const h3 = hashOf("nowhere");
    expect(s.save(h3, rows(3))).toBe(true);
    await s.flush();
    expect(s.has(h3)).toBe(false);
    expect(s.stats).toMatchObject({ files: 1, errors: 2, written: 2 });
  });

  it("drops spills past the pending limit until the writes end", async () => {
    const s = open(tempDir(), 8, { pending: FILE });
    expect(s.save(hashOf("1"), rows(1))).toBe(true);
    expect(s.save(hashOf("2"), rows(2))).toBe(false);
    expect(s.stats.dropped).toBe(1);
    await s.room();
    expect(s.save(hashOf("2"), rows(2))).toBe(true);
    await s.flush();
    expect(s.stats).toMatchObject({ files: 2, written: 2, dropped: 1 });
  });

  it("reads ahead: read() then takes the bytes read, not the disk", async () => {
    const s = open(tempDir(), 4);
    const [a, b, c] = await saved(s, 3);
    const done = staged(s, 2);
    s.prefetch([a!, b!, hashOf("not kept"), c!]); // stops at the first it lacks
    expect([a, b, c].map((h) => s.loading(h!))).toEqual([true, true, false]);
    expect(s.stagedBytes).toBe(2 * FILE);
    await done;
    expect([a, b].map((h) => s.loading(h!))).toEqual([false, false]);
    // Gone from the disk since: the bytes read ahead are still good.
    rmSync(join(s.dir, fileOf(a!)));
    expect(loaded(s, a!)).toEqual(joined(rows(1)));
    expect(s.stagedBytes).toBe(FILE);
    expect(s.stats).toMatchObject({ hits: 1, readAhead: 1, errors: 0 });
    // Nothing read ahead for c: read from the disk, as before.
    expect(loaded(s, c!)).toEqual(joined(rows(3)));
    expect(s.stats).toMatchObject({ hits: 2, readAhead: 1 });
    // Read-ahead off (the bench's peer): nothing starts.
    const off = DiskPrefixStore.open({
      dir: join(s.dir, ".."),
      maxBytes: 4 * FILE,
      blockBytes: BLOCK,
      identity: { model: "tiny" },
      readAhead: false,
    });
    off.prefetch([b!, c!]);
    expect([off.loading(b!), off.loading(c!), off.stagedBytes]).toEqual([false, false, 0]);
    // Closed (its reader thread ended): reads started are dropped, read() reads on its own.
    s.prefetch([c!]);
    expect(s.loading(c!)).toBe(true);
    await s.close();
    expect([s.loading(c!), s.stagedBytes]).toEqual([false, 0]);
    s.prefetch([c!]);
    expect(s.loading(c!)).toBe(false);
    expect(loaded(s, c!)).toEqual(joined(rows(3)));
  });

  it("reads ahead within its budget, dropping unused reads oldest first", async () => {
    const s = open(tempDir(), 4, { staged: 2 * FILE });
    const [a, b, c] = await saved(s, 3);
    let done = staged(s, 2);
    s.prefetch([a!, b!, c!]);
    expect([a, b, c].map((h) => s.loading(h!))).toEqual([true, true, false]);
    await done;
    done = staged(s, 1);
    s.prefetch([c!]); // a, read first and not used, makes room
    expect(s.loading(c!)).toBe(true);
    await done;
    expect(s.stagedBytes).toBe(2 * FILE);
    rmSync(join(s.dir, fileOf(a!)));
    rmSync(join(s.dir, fileOf(b!)));
    expect(loaded(s, b!)).toEqual(joined(rows(2))); // still held
    expect(loaded(s, a!)).toBeNull(); // dropped from memory, and gone from the disk
    // A read ahead still running is not dropped for another.
    const t = open(tempDir(), 4, { staged: FILE });
    const [x, y] = await saved(t, 2);
    t.prefetch([x!, y!]);
    expect([t.loading(x!), t.loading(y!)]).toEqual([true, false]);
  });

  it("making room for reads ahead keeps those the same prefetch wants", async () => {
    const s = open(tempDir(), 8, { staged: 3 * FILE });
    const [a, b, c, d] = await saved(s, 4);
    let done = staged(s, 3);
    s.prefetch([b!, c!, d!]);
    await done;
    done = staged(s, 1);
    s.prefetch([a!, b!, c!]); // room for a: d goes, not b or c
    expect([a, b, c, d].map((h) => s.loading(h!))).toEqual([true, false, false, false]);
    await done;
    expect(s.readsInFlight).toBe(0);
    for (const h of [a, b, c]) rmSync(join(s.dir, fileOf(h!)));
    expect([a, b, c].map((h, i) => loaded(s, h!)?.equals(joined(rows(i + 1))))).toEqual([
      true,
      true,
      true,
    ]);
    expect(s.stats.readAhead).toBe(3);
  });

  it("gives up reads ahead that read() or a drop got to first", async () => {
    const s = open(tempDir(), 8);
    const hs = await saved(s, 6);
    s.prefetch(hs);
    expect(s.readsInFlight).toBe(6);
    // Read in the step before the reader got to them: their reads are given up.
    for (const [i, h] of hs.entries()) expect(loaded(s, h)).toEqual(joined(rows(i + 1)));
    expect([s.readsInFlight, s.stagedBytes, s.stats.readAhead]).toEqual([0, 0, 0]);
    // The reader goes on with new reads.
    const done = staged(s, 1);
    s.prefetch([hs[0]!]);
    await done;
    expect(s.loading(hs[0]!)).toBe(false);
    expect(s.stagedBytes).toBe(FILE);
  });

  it("a file gone or damaged before its read ahead is a miss, and removed", async () => {
    const s = open(tempDir(), 4);
    const [a, b] = await saved(s, 2);
    rmSync(join(s.dir, fileOf(a!)));
    const path = join(s.dir, fileOf(b!));
    const bytes = readFileSync(path);
    bytes[DISK_HEADER_BYTES + 3]! ^= 0xff;
    writeFileSync(path, bytes);
    const done = staged(s, 2);
    s.prefetch([a!, b!]);
    await done;
    // a: the read failed, so it is forgotten at once (no wait for it: loading is false).
    expect([s.has(a!), s.loading(a!)]).toEqual([false, false]);
    // b: read whole, its CRC checked on the reader thread: forgotten and removed too.
    expect([s.has(b!), s.loading(b!), existsSync(path)]).toEqual([false, false, false]);
    expect(loaded(s, b!)).toBeNull();
    expect(s.stats).toMatchObject({ files: 0, errors: 2, hits: 0 });
    // Each check: a file of another block's hash (copied over) fails too.
    const t = open(tempDir(), 4);
    const [x, y] = await saved(t, 2);
    writeFileSync(join(t.dir, fileOf(x!)), readFileSync(join(t.dir, fileOf(y!))));
    const checked = staged(t, 2);
    t.prefetch([x!, y!]);
    await checked;
    expect([t.has(x!), t.has(y!)]).toEqual([false, true]);
    expect(loaded(t, y!)).toEqual(joined(rows(2)));
  });

  it("a read ahead sets its file's time: the order of use after a restart", async () => {
    const s = open(tempDir(), 4);
    const [a, b] = await saved(s, 2);
    const old = new Date(Date.now() - 3_600_000);
    for (const h of [a, b]) utimesSync(join(s.dir, fileOf(h!)), old, old);
    const done = staged(s, 1);
    s.prefetch([a!]);
    await done;
    const mtime = (h: string) => statSync(join(s.dir, fileOf(h))).mtimeMs;
    expect(mtime(a!)).toBeGreaterThan(old.getTime() + 1000);
    expect(mtime(b!)).toBeLessThan(old.getTime() + 1000);
  });

  it("refuses a budget under one block and a folder it cannot make", () => {
    const dir = tempDir();
    expect(() =>
      DiskPrefixStore.open({ dir, maxBytes: FILE - 1, blockBytes: BLOCK, identity: {} }),
    ).toThrow(expect.objectContaining({ code: "EM_CLI_USAGE" }));
    writeFileSync(join(dir, "file"), "");
    expect(() =>
      DiskPrefixStore.open({
        dir: join(dir, "file"),
        maxBytes: FILE,
        blockBytes: BLOCK,
        identity: {},
      }),
    ).toThrow(expect.objectContaining({ code: "EM_PREFIX_DISK" }));
  });

  it("shared by gateways: one finds and reads the files another wrote; alone, a store does not", async () => {
    const dir = tempDir();
    const a = open(dir, 8, { shared: true });
    const b = open(dir, 8, { shared: true });
    const local = open(dir, 8);
    // Their first scans run in the background (a call joins the one running).
    await Promise.all([a.rescan(), b.rescan()]);
    const [h1, h2] = await saved(a, 2);
    expect(b.stats.files).toBe(0);
    expect(b.has(h1!)).toBe(true); // looked for on the disk, and known from then on
    expect(loaded(b, h1!)).toEqual(joined(rows(1)));
    expect(b.stats).toMatchObject({ files: 1, hits: 1, sharedHits: 1, errors: 0 });
    expect(local.has(h1!)).toBe(false); // not shared: its index is all it knows
    // A file read ahead, too.
    const done = staged(b, 1);
    expect(b.has(h2!)).toBe(true);
    b.prefetch([h2!]);
    await done;
    expect(loaded(b, h2!)).toEqual(joined(rows(2)));
    expect([b.stats.readAhead, b.stats.sharedHits]).toEqual([1, 2]);
    // What a wrote itself is not found there.
    expect(loaded(a, h1!)).toEqual(joined(rows(1)));
    expect(a.stats).toMatchObject({ hits: 1, sharedHits: 0 });
    // Not there: no, and not looked for again at once.
    const h3 = hashOf("3");
    expect(b.has(h3)).toBe(false);
    a.save(h3, rows(3));
    await a.flush();
    expect(b.has(h3)).toBe(false);
    // The scan every minute finds it, and then forgets the files the others removed.
    await b.rescan();
    expect([b.has(h3), b.stats.files]).toEqual([true, 3]);
    rmSync(join(dir, fingerprintOf({ model: "tiny" }), fileOf(h1!)));
    await b.rescan();
    expect([b.stats.files, b.stats.errors]).toEqual([2, 0]);
    // Each scan reports what changed since the last: a file written since, and none twice.
    const h4 = hashOf("4");
    a.save(h4, rows(4));
    await a.flush();
    await b.rescan();
    expect(b.stats.files).toBe(3);
    await b.rescan();
    expect(b.stats.files).toBe(3);
    expect(loaded(b, h3)).toEqual(joined(rows(3)));
    for (const s of [a, b, local]) await s.close();
  });

  it("shared: a file another gateway removed is a plain miss, not an error", async () => {
    const dir = tempDir();
    const a = open(dir, 8, { shared: true });
    await a.rescan();
    const [h1, h2] = await saved(a, 2);
    for (const h of [h1, h2]) rmSync(join(a.dir, fileOf(h!)));
    expect(loaded(a, h1!)).toBeNull();
    const done = staged(a, 1);
    a.prefetch([h2!]);
    await done;
    expect([a.has(h1!), a.has(h2!)]).toEqual([false, false]);
    expect(a.stats).toMatchObject({ files: 0, errors: 0 });
    // Alone, a file gone from under it is an error (something else touched its folder).
    const b = open(tempDir(), 8);
    const [g] = await saved(b, 1);
    rmSync(join(b.dir, fileOf(g!)));
    expect(loaded(b, g!)).toBeNull();
    expect(b.stats.errors).toBe(1);
    await a.close();
  });

  it("shared: scanned in the background; a young temporary file is another pod's write, whatever its pid", async () => {
    const dir = tempDir();
    const writer = open(dir, 4);
    const [h1] = await saved(writer, 1);
    await writer.close();
    const fp = join(dir, fingerprintOf({ model: "tiny" }));
    // Our own pid: in a folder of its own, a leftover of this process's earlier life.
    const tmp = join(fp, `${fileOf(hashOf("x"))}.tmp-${process.pid}-0`);
    writeFileSync(tmp, "partial");
    // A write that died long ago, and a block file of another size (damaged).
    const stale = join(fp, `${fileOf(hashOf("y"))}.tmp-1-0`);
    writeFileSync(stale, "partial");
    const old = new Date(Date.now() - 3_600_000);
    utimesSync(stale, old, old);
    const short = join(fp, fileOf(hashOf("z")));
    writeFileSync(short, "short");
    const s = open(dir, 4, { shared: true });
    expect(s.stats.files).toBe(0); // not scanned at open: a network volume's listing waits
    await s.rescan();
    expect([s.stats.files, s.has(h1!)]).toEqual([1, true]);
    expect([existsSync(tmp), existsSync(stale), existsSync(short)]).toEqual([true, false, false]);
    await s.close();
    await open(dir, 4).close();
    expect(existsSync(tmp)).toBe(false);
  });

  it("writes on its reader thread (CRC there); a close with writes under way ends them", async () => {
    const dir = tempDir();
    const s = open(dir, 8);
    const hs = await saved(s, 3);
    await s.close();
    // Read back where the step checks every byte: the reader thread's CRCs are right.
    const again = DiskPrefixStore.open({
      dir,
      maxBytes: 8 * FILE,
      blockBytes: BLOCK,
      identity: { model: "tiny" },
      readAhead: false,
    });
    for (const [i, h] of hs.entries()) expect(loaded(again, h)).toEqual(joined(rows(i + 1)));
    expect(again.stats).toMatchObject({ hits: 3, errors: 0 });
    // Without a reader thread (read ahead off), it writes on its own thread.
    again.save(hashOf("4"), rows(4));
    await again.flush();
    expect(again.stats.written).toBe(1);
    await again.close();
    // Closed mid-write: the writes end (failed or done), nothing waits forever.
    const t = open(tempDir(), 400);
    for (let i = 0; i < 400; i++) t.save(hashOf(`w${i}`), rows(i + 1));
    await new Promise((r) => setImmediate(r)); // handed to the thread
    await t.close();
    await t.flush();
    expect(t.stats.written + t.stats.errors).toBe(400);
    expect(t.stats.errors).toBeGreaterThan(0); // some were still running
  });

  it("shared: blocks computed past the pending limit are written as earlier writes end", async () => {
    const config = { numHiddenLayers: 2, kvLoraRank: 4, qkRopeHeadDim: 2 } as ModelConfig;
    const blockSize = 2;
    const block = bytesPerBlock(config, blockSize);
    const disk = DiskPrefixStore.open({
      dir: tempDir(),
      maxBytes: 64 * (DISK_HEADER_BYTES + block),
      blockBytes: block,
      identity: { model: "write-through" },
      shared: true,
      maxPendingBytes: DISK_HEADER_BYTES + block, // one write at a time
    });
    await disk.rescan();
    const kv = new BlockKvCache(config, { memoryBytes: 16 * block, blockSize, stores: [disk] });
    const a = kv.allocator;
    a.reserve(1, 16); // 8 blocks, computed in one step
    for (let i = 0; i < 8; i++) a.register(1, i, hashOf(`p${i}`));
    expect(disk.stats.written).toBe(0);
    for (let i = 0; i < 50 && disk.stats.written < 8; i++)
      await new Promise((r) => setTimeout(r, 20));
    expect(disk.stats).toMatchObject({ written: 8, dropped: 0, errors: 0 });
    // A block the pool takes before its turn: handed to the tier on its way out, dropped
    // there for want of room (counted), and not retried (its rows are gone).
    a.reserve(2, 4);
    a.register(2, 0, hashOf("q0")); // written at once
    a.register(2, 1, hashOf("q1")); // waits for q0's write
    a.free(2);
    a.free(1);
    a.reserve(3, 32); // takes every block, q1's while q0's write runs
    await disk.flush();
    await new Promise((r) => setTimeout(r, 20));
    expect(disk.stats).toMatchObject({ written: 9, dropped: 1, errors: 0 });
    expect(disk.has(hashOf("q1"))).toBe(false);
    await disk.close();
  });

  it("refuses a block of the wrong size (a bug, not a user's error)", () => {
    const s = open(tempDir(), 4);
    expect(() => s.save(hashOf("w"), rows(1, 2, 23))).toThrow(
      expect.objectContaining({ code: "EM_GATEWAY_INTERNAL" }),
    );
  });
});

/** A second tier in a Map: what the allocator asks of one, and when. */
class MapTier implements PrefixTier {
  readonly kept = new Map<string, number>();
  readonly log: string[] = [];
  /** Hashes whose read fails, and whose write into a block fails. */
  readonly unreadable = new Set<string>();
  readonly unwritable = new Set<string>();
  evicting(block: number, hash: string): void {
    this.log.push(`evict ${hash}@${block}`);
    this.kept.set(hash, block);
  }
  has(hash: string): boolean {
    return this.kept.has(hash);
  }
  fetch(hash: string): ((block: number) => boolean) | null {
    if (this.unreadable.has(hash)) return null;
    return (block) => {
      this.log.push(`load ${hash}@${block}`);
      return !this.unwritable.has(hash);
    };
  }
}

/** A tier whose reads ahead run until finish() (the disk's, without the disk). */
class ReadAheadTier extends MapTier {
  readonly inFlight = new Set<string>();
  readonly read = new Set<string>();
  /** What each prefetch started. */
  readonly asked: string[][] = [];
  prefetch(hashes: readonly string[]): void {
    const start = hashes.filter((h) => !this.inFlight.has(h) && !this.read.has(h));
    if (start.length > 0) this.asked.push(start);
    for (const h of start) this.inFlight.add(h);
  }
  loading(hash: string): boolean {
    return this.inFlight.has(hash);
  }
  finish(): void {
    for (const h of this.inFlight) this.read.add(h);
    this.inFlight.clear();
  }
}

describe("BlockAllocator with a second tier", () => {
  /** 4 blocks of 2; sequence 1 computes and registers h0..h3, then ends (all cached). */
  function filled() {
    const a = new BlockAllocator(4, 2);
    const tier = new MapTier();
    a.tier = tier;
    a.reserve(1, 8);
    for (const [i, h] of ["h0", "h1", "h2", "h3"].entries()) a.register(1, i, h);
    a.free(1);
    return { a, tier };
  }

  it("hands a registered block to the tier when its block is taken", () => {
    const { a, tier } = filled();
    // free() cached the last block first: h3 and h2 are the least recently freed.
    expect(a.reserve(2, 4)).toBe(true);
    expect(tier.log).toEqual(["evict h3@3", "evict h2@2"]);
    expect(a.blockOf("h3")).toBeUndefined();
    expect(a.blockOf("h0")).toBe(0);
  });

  it("continues a prefix with the tier's blocks, keeping one block free", () => {
    const { a, tier } = filled();
    a.reserve(2, 6); // takes h3, h2, h1's blocks: only h0 stays in the pool
    a.free(2);
    tier.log.length = 0;
    // h0 from the pool, then h1, h2 from the tier while two blocks can be had: h3 would
    // leave none for the positions to compute.
    expect(a.attachPrefix(3, ["h0", "h1", "h2", "h3"])).toBe(3);
    expect(a.lastLoaded).toBe(2);
    expect(tier.log.filter((l) => l.startsWith("load"))).toHaveLength(2);
    expect(a.numFreeBlocks).toBe(1);
    // The loaded blocks are registered as if computed: another sequence shares them.
    expect(a.attachPrefix(4, ["h0", "h1", "h2"])).toBe(3);
    expect(a.table(4)).toEqual(a.table(3));
  });

  it("keeps free the blocks it is told to", () => {
    const { a } = filled();
    a.reserve(2, 8);
    a.free(2); // everything in the tier, 4 blocks free
    expect(a.attachPrefix(3, ["h0", "h1", "h2", "h3"], () => 2)).toBe(2);
    expect([a.lastLoaded, a.numFreeBlocks]).toEqual([2, 2]);
  });

  it("stops at a block the tier cannot read, taking no block of the pool for it", () => {
    const { a, tier } = filled();
    a.reserve(2, 4); // h3, h2 to the tier; h1, h0 stay cached
    a.free(2);
    tier.unreadable.add("h2");
    tier.log.length = 0;
    expect(a.attachPrefix(3, ["h0", "h1", "h2", "h3"])).toBe(2);
    expect(tier.log).toEqual([]); // nothing evicted for it, nothing written
    expect(a.numFreeBlocks).toBe(2);
  });

  it("stops at a block it cannot write, the block going back free", () => {
    const { a, tier } = filled();
    a.reserve(2, 8);
    a.free(2); // everything evicted to the tier
    tier.unwritable.add("h1");
    const free = a.numFreeBlocks;
    expect(a.attachPrefix(3, ["h0", "h1", "h2"])).toBe(1);
    expect(a.lastLoaded).toBe(1);
    expect(a.numFreeBlocks).toBe(free - 1);
    expect(a.blockOf("h1")).toBeUndefined();
  });

  it("lists registered blocks least recently used first, held ones last", () => {
    const { a } = filled(); // freed h3, h2, h1, h0 in that order
    a.attachPrefix(2, ["h0"]);
    expect(a.registered().map(([, h]) => h)).toEqual(["h3", "h2", "h1", "h0"]);
    a.reserve(3, 2); // takes h3's block
    expect(a.registered().map(([, h]) => h)).toEqual(["h2", "h1", "h0"]);
  });

  it("tells the tier of each block computed, not of those read back", () => {
    const a = new BlockAllocator(4, 2);
    const computed: string[] = [];
    const tier = new MapTier();
    a.tier = Object.assign(tier, {
      computed: (b: number, h: string) => computed.push(`${h}@${b}`),
    });
    a.reserve(1, 4);
    a.register(1, 0, "h0");
    a.register(1, 1, "h1");
    a.register(1, 1, "h1"); // again: known already
    expect(computed).toEqual(["h0@0", "h1@1"]);
    a.free(1);
    a.reserve(2, 8); // both evicted to the tier
    a.free(2);
    a.attachPrefix(3, ["h0", "h1"]);
    expect(a.lastLoaded).toBe(2);
    expect(computed).toHaveLength(2);
  });

  it("without a tier, a forgotten prefix is gone", () => {
    const a = new BlockAllocator(2, 2);
    a.reserve(1, 4);
    a.register(1, 0, "h0");
    a.free(1);
    a.reserve(2, 4);
    a.free(2);
    expect(a.attachPrefix(3, ["h0"])).toBe(0);
    expect(a.lastLoaded).toBe(0);
  });
});

describe("Scheduler over a second tier", () => {
  /** A sequence of `tokens` tokens counting up from `from` (others share no block with it). */
  const seqOf = (id: number, tokens: number, from = 1) =>
    new Sequence(
      id,
      Array.from({ length: tokens }, (_, i) => (i % 50) + from),
      tokens + 8,
    );
  /** A scheduler (prefix caching on) over `blocks` blocks of 4 with a MapTier under them. */
  function tiered(blocks: number, maxBatchTokens: number, maxRunning = 8, tier = new MapTier()) {
    const a = new BlockAllocator(blocks, 4);
    a.tier = tier;
    const s = new Scheduler(
      { maxBatchTokens, maxQueueDepth: 8, maxRunning, prefixCaching: true },
      a,
    );
    /** Puts the first `n` blocks of `seq` in the tier. */
    const keep = (seq: Sequence, n: number) => {
      for (const h of seq.blockHashes(n, 4)) tier.kept.set(h, -1);
    };
    return { a, s, keep, tier };
  }

  it("admits a prompt whose prefix is in the tier at once, next to a running one, and counts what it read", () => {
    // 20 blocks of 4; a running sequence holds 8 of them; a 61-token prompt's first 15
    // blocks are in the tier. Reading them all would leave no block for its first chunk.
    const { a, s, keep } = tiered(20, 16);
    const prompt = seqOf(2, 61);
    keep(prompt, 15);
    const running = seqOf(1, 30, 100);
    expect(s.add(running)).toBe("ok");
    for (let i = 0; i < 2; i++) s.commit(s.schedule().chunks); // its prompt, 16 + 14
    expect(s.add(prompt)).toBe("ok");
    const { chunks } = s.schedule();
    const mine = chunks.find((c) => c.seq === prompt);
    expect(mine).toBeDefined();
    // The running one holds 8 blocks (it waits for a sampled token here); the prompt's chunk
    // has 16 tokens of budget, 4 blocks: read while 4 stay free besides, 20 - 8 - 4 = 8.
    expect(mine!.start).toBe(8 * 4);
    expect(mine!.numTokens).toBe(16);
    expect(a.lastLoaded).toBe(8);
    expect([s.prefixHitTokens, s.prefixTierHitTokens]).toEqual([32, 32]);
    expect(a.numFreeBlocks).toBe(0);
  });

  it("reads a whole prefix when the rest of the prompt needs only its last block", () => {
    const { a, s, keep } = tiered(20, 16);
    const prompt = seqOf(2, 61);
    keep(prompt, 15);
    expect(s.add(prompt)).toBe("ok");
    const [c] = s.schedule().chunks;
    expect([c!.start, c!.numTokens, a.lastLoaded]).toEqual([60, 1, 15]);
  });

  it("reads a long prefix over several steps, at most maxTierReads blocks each, then admits it", () => {
    const { a, s, keep } = tiered(20, 64);
    a.maxTierReads = 3;
    const prompt = seqOf(2, 33); // 8 whole blocks before its last token, all in the tier
    keep(prompt, 8);
    expect(s.add(prompt)).toBe("ok");
    const steps: string[] = [];
    for (let i = 0; i < 3; i++) {
      const { chunks } = s.schedule();
      steps.push(`${a.lastLoaded} read, ${chunks.map((c) => `${c.start}+${c.numTokens}`)}`);
      s.commit(chunks);
    }
    // 3 read (first in line, it waits), then 3 from the pool and 3 read, then 6 and the last 2.
    expect(steps).toEqual(["3 read, ", "3 read, ", "2 read, 32+1"]);
    expect([s.prefixHitTokens, s.prefixTierHitTokens]).toEqual([32, 32]);
  });

  it("lets a prompt wait for its prefix's reads ahead while the running one steps on", () => {
    const tier = new ReadAheadTier();
    const { a, s, keep } = tiered(40, 16, 8, tier);
    a.maxTierReads = 6;
    const running = seqOf(1, 8, 100);
    expect(s.add(running)).toBe("ok");
    s.commit(s.schedule().chunks); // its prompt; from now on it decodes a token a step
    const prompt = seqOf(2, 41); // 10 whole blocks before its last token
    keep(prompt, 8);
    const hashes = prompt.blockHashes(10, 4);
    expect(s.add(prompt)).toBe("ok");
    /** One step with the running sequence's next token: the ids of the chunks. */
    const step = () => {
      running.outputTokens.push(7);
      const { chunks } = s.schedule();
      s.commit(chunks);
      return chunks.map((c) => `${c.seq.id}@${c.start}`);
    };
    // Its first 8 blocks are in the tier: read ahead, maxTierReads of them; it waits.
    expect(step()).toEqual(["1@8"]);
    expect(tier.asked).toEqual([hashes.slice(0, 6)]);
    expect([prompt.status, a.lastLoaded]).toEqual(["waiting", 0]);
    expect(step()).toEqual(["1@9"]); // still reading
    tier.finish();
    // The 6 read are taken into the pool (the cap); the other 2 are read ahead next.
    expect(step()).toEqual(["1@10"]);
    expect(a.lastLoaded).toBe(6);
    expect(tier.asked.at(-1)).toEqual(hashes.slice(6, 8));
    tier.finish();
    expect(step()).toEqual(["1@11", "2@32"]);
    expect([s.prefixHitTokens, s.prefixTierHitTokens]).toEqual([32, 32]);
  });

  it("reads a prompt's prefix in the step when nothing runs (no one to keep waiting)", () => {
    const tier = new ReadAheadTier();
    const { a, s, keep } = tiered(20, 64, 8, tier);
    const prompt = seqOf(2, 33);
    keep(prompt, 8);
    expect(s.add(prompt)).toBe("ok");
    const [c] = s.schedule().chunks;
    expect([c?.seq.id, c?.start, a.lastLoaded]).toEqual([2, 32, 8]);
    expect(tier.asked).toEqual([]);
  });

  it("with the priority policy, a head still reading its prefix preempts no one yet", () => {
    const tier = new ReadAheadTier();
    const a = new BlockAllocator(40, 4);
    a.tier = tier;
    const s = new Scheduler(
      {
        maxBatchTokens: 64,
        maxQueueDepth: 8,
        maxRunning: 2,
        prefixCaching: true,
        policy: "priority",
      },
      a,
    );
    const high = seqOf(1, 8, 100);
    const low = seqOf(2, 8, 200);
    low.priority = 5;
    for (const q of [high, low]) expect(s.add(q)).toBe("ok");
    s.commit(s.schedule().chunks);
    const urgent = seqOf(3, 33);
    urgent.priority = 1;
    for (const h of urgent.blockHashes(8, 4)) tier.kept.set(h, -1);
    expect(s.add(urgent)).toBe("ok");
    const step = () => {
      for (const q of [high, low]) q.outputTokens.push(7);
      const { chunks, preempted } = s.schedule();
      s.commit(chunks);
      return { ids: chunks.map((c) => c.seq.id), preempted: preempted.map((q) => q.id) };
    };
    // Its reads run: both keep running, no slot stands empty for the read.
    expect(step()).toEqual({ ids: [1, 2], preempted: [] });
    expect(low.numPreemptions).toBe(0);
    tier.finish();
    // Read: now the low one makes room, and the urgent one comes in with its prefix.
    expect(step()).toEqual({ ids: [1, 3], preempted: [2] });
    expect(a.lastLoaded).toBe(8);
  });

  it("counts nothing read for a prompt it could not admit", () => {
    const { s, keep } = tiered(8, 64, 1);
    expect(s.add(seqOf(1, 8))).toBe("ok");
    s.commit(s.schedule().chunks);
    const prompt = seqOf(2, 9);
    keep(prompt, 2);
    expect(s.add(prompt)).toBe("ok");
    s.schedule(); // maxRunning 1: not admitted, nothing looked up
    expect([s.prefixHitTokens, s.prefixTierHitTokens]).toEqual([0, 0]);
  });
});
