// The prefix cache through the official `openai` client: vLLM's cache_salt keeps tenants'
// cached blocks apart; the disk tier (--prefix-cache-disk, ADR 0019) gives back the blocks a
// tight KV cache forgot, as cached tokens with the same text as computing them, and a gateway
// process writes its cached blocks at SIGTERM so that the next one starts with them; the NATS
// tier (--prefix-cache-remote, ADR 0028) shares blocks between gateway processes through a
// JetStream bucket on the real nats-server.
import { mkdtempSync, readdirSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { connect } from "@nats-io/transport-node";
import type OpenAI from "openai";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { bytesPerBlock } from "../../src/engine/kv-blocks.ts";
import type { KvDtype } from "../../src/engine/kv-format.ts";
import { RemotePrefixStore } from "../../src/engine/kv-remote.ts";
import { readModelConfig } from "../../src/model/config.ts";
import { runCli } from "../support/cli.ts";
import { testEnv, uniqueName, waitFor } from "../support/env.ts";
import { startGatewayProcess } from "../support/gateway-process.ts";
import { tinyCheckpointFor } from "../support/golden.ts";
import { metric, startGateway } from "./helpers.ts";

const mainTs = fileURLToPath(new URL("../../src/cli/main.ts", import.meta.url));
let dir: string;
let disk: string;
beforeAll(async () => {
  dir = await tinyCheckpointFor("tiny-v3");
  disk = mkdtempSync(join(tmpdir(), "em-prefix-disk-"));
});
afterAll(() => rmSync(disk, { recursive: true, force: true }));

const B = 4;
/** 24 blocks of 4 tokens: two ~35-token prompts with their answers push out a third's blocks. */
const tight = (kvCacheDtype: KvDtype = "f32") => ({
  maxModelLen: 64,
  blockSize: B,
  kvCacheDtype,
  kvCacheBytes: 24 * bytesPerBlock(readModelConfig(dir), B, kvCacheDtype),
  maxBatchTokens: 64,
});
const PROMPTS = [
  "In a quiet village by the sea, an old sailor said",
  "The committee met on Tuesday to discuss the budget",
  "Once upon a time there was a small red fox who",
];
const complete = (client: OpenAI, prompt: string) =>
  client.completions.create({
    model: "tiny",
    prompt,
    max_tokens: 8,
    temperature: 0,
    ignore_eos: true,
  } as OpenAI.CompletionCreateParamsNonStreaming);
/** Whole blocks before the prompt's last token: what a full prefix hit gives. */
const wholeBlocks = (promptTokens: number) => Math.floor((promptTokens - 1) / B) * B;

describe("cache_salt (vLLM's)", () => {
  it("shares cached blocks only between requests of the same salt; the text is the same", async () => {
    const g = await startGateway(dir, { blockSize: B, maxBatchTokens: 256 });
    try {
      const ask = (salt?: string, api: "chat" | "completions" = "completions") => {
        const extra = salt === undefined ? {} : { cache_salt: salt };
        return api === "chat"
          ? g.client.chat.completions
              .create({
                model: "tiny",
                messages: [{ role: "user", content: PROMPTS[2]! }],
                max_tokens: 4,
                temperature: 0,
                ...extra,
              } as OpenAI.ChatCompletionCreateParamsNonStreaming)
              .then((r) => ({
                cached: r.usage!.prompt_tokens_details!.cached_tokens,
                text: r.choices[0]!.message.content,
              }))
          : g.client.completions
              .create({
                model: "tiny",
                prompt: PROMPTS[2]!,
                max_tokens: 4,
                temperature: 0,
                ...extra,
              } as OpenAI.CompletionCreateParamsNonStreaming)
              .then((r) => ({
                cached: r.usage!.prompt_tokens_details!.cached_tokens,
                text: r.choices[0]!.text,
              }));
      };
      const a1 = await ask("tenant-a");
      expect(a1.cached).toBe(0);
      // Another salt, and none, find nothing of tenant a's; the same salt finds it all.
      expect((await ask("tenant-b")).cached).toBe(0);
      const plain = await ask();
      expect(plain.cached).toBe(0);
      const a2 = await ask("tenant-a");
      expect(a2.cached).toBeGreaterThan(0);
      expect((await ask()).cached).toBe(a2.cached);
      expect(new Set([a1.text, a2.text, plain.text]).size).toBe(1);
      // Chat completions take it too.
      expect((await ask("tenant-c", "chat")).cached).toBe(0);
      expect((await ask("tenant-c", "chat")).cached).toBeGreaterThan(0);
      // And the Responses API.
      const respond = (salt: string) =>
        g.client.responses
          .create({
            model: "tiny",
            input: PROMPTS[1]!,
            max_output_tokens: 4,
            temperature: 0,
            cache_salt: salt,
          } as OpenAI.Responses.ResponseCreateParamsNonStreaming)
          .then((r) => r.usage!.input_tokens_details.cached_tokens);
      expect(await respond("tenant-d")).toBe(0);
      expect(await respond("tenant-e")).toBe(0);
      expect(await respond("tenant-d")).toBeGreaterThan(0);
      // An empty salt is refused, naming the field.
      await expect(ask("")).rejects.toMatchObject({
        status: 400,
        error: expect.objectContaining({ param: expect.stringContaining("cache_salt") }),
      });
    } finally {
      await g.close();
    }
  });
});

describe("prefix cache disk tier", () => {
  it.each(["f32", "bf16", "fp8"] as const)(
    "a prefix the KV cache forgot comes back from disk: cached tokens, the same text (%s rows)",
    async (dtype) => {
      const folder = join(disk, "in-process");
      const [cached, plain] = await Promise.all([
        startGateway(dir, {
          ...tight(dtype),
          prefixCacheDisk: { dir: folder, bytes: 2 ** 20, identity: {} },
        }),
        startGateway(dir, { ...tight(dtype), prefixCaching: false }),
      ]);
      try {
        const want = await Promise.all(PROMPTS.map((p) => complete(plain.client, p)));
        const first = [];
        for (const p of PROMPTS) first.push(await complete(cached.client, p));
        // The first prompt's blocks were taken for the next two's: they went to disk.
        expect(await metric(cached.url, "expertmesh_gateway_prefix_cache_disk_hits")).toBe(0);
        const again = await complete(cached.client, PROMPTS[0]!);
        const P = again.usage!.prompt_tokens;
        expect(again.usage!.prompt_tokens_details?.cached_tokens).toBe(wholeBlocks(P));
        const fromDisk = await metric(cached.url, "expertmesh_gateway_prefix_cache_disk_hits");
        expect(fromDisk).toBeGreaterThan(0);
        expect(fromDisk).toBeLessThanOrEqual(wholeBlocks(P));
        expect(first.map((r) => r.choices[0]!.text)).toEqual(want.map((r) => r.choices[0]!.text));
        expect(again.choices[0]!.text).toBe(want[0]!.choices[0]!.text);
        // Round after round, every text stays that of computing everything.
        for (let round = 0; round < 2; round++)
          for (const [i, p] of PROMPTS.entries())
            expect((await complete(cached.client, p)).choices[0]!.text).toBe(
              want[i]!.choices[0]!.text,
            );
        expect(await metric(cached.url, "expertmesh_gateway_prefix_cache_disk_errors")).toBe(0);
      } finally {
        await Promise.all([cached.close(), plain.close()]);
      }
    },
  );

  it("is refused without prefix caching", async () => {
    await expect(
      startGateway(dir, {
        prefixCaching: false,
        prefixCacheDisk: { dir: join(disk, "refused"), bytes: 2 ** 20, identity: {} },
      }),
    ).rejects.toMatchObject({ code: "EM_CLI_USAGE" });
  });

  it("a gateway process writes its cached blocks at SIGTERM; the next one starts with them", async () => {
    const folder = join(disk, "process");
    const t = tight();
    const args = (pool: number) => [
      `--prefix-cache-disk=${folder}`,
      "--prefix-cache-disk-bytes=1048576",
      `--block-size=${t.blockSize}`,
      `--max-model-len=${t.maxModelLen * pool}`,
      `--kv-cache-bytes=${t.kvCacheBytes * pool}`,
    ];
    // Two names: each process has its own log file. The second has room for a long stream.
    const start = (modelName: string, pool = 1) =>
      startGatewayProcess({ modelDir: dir, namespace: "test", modelName, args: args(pool) });
    const one = await start("disk-1");
    let first: OpenAI.Completion;
    try {
      expect(one.log()).toContain("0 blocks kept from before");
      first = await complete(one.client, PROMPTS[1]!);
      expect(first.usage!.prompt_tokens_details?.cached_tokens).toBe(0);
    } finally {
      await one.process.stop();
    }
    expect(one.log()).toMatch(/prefix cache: [1-9]\d* blocks written to /);
    const [fp] = readdirSync(folder);
    expect(readdirSync(join(folder, fp!)).filter((f) => f.endsWith(".kv")).length).toBeGreaterThan(
      0,
    );
    const two = await start("disk-2", 4);
    try {
      expect(two.log()).toMatch(/prefix cache disk tier in .*: [1-9]\d* blocks kept from before/);
      // A stream runs (and runs on: 200 tokens) while the prefix comes back from disk.
      const stream = await two.client.completions.create({
        model: "tiny",
        prompt: "Count with me:",
        max_tokens: 200,
        temperature: 0,
        ignore_eos: true,
        stream: true,
      } as OpenAI.CompletionCreateParamsStreaming);
      const tokens = stream[Symbol.asyncIterator]();
      await tokens.next();
      const again = await complete(two.client, PROMPTS[1]!);
      stream.controller.abort();
      const P = again.usage!.prompt_tokens;
      expect(again.usage!.prompt_tokens_details?.cached_tokens).toBe(wholeBlocks(P));
      expect(await metric(two.url, "expertmesh_gateway_prefix_cache_disk_hits")).toBe(
        wholeBlocks(P),
      );
      // Each block's file was read in the background while the prompt waited and the
      // stream stepped on.
      expect(await metric(two.url, "expertmesh_gateway_prefix_cache_disk_read_ahead")).toBe(
        wholeBlocks(P) / t.blockSize,
      );
      expect(again.choices[0]!.text).toBe(first.choices[0]!.text);
    } finally {
      await two.process.stop();
    }
  });

  it("shared by two gateway processes: a prefix one computed, the other reads (--prefix-cache-disk-shared)", async () => {
    const folder = join(disk, "shared");
    const t = tight();
    const args = [
      `--prefix-cache-disk=${folder}`,
      "--prefix-cache-disk-bytes=1048576",
      "--prefix-cache-disk-shared",
      `--block-size=${t.blockSize}`,
      `--max-model-len=${t.maxModelLen}`,
      `--kv-cache-bytes=${t.kvCacheBytes}`,
    ];
    const start = (modelName: string) =>
      startGatewayProcess({ modelDir: dir, namespace: "test", modelName, args });
    const [a, b] = await Promise.all([start("shared-a"), start("shared-b")]);
    try {
      const first = await complete(a.client, PROMPTS[2]!);
      const P = first.usage!.prompt_tokens;
      expect(first.usage!.prompt_tokens_details?.cached_tokens).toBe(0);
      // Written as computed (the blocks are still in a's pool), in the background.
      await waitFor("a's blocks written", async () =>
        ((await metric(a.url, "expertmesh_gateway_prefix_cache_disk_written")) ?? 0) >=
        wholeBlocks(P) / B
          ? true
          : undefined,
      );
      const again = await complete(b.client, PROMPTS[2]!);
      expect(again.usage!.prompt_tokens_details?.cached_tokens).toBe(wholeBlocks(P));
      expect(await metric(b.url, "expertmesh_gateway_prefix_cache_disk_hits")).toBe(wholeBlocks(P));
      // Every one of them from a file a wrote (found in the folder, not written by b).
      expect(await metric(b.url, "expertmesh_gateway_prefix_cache_disk_shared_hits")).toBe(
        wholeBlocks(P) / B,
      );
      expect(again.choices[0]!.text).toBe(first.choices[0]!.text);
      // b read those blocks rather than computing them: it wrote only the blocks after them.
      expect(await metric(b.url, "expertmesh_gateway_prefix_cache_disk_written")).toBeLessThan(
        wholeBlocks(P) / B,
      );
      expect(await metric(b.url, "expertmesh_gateway_prefix_cache_disk_errors")).toBe(0);
      expect(await metric(a.url, "expertmesh_gateway_prefix_cache_disk_errors")).toBe(0);
    } finally {
      await Promise.all([a.process.stop(), b.process.stop()]);
    }
  });
});

describe("the NATS tier (--prefix-cache-remote, ADR 0028)", () => {
  const remoteArgs = (bucket: string) => {
    const t = tight();
    return [
      `--nats=${testEnv().nats.url}`,
      `--prefix-cache-remote=${bucket}`,
      "--prefix-cache-remote-bytes=4194304",
      `--block-size=${t.blockSize}`,
      `--max-model-len=${t.maxModelLen}`,
      `--kv-cache-bytes=${t.kvCacheBytes}`,
    ];
  };
  const startRemote = (modelName: string, bucket: string, extra: string[] = []) =>
    startGatewayProcess({
      modelDir: dir,
      namespace: "test",
      modelName,
      args: [...remoteArgs(bucket), ...extra],
    });
  const remoteMetric = (url: string, name: string) =>
    metric(url, `expertmesh_gateway_prefix_cache_remote_${name}`);

  it("a prefix one gateway computed, another reads from the bucket; a gateway started later finds it", async () => {
    const bucket = uniqueName("prefix").replace(/[^A-Za-z0-9_-]/g, "_");
    const [a, b] = await Promise.all([
      startRemote("remote-a", bucket),
      startRemote("remote-b", bucket),
    ]);
    let first: OpenAI.Completion;
    let P: number;
    try {
      first = await complete(a.client, PROMPTS[2]!);
      P = first.usage!.prompt_tokens;
      expect(first.usage!.prompt_tokens_details?.cached_tokens).toBe(0);
      // Written as computed, in the background; b's watch learns the keys.
      await waitFor("a's blocks in b's view of the bucket", async () =>
        ((await remoteMetric(b.url, "blocks")) ?? 0) >= wholeBlocks(P) / B ? true : undefined,
      );
      expect(await remoteMetric(a.url, "written")).toBeGreaterThanOrEqual(wholeBlocks(P) / B);
      const again = await complete(b.client, PROMPTS[2]!);
      expect(again.usage!.prompt_tokens_details?.cached_tokens).toBe(wholeBlocks(P));
      expect(await remoteMetric(b.url, "hits")).toBe(wholeBlocks(P));
      // Every one of them a wrote.
      expect(await remoteMetric(b.url, "shared_hits")).toBe(wholeBlocks(P) / B);
      expect(again.choices[0]!.text).toBe(first.choices[0]!.text);
      expect(await remoteMetric(b.url, "written")).toBeLessThan(wholeBlocks(P) / B);
      for (const g of [a, b]) expect(await remoteMetric(g.url, "errors")).toBe(0);
    } finally {
      await Promise.all([a.process.stop(), b.process.stop()]);
    }
    // A new pod of the model: the blocks are in the bucket, listed at its start.
    const c = await startRemote("remote-c", bucket);
    try {
      const later = await complete(c.client, PROMPTS[2]!);
      expect(later.usage!.prompt_tokens_details?.cached_tokens).toBe(wholeBlocks(P));
      expect(later.choices[0]!.text).toBe(first.choices[0]!.text);
    } finally {
      await c.process.stop();
    }
  });

  it("under each gateway's own disk tier: the bucket gives what another computed, the disk what this one's pool forgot", async () => {
    const bucket = uniqueName("prefix").replace(/[^A-Za-z0-9_-]/g, "_");
    const own = (name: string) => [
      `--prefix-cache-disk=${join(disk, `stacked-${name}`)}`,
      "--prefix-cache-disk-bytes=1048576",
    ];
    const [a, b] = await Promise.all([
      startRemote("stacked-a", bucket, own("a")),
      startRemote("stacked-b", bucket, own("b")),
    ]);
    const diskHits = (url: string) => metric(url, "expertmesh_gateway_prefix_cache_disk_hits");
    try {
      const first = await complete(a.client, PROMPTS[2]!);
      const P = first.usage!.prompt_tokens;
      await waitFor("a's blocks in b's view of the bucket", async () =>
        ((await remoteMetric(b.url, "blocks")) ?? 0) >= wholeBlocks(P) / B ? true : undefined,
      );
      const fromBucket = await complete(b.client, PROMPTS[2]!);
      expect(fromBucket.usage!.prompt_tokens_details?.cached_tokens).toBe(wholeBlocks(P));
      expect(await remoteMetric(b.url, "hits")).toBe(wholeBlocks(P));
      expect(await diskHits(b.url)).toBe(0);
      // Two other prompts take b's blocks: the third's go to b's own disk tier.
      for (const p of PROMPTS.slice(0, 2)) await complete(b.client, p);
      const again = await complete(b.client, PROMPTS[2]!);
      expect(again.usage!.prompt_tokens_details?.cached_tokens).toBe(wholeBlocks(P));
      // The nearest tier gave them: b's disk, not the bucket.
      expect(await diskHits(b.url)).toBeGreaterThan(0);
      expect(await remoteMetric(b.url, "hits")).toBe(wholeBlocks(P));
      expect(new Set([first, fromBucket, again].map((r) => r.choices[0]!.text)).size).toBe(1);
      for (const g of [a, b]) {
        expect(await remoteMetric(g.url, "errors")).toBe(0);
        expect(await metric(g.url, "expertmesh_gateway_prefix_cache_disk_errors")).toBe(0);
      }
    } finally {
      await Promise.all([a.process.stop(), b.process.stop()]);
    }
  });

  it("is refused with a shared disk tier, without prefix caching, and without --nats", async () => {
    const nc = await connect({ servers: testEnv().nats.url, name: "prefix-refused" });
    const store = await RemotePrefixStore.open({
      nc,
      bucket: uniqueName("prefix").replace(/[^A-Za-z0-9_-]/g, "_"),
      maxBytes: 2 ** 20,
      blockBytes: bytesPerBlock(readModelConfig(dir), 16, "f32"),
      identity: {},
      storage: "memory",
    });
    try {
      await expect(
        startGateway(dir, {
          prefixCacheRemote: store,
          prefixCacheDisk: {
            dir: join(disk, "refused"),
            bytes: 2 ** 20,
            identity: {},
            shared: true,
          },
        }),
      ).rejects.toMatchObject({
        code: "EM_CLI_USAGE",
        message: expect.stringContaining("drop --prefix-cache-disk-shared"),
      });
      await expect(
        startGateway(dir, { prefixCaching: false, prefixCacheRemote: store }),
      ).rejects.toMatchObject({ code: "EM_CLI_USAGE" });
    } finally {
      await store.close();
      await nc.close();
    }
    const run = await runCli(process.execPath, [
      mainTs,
      "gateway",
      `--model=${dir}`,
      "--local",
      "--prefix-cache-remote=prefix",
    ]);
    expect(run.code).not.toBe(0);
    expect(run.stderr).toContain("EM_CLI_USAGE");
    expect(run.stderr).toContain("--prefix-cache-remote needs --nats");
  });
});
