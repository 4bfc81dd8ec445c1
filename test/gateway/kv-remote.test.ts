// The prefix cache's NATS tier (kv-remote.ts, ADR 0028) against the real nats-server with
// JetStream: what one gateway's store writes another's reads back (found by its watch),
// checked; other fingerprints' keys are not seen; damaged values and values the bucket
// dropped for room are misses, not errors of the caller; a full bucket drops its oldest
// values instead of refusing writes; a block over max_payload is written in parts and read
// whole; a server without JetStream is refused at open with EM_PREFIX_REMOTE; a restart of the server loses nothing
// kept in file storage, and the stores go on; on a cluster, a bucket of 3 copies outlives a
// server.
import { createHash } from "node:crypto";
import { mkdtempSync } from "node:fs";
import { join } from "node:path";
import { jetstreamManager } from "@nats-io/jetstream";
import { Kvm } from "@nats-io/kv";
import { connect, type NatsConnection } from "@nats-io/transport-node";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { RemotePrefixStore } from "../../src/engine/kv-remote.ts";
import { startNats, startNatsCluster } from "../env/nats.ts";
import { startNatsWithoutJetStream, testEnv, uniqueName, waitFor } from "../support/env.ts";

const BLOCK = 4096;
const identity = { model: "test", layers: 2 };
const hashOf = (i: number) => createHash("sha256").update(`block ${i}`).digest("base64");
/** Block i's rows, in two layers' parts. */
const rows = (i: number): Uint8Array[] => {
  const a = new Uint8Array(BLOCK);
  for (let k = 0; k < BLOCK; k++) a[k] = (i * 31 + k * 7) & 255;
  return [a.subarray(0, BLOCK / 2), a.subarray(BLOCK / 2)];
};
const joined = (i: number) => Buffer.concat(rows(i));

let nc: NatsConnection;
let other: NatsConnection;
const opened: RemotePrefixStore[] = [];
const open = async (
  o: Partial<Parameters<typeof RemotePrefixStore.open>[0]> & { bucket: string },
) => {
  const s = await RemotePrefixStore.open({
    nc,
    maxBytes: 1 << 20,
    blockBytes: BLOCK,
    identity,
    storage: "memory",
    ...o,
  });
  opened.push(s);
  return s;
};
/** Reads `hash` ahead and waits for the read to end; resolves read()'s answer. */
const readBack = async (s: RemotePrefixStore, hash: string) => {
  s.prefetch([hash]);
  await waitFor("the read ahead", async () => (s.loading(hash) ? undefined : true));
  const got = s.read(hash);
  return got === null ? null : Buffer.from(got);
};

beforeAll(async () => {
  nc = await connect({ servers: testEnv().nats.url, name: "kv-remote-a" });
  other = await connect({ servers: testEnv().nats.url, name: "kv-remote-b" });
});
afterAll(async () => {
  for (const s of opened) await s.close();
  await nc?.close();
  await other?.close();
});

describe("RemotePrefixStore", () => {
  it("a block one store writes, another store of the same fingerprint reads back", async () => {
    const bucket = uniqueName("prefix");
    const a = await open({ bucket });
    const b = await open({ bucket, nc: other });
    expect(a.has(hashOf(1))).toBe(false);
    expect(a.save(hashOf(1), rows(1))).toBe(true);
    // Its own write is read from the pending copy until the server has it.
    expect(a.has(hashOf(1))).toBe(true);
    await a.flush();
    expect(a.stats.written).toBe(1);
    // b learns of the key from its watch, with no read of the rows.
    await waitFor("b sees the key", async () => (b.has(hashOf(1)) ? true : undefined));
    expect(b.stats.files).toBe(1);
    expect(await readBack(b, hashOf(1))).toEqual(joined(1));
    expect(b.stats).toMatchObject({ hits: 1, readAhead: 1, sharedHits: 1, errors: 0 });
    // Saving what the bucket has writes nothing.
    expect(b.save(hashOf(1), rows(1))).toBe(true);
    await b.flush();
    expect(b.stats.written).toBe(0);
    // Not read ahead: a miss, not a wait on the network in the caller's step.
    expect(b.read(hashOf(1))).toBeNull();
    // A third store opened later finds the key in its listing at open.
    const c = await open({ bucket });
    expect(c.has(hashOf(1))).toBe(true);
    expect(await readBack(c, hashOf(1))).toEqual(joined(1));
  });

  it("keys of another fingerprint are not seen", async () => {
    const bucket = uniqueName("prefix");
    const a = await open({ bucket });
    const b = await open({ bucket, nc: other, identity: { ...identity, model: "other" } });
    expect(a.fingerprint).not.toBe(b.fingerprint);
    a.save(hashOf(2), rows(2));
    await a.flush();
    const c = await open({ bucket });
    expect(c.has(hashOf(2))).toBe(true);
    expect(b.has(hashOf(2))).toBe(false);
    b.prefetch([hashOf(2)]);
    expect(b.loading(hashOf(2))).toBe(false);
  });

  it("a damaged value is a miss, counted and removed; one the bucket dropped is a plain miss", async () => {
    const bucket = uniqueName("prefix");
    const a = await open({ bucket });
    const b = await open({ bucket, nc: other });
    a.save(hashOf(3), rows(3));
    a.save(hashOf(4), rows(4));
    await a.flush();
    await waitFor("b sees both", async () =>
      b.has(hashOf(3)) && b.has(hashOf(4)) ? true : undefined,
    );
    // Another client overwrites block 3's value with another block's bytes, and purges 4.
    const kv = await new Kvm(nc).open(bucket);
    const keyOf = (h: string, parts = 1, part = 0) =>
      `${a.fingerprint}.${Buffer.from(h, "base64").toString("base64url")}.${parts}.${part}`;
    const key3 = keyOf(hashOf(3));
    const value = (await kv.get(key3))!.value;
    const bad = Buffer.from(value);
    bad[bad.length - 1]! ^= 1;
    await kv.put(key3, bad);
    expect(await readBack(b, hashOf(3))).toBeNull();
    expect(b.stats.errors).toBe(1);
    expect(b.has(hashOf(3))).toBe(false);
    await waitFor("the damaged value removed", async () =>
      (await kv.get(key3))?.operation === "PURGE" || (await kv.get(key3)) === null
        ? true
        : undefined,
    );
    // A key gone without the watch's word (as a full bucket drops it) reads as a miss.
    const key4 = keyOf(hashOf(4));
    const jsm = await (await import("@nats-io/jetstream")).jetstreamManager(nc);
    const seq = (await kv.get(key4))!.revision;
    await jsm.streams.deleteMessage(`KV_${bucket}`, seq);
    expect(b.has(hashOf(4))).toBe(true);
    expect(await readBack(b, hashOf(4))).toBeNull();
    expect(b.has(hashOf(4))).toBe(false);
    expect(b.stats.errors).toBe(1);
  });

  it("a full bucket drops its oldest blocks and keeps taking new ones", async () => {
    const bucket = uniqueName("prefix");
    // Room for about 8 blocks (each a 48-byte header, the rows, and the message's overhead).
    const a = await open({ bucket, maxBytes: 8 * (BLOCK + 200) });
    for (let i = 0; i < 20; i++) {
      expect(a.save(hashOf(100 + i), rows(100 + i))).toBe(true);
      await a.flush();
    }
    expect(a.stats).toMatchObject({ written: 20, errors: 0 });
    // The writer's index keeps no more than the bucket holds (no event tells it of drops).
    expect(a.stats.files).toBeLessThanOrEqual(8);
    expect(a.has(hashOf(100))).toBe(false);
    expect(a.has(hashOf(119))).toBe(true);
    const b = await open({ bucket, nc: other });
    // The newest are there, the oldest went.
    expect(b.has(hashOf(119))).toBe(true);
    expect(b.has(hashOf(100))).toBe(false);
    expect(b.stats.files).toBeLessThanOrEqual(8);
    expect(await readBack(b, hashOf(119))).toEqual(joined(119));
  });

  it("a block read back from the older half of a full bucket is written again, so it stays", async () => {
    const bucket = uniqueName("prefix");
    // Room for 8 blocks (the message's overhead is under 200 bytes).
    const a = await open({ bucket, maxBytes: 8 * (BLOCK + 200) });
    const b = await open({ bucket, nc: other, maxBytes: 8 * (BLOCK + 200) });
    for (let i = 0; i < 6; i++) {
      a.save(hashOf(200 + i), rows(200 + i));
      await a.flush();
    }
    await waitFor("b sees them", async () => (b.has(hashOf(205)) ? true : undefined));
    // Block 200 is 5 writes behind the newest of a bucket of 8: read, and written again.
    expect(await readBack(b, hashOf(200))).toEqual(joined(200));
    await b.flush();
    expect(b.stats.written).toBe(1);
    // A block from the young half is only read.
    expect(await readBack(b, hashOf(204))).toEqual(joined(204));
    await b.flush();
    expect(b.stats.written).toBe(1);
    for (let i = 6; i < 12; i++) {
      a.save(hashOf(200 + i), rows(200 + i));
      await a.flush();
    }
    const c = await open({ bucket });
    expect(c.has(hashOf(200))).toBe(true);
    expect(c.has(hashOf(201))).toBe(false);
    expect(await readBack(c, hashOf(200))).toEqual(joined(200));
  });

  it("says so when the bucket was made elsewhere to refuse writes once full (a plain KV bucket)", async () => {
    const bucket = uniqueName("prefix");
    await new Kvm(nc).create(bucket, { max_bytes: 1 << 20 });
    const logs: string[] = [];
    await open({ bucket, log: (m) => logs.push(m) });
    expect(logs.join("\n")).toMatch(/refuses writes once full \(discard new/);
  });

  it("refuses a bucket name NATS cannot take, and a budget under one block", async () => {
    await expect(open({ bucket: "no.dots" })).rejects.toMatchObject({ code: "EM_CLI_USAGE" });
    await expect(open({ bucket: uniqueName("prefix"), maxBytes: 100 })).rejects.toMatchObject({
      code: "EM_CLI_USAGE",
    });
  });

  it("refuses at open more copies than one server holds, saying a cluster is needed", async () => {
    await expect(open({ bucket: uniqueName("prefix"), replicas: 3 })).rejects.toThrow(
      /cannot make the bucket in 3 copies: that needs a NATS cluster of at least 3 servers/,
    );
  });

  it("refuses at open a budget the server's JetStream cannot store, saying so", async () => {
    await expect(
      RemotePrefixStore.open({
        nc,
        bucket: uniqueName("prefix"),
        maxBytes: 2 ** 60,
        blockBytes: BLOCK,
        identity,
      }),
    ).rejects.toMatchObject({
      code: "EM_PREFIX_REMOTE",
      message: expect.stringMatching(/cannot make or open the bucket .*JetStream may store/),
    });
  });

  it("writes a block over the server's max_payload in parts, read back whole; a part gone is a miss", async () => {
    const bucket = uniqueName("prefix");
    const big = 9 * 2 ** 20; // two values under max_payload 8 MiB
    const a = await open({ bucket, blockBytes: big, maxBytes: 2 ** 26 });
    const b = await open({ bucket, nc: other, blockBytes: big, maxBytes: 2 ** 26 });
    const bigRows = (i: number) => {
      const r = Buffer.alloc(big);
      for (let k = 0; k < big; k += 4093) r[k] = (i + k) & 255;
      return r;
    };
    for (const i of [1, 2]) a.save(hashOf(i), [bigRows(i)]);
    await a.flush();
    expect(a.stats).toMatchObject({ written: 2, errors: 0 });
    const kv = await new Kvm(nc).open(bucket);
    const keys: string[] = [];
    for await (const k of await kv.keys()) keys.push(k);
    expect(keys.filter((k) => k.endsWith(".2.0") || k.endsWith(".2.1"))).toHaveLength(4);
    await waitFor("b sees both whole", async () =>
      b.has(hashOf(1)) && b.has(hashOf(2)) ? true : undefined,
    );
    // (equals: toEqual walks 9 MiB element by element.)
    expect((await readBack(b, hashOf(1)))?.equals(bigRows(1))).toBe(true);
    // Block 2's second part dropped without a word: the block is a miss, not half of one.
    const part = keys.find(
      (k) =>
        k.includes(Buffer.from(hashOf(2), "base64").toString("base64url")) && k.endsWith(".2.1"),
    )!;
    const jsm = await (await import("@nats-io/jetstream")).jetstreamManager(nc);
    await jsm.streams.deleteMessage(`KV_${bucket}`, (await kv.get(part))!.revision);
    expect(await readBack(b, hashOf(2))).toBeNull();
    expect(b.has(hashOf(2))).toBe(false);
    expect(b.stats.errors).toBe(0);
  });

  it("refuses at open a block over 64 values of the server's max_payload, naming it", async () => {
    await expect(
      open({ bucket: uniqueName("prefix"), blockBytes: 2 ** 29, maxBytes: 2 ** 30 }),
    ).rejects.toMatchObject({
      code: "EM_PREFIX_REMOTE",
      message: expect.stringContaining("max_payload 8388608"),
    });
  });
});

describe("RemotePrefixStore on a server without JetStream", () => {
  it("is refused at open with EM_PREFIX_REMOTE, saying how to turn JetStream on", async () => {
    const server = await startNatsWithoutJetStream("nats-nojs");
    const plain = await connect({ servers: server.info.url, name: "kv-remote-nojs" });
    try {
      expect(plain.info?.jetstream ?? false).toBe(false);
      await expect(
        RemotePrefixStore.open({
          nc: plain,
          bucket: "prefix",
          maxBytes: 1 << 20,
          blockBytes: BLOCK,
          identity,
        }),
      ).rejects.toMatchObject({
        code: "EM_PREFIX_REMOTE",
        message: expect.stringContaining("no JetStream"),
      });
    } finally {
      await plain.close();
      await server.process.stop();
    }
  });
});

describe("RemotePrefixStore across a NATS server restart", () => {
  it("goes on: writes and reads fail as misses meanwhile, and the watch sees new keys after", async () => {
    const dir = mkdtempSync(join(testEnv().runDir, "nats-restart-prefix-"));
    const logs = join(testEnv().runDir, "logs");
    let server = await startNats(testEnv().binaries.natsServer, dir, logs, {
      name: "nats-prefix",
    });
    const port = server.info.port;
    const opts = { servers: server.info.url, reconnectTimeWait: 200, maxReconnectAttempts: -1 };
    const ncA = await connect({ ...opts, name: "restart-a" });
    const ncB = await connect({ ...opts, name: "restart-b" });
    const common = { bucket: "restart", maxBytes: 1 << 20, blockBytes: BLOCK, identity };
    const a = await RemotePrefixStore.open({ ...common, nc: ncA });
    const b = await RemotePrefixStore.open({ ...common, nc: ncB });
    try {
      a.save(hashOf(7), rows(7));
      await a.flush();
      await waitFor("b sees block 7", async () => (b.has(hashOf(7)) ? true : undefined));
      await server.process.stop();
      // Meanwhile: a write fails (counted), a read ahead is a miss; nothing throws.
      expect(a.save(hashOf(9), rows(9))).toBe(true);
      await a.flush();
      expect(a.stats.errors).toBe(1);
      expect(a.has(hashOf(9))).toBe(false);
      expect(await readBack(b, hashOf(7))).toBeNull();
      expect(b.stats.errors).toBe(1);
      server = await startNats(testEnv().binaries.natsServer, dir, logs, {
        port,
        name: "nats-prefix",
      });
      // Block 7 is still there (file storage), and a block written after the restart
      // reaches b through its watch.
      await waitFor("a written again", async () => {
        a.save(hashOf(8), rows(8));
        await a.flush();
        return a.stats.written >= 2 ? true : undefined;
      });
      await waitFor("b sees block 8", async () => (b.has(hashOf(8)) ? true : undefined), 30_000);
      expect(await readBack(b, hashOf(8))).toEqual(joined(8));
      // The read that failed did not forget block 7: it is read back now.
      expect(await readBack(b, hashOf(7))).toEqual(joined(7));
    } finally {
      await a.close();
      await b.close();
      await ncA.close();
      await ncB.close();
      await server.process.stop();
    }
  });
});

describe("RemotePrefixStore on a NATS cluster", () => {
  it("with 3 copies, a block written through one server is read through another after the first is gone", async () => {
    const dir = mkdtempSync(join(testEnv().runDir, "nats-cluster-prefix-"));
    const servers = await startNatsCluster(
      testEnv().binaries.natsServer,
      dir,
      join(testEnv().runDir, "logs"),
      3,
      "nats-prefix-cluster",
    );
    const ncs: NatsConnection[] = [];
    const stores: RemotePrefixStore[] = [];
    try {
      const connectTo = async (i: number) => {
        const c = await connect({ servers: servers[i]!.info.url, name: `cluster-${i}` });
        ncs.push(c);
        return c;
      };
      const said: string[] = [];
      const common = { bucket: "replicated", maxBytes: 1 << 20, blockBytes: BLOCK, identity };
      const a = await RemotePrefixStore.open({ ...common, replicas: 3, nc: await connectTo(0) });
      stores.push(a);
      const info = await (await jetstreamManager(ncs[0]!)).streams.info("KV_replicated");
      expect(info.config.num_replicas).toBe(3);
      a.save(hashOf(3), rows(3));
      await a.flush();
      expect(a.stats.written).toBe(1);
      // A store that asks for 1 copy opens the bucket made with 3, and says so.
      const b = await RemotePrefixStore.open({
        ...common,
        nc: await connectTo(2),
        log: (m) => said.push(m),
      });
      stores.push(b);
      expect(said.join("\n")).toMatch(/keeps the 3 copies it was made with \(not 1\)/);
      await servers[0]!.process.stop();
      const got = await waitFor(
        "block 3 read through server 2",
        async () => (await readBack(b, hashOf(3))) ?? undefined,
        30_000,
      );
      expect(got).toEqual(joined(3));
    } finally {
      for (const s of stores) await s.close();
      for (const c of ncs) await c.close().catch(() => {});
      for (const s of servers) await s.process.stop();
    }
  });
});
