// The weights digest (src/model/weights-digest.ts, ADR 0035): the same for every copy of a
// checkpoint, another for other weights of the same shape; what it reads and what it misses;
// and the shard subjects it ends.
import {
  closeSync,
  cpSync,
  mkdtempSync,
  openSync,
  readFileSync,
  rmSync,
  utimesSync,
  writeFileSync,
  writeSync,
} from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { Checkpoint } from "../../src/model/checkpoint.ts";
import { writeTinyModel } from "../../src/model/tiny.ts";
import { SAMPLE_BYTES, sampleOffsets, weightsDigest } from "../../src/model/weights-digest.ts";
import { type ModelRef, subjects } from "../../src/moe/subjects.ts";
import { ExpertMeshError } from "../../src/util/errors.ts";

let root: string;
let base: string;
let baseDigest: string;
const FILE = "model-00001-of-00002.safetensors";

async function tiny(dir: string, seed: number, mtp = false): Promise<string> {
  await writeTinyModel(dir, { arch: "v3", preset: "tiny", seed, fp8: false, mtp, shards: 2 });
  return dir;
}

const digestOf = async (dir: string, opts: { mtp?: boolean } = {}) =>
  (await Checkpoint.open(dir, opts)).weightsDigest();

/** A copy of the base checkpoint, changed by `edit`. */
function variant(name: string, edit: (dir: string) => void): string {
  const dir = join(root, name);
  cpSync(base, dir, { recursive: true });
  edit(dir);
  return dir;
}

/** Flips one byte of `file` at `at`. */
function flip(dir: string, file: string, at: number): void {
  const path = join(dir, file);
  const bytes = readFileSync(path);
  const fd = openSync(path, "r+");
  writeSync(fd, Buffer.of(bytes[at]! ^ 0x01), 0, 1, at);
  closeSync(fd);
}

function dataStart(dir: string, file: string): number {
  const bytes = readFileSync(join(dir, file));
  return 8 + Number(bytes.readBigUInt64LE(0));
}

beforeAll(async () => {
  root = mkdtempSync(join(tmpdir(), "em-weights-digest-"));
  base = await tiny(join(root, "base"), 0);
  baseDigest = await digestOf(base);
});
afterAll(() => rmSync(root, { recursive: true, force: true }));

describe("weightsDigest", () => {
  it("is 16 hex characters, kept once read", async () => {
    expect(baseDigest).toMatch(/^[0-9a-f]{16}$/);
    const ckpt = await Checkpoint.open(base);
    expect(ckpt.weightsDigest()).toBe(ckpt.weightsDigest());
  });

  it.each<[string, () => Promise<string> | string]>([
    ["opened again", () => base],
    [
      "a copy elsewhere, with other modification times",
      () =>
        variant("copy", (dir) => {
          for (const f of [FILE, "config.json"]) utimesSync(join(dir, f), 1000, 1000);
        }),
    ],
    ["the same seed written again (another pod's download)", () => tiny(join(root, "again"), 0)],
    [
      "a file changed where no sample falls (what it misses)",
      () => variant("unsampled", (dir) => flip(dir, FILE, dataStart(dir, FILE) + SAMPLE_BYTES + 1)),
    ],
  ])("is the same for the checkpoint %s", async (_, make) => {
    expect(await digestOf(await make())).toBe(baseDigest);
  });

  it.each<[string, () => Promise<string> | string]>([
    ["another model of the same shape (other seed)", () => tiny(join(root, "seed1"), 1)],
    [
      "config.json changed",
      () =>
        variant("config", (dir) => {
          const c = JSON.parse(readFileSync(join(dir, "config.json"), "utf8"));
          writeFileSync(join(dir, "config.json"), JSON.stringify({ ...c, rms_norm_eps: 1e-5 }));
        }),
    ],
    [
      "a byte of the first sample",
      () => variant("first", (dir) => flip(dir, FILE, dataStart(dir, FILE))),
    ],
    [
      "a byte of the last sample",
      () =>
        variant("last", (dir) => {
          const size = readFileSync(join(dir, FILE)).length;
          flip(dir, FILE, size - 1);
        }),
    ],
  ])("differs for %s", async (_, make) => {
    expect(await digestOf(await make())).not.toBe(baseDigest);
  });

  it("differs for a byte of a header (read as bytes: no longer a checkpoint that opens)", async () => {
    const files = [FILE, "model-00002-of-00002.safetensors"];
    const dir = variant("header", (d) => flip(d, FILE, 9));
    expect(await weightsDigest(base, files)).toBe(baseDigest);
    expect(await weightsDigest(dir, files)).not.toBe(baseDigest);
  });

  it("does not depend on how the checkpoint was opened (the MTP layer kept or not)", async () => {
    const dir = await tiny(join(root, "mtp"), 0, true);
    expect(await digestOf(dir, { mtp: true })).toBe(await digestOf(dir));
  });

  it("refuses a file it cannot read with EM_CKPT_READ", async () => {
    const err = await weightsDigest(base, ["missing.safetensors"]).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(ExpertMeshError);
    expect((err as ExpertMeshError).code).toBe("EM_CKPT_READ");
    expect((err as Error).message).toContain("missing.safetensors");
  });
});

describe("sampleOffsets", () => {
  const S = SAMPLE_BYTES;
  it.each<[string, number, number, number[]]>([
    ["no data", 100, 100, []],
    ["less data than a sample: three reads of it all", 100, 1100, [100, 100, 100]],
    ["two samples' worth: they overlap", 8, 8 + 2 * S, [8, 8 + S / 2, 8 + S]],
    ["plenty", 1000, 1000 + 10 * S, [1000, 1000 + 4.5 * S, 1000 + 9 * S]],
  ])("%s", (_, start, size, want) => {
    expect(sampleOffsets(start, size)).toEqual(want);
  });
});

describe("subjects.shard", () => {
  it.each<[string, ModelRef, number, string]>([
    [
      "without weights (in-process pairs, tools)",
      { namespace: "ns", model: "m" },
      3,
      "em.ns.m.shard.3",
    ],
    [
      "with the weights' digest",
      { namespace: "ns", model: "DeepSeek-V2.5", weights: "0123456789abcdef" },
      0,
      "em.ns.DeepSeek-V2.5.shard.0.w0123456789abcdef",
    ],
  ])("%s", (_, ref, k, want) => {
    expect(subjects.shard(ref, k)).toBe(want);
    // Under the model's one permission (ADR 0032) either way.
    expect(want.startsWith(subjects.all(ref).slice(0, -1))).toBe(true);
  });
});
