import { closeSync, mkdtempSync, openSync, rmSync, writeFileSync, writeSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { Checkpoint } from "../../src/model/checkpoint.ts";
import {
  readSafetensorsHeader,
  readTensor,
  type TensorToWrite,
  writeSafetensors,
} from "../../src/model/safetensors.ts";
import { tinyConfigJson, writeTinyModel } from "../../src/model/tiny.ts";
import { ExpertMeshError } from "../../src/util/errors.ts";

const root = mkdtempSync(join(tmpdir(), "em-safetensors-"));
afterAll(() => rmSync(root, { recursive: true, force: true }));
let counter = 0;
const tmp = (name = "t.safetensors") => join(mkdtempSync(join(root, `${counter++}-`)), name);

function codeOf(fn: () => unknown): string | undefined {
  try {
    fn();
  } catch (err) {
    return err instanceof ExpertMeshError ? err.code : `not ExpertMeshError: ${err}`;
  }
  return undefined;
}

async function asyncCodeOf(p: Promise<unknown>): Promise<string | undefined> {
  try {
    await p;
  } catch (err) {
    return err instanceof ExpertMeshError ? err.code : `not ExpertMeshError: ${err}`;
  }
  return undefined;
}

/** A file with a hand-made header (object or raw text) and data section. */
function rawFile(
  header: unknown,
  data: Uint8Array = new Uint8Array(0),
  lengthField?: bigint,
): string {
  const path = tmp();
  const json = Buffer.from(typeof header === "string" ? header : JSON.stringify(header));
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(lengthField ?? BigInt(json.length));
  writeFileSync(path, Buffer.concat([len, json, data]));
  return path;
}

const sample: TensorToWrite[] = [
  {
    name: "bf16",
    dtype: "BF16",
    shape: [2, 3],
    data: new Uint16Array([1, 2, 3, 0x3f80, 0xbf80, 0x7fc0]),
  },
  { name: "f16", dtype: "F16", shape: [3], data: new Uint16Array([0x3c00, 0xc000, 1]) },
  { name: "f32", dtype: "F32", shape: [2, 1, 2], data: new Float32Array([1.5, -2, 1e-30, 3e38]) },
  { name: "fp8", dtype: "F8_E4M3", shape: [5], data: new Uint8Array([0, 0x38, 0x7e, 0xfe, 0x01]) },
  { name: "scalar", dtype: "F32", shape: [], data: () => new Float32Array([42]) },
  { name: "empty", dtype: "BF16", shape: [0, 4], data: new Uint16Array(0) },
];

describe("safetensors round trip", () => {
  it("writes a header the format accepts and reads every dtype back", async () => {
    const path = tmp();
    await writeSafetensors(path, sample, { format: "pt" });
    const header = await readSafetensorsHeader(path);
    expect(header.metadata).toEqual({ format: "pt" });
    expect(header.headerBytes % 8).toBe(0); // data is 8-byte aligned
    expect([...header.tensors.keys()]).toEqual(sample.map((t) => t.name));
    for (const t of sample) {
      const info = header.tensors.get(t.name)!;
      expect(info.shape).toEqual(t.shape);
      const got = await readTensor(info, { shape: t.shape });
      const want = typeof t.data === "function" ? t.data() : t.data;
      expect(got.dtype).toBe(t.dtype);
      expect(got.data.constructor).toBe(want.constructor);
      expect([...got.data]).toEqual([...want]);
    }
  });

  it("rejects inconsistent input to the writer", async () => {
    const wrongLength: TensorToWrite = {
      name: "x",
      dtype: "F32",
      shape: [3],
      data: new Float32Array(2),
    };
    const wrongType: TensorToWrite = {
      name: "x",
      dtype: "BF16",
      shape: [2],
      data: new Float32Array(1),
    };
    const repeated = [sample[0]!, sample[0]!];
    for (const tensors of [[wrongLength], [wrongType], repeated]) {
      expect(await asyncCodeOf(writeSafetensors(tmp(), tensors))).toBe("EM_CKPT_WRITE_INVALID");
    }
  });
});

describe("reading checks", () => {
  it("checks the expected shape and the accepted dtypes", async () => {
    const path = tmp();
    await writeSafetensors(path, sample);
    const info = (await readSafetensorsHeader(path)).tensors.get("bf16")!;
    expect(await asyncCodeOf(readTensor(info, { shape: [3, 2] }))).toBe("EM_CKPT_SHAPE_MISMATCH");
    expect(await asyncCodeOf(readTensor(info, { shape: [6] }))).toBe("EM_CKPT_SHAPE_MISMATCH");
    expect(await asyncCodeOf(readTensor(info, { dtypes: ["F32"] }))).toBe(
      "EM_CKPT_UNSUPPORTED_DTYPE",
    );
    expect((await readTensor(info, { dtypes: ["BF16", "F16"] })).data).toBeInstanceOf(Uint16Array);
  });

  it("opens files holding dtypes it cannot read, and refuses to read those tensors", async () => {
    const data = new Uint8Array(16 + 4);
    const path = rawFile(
      {
        ids: { dtype: "I64", shape: [2], data_offsets: [0, 16] },
        w: { dtype: "F32", shape: [1], data_offsets: [16, 20] },
      },
      data,
    );
    const header = await readSafetensorsHeader(path);
    expect(await asyncCodeOf(readTensor(header.tensors.get("ids")!))).toBe(
      "EM_CKPT_UNSUPPORTED_DTYPE",
    );
    expect((await readTensor(header.tensors.get("w")!)).data).toEqual(new Float32Array([0]));
  });
});

describe("malformed files", () => {
  const t = (begin: number, end: number, shape = [2], dtype = "BF16") => ({
    dtype,
    shape,
    data_offsets: [begin, end],
  });
  // [case, file maker, expected code]
  const cases: [string, () => string, string][] = [
    [
      "shorter than the length field",
      () => {
        const p = tmp();
        writeFileSync(p, Buffer.alloc(5));
        return p;
      },
      "EM_CKPT_BAD_HEADER",
    ],
    ["header length 0", () => rawFile("", new Uint8Array(0), 0n), "EM_CKPT_BAD_HEADER"],
    [
      "header length past the file",
      () => rawFile("{}", new Uint8Array(0), 1000n),
      "EM_CKPT_BAD_HEADER",
    ],
    [
      "header length absurd",
      () => rawFile("{}", new Uint8Array(0), 2n ** 62n),
      "EM_CKPT_BAD_HEADER",
    ],
    ["header not JSON", () => rawFile("{not json", new Uint8Array(0)), "EM_CKPT_BAD_HEADER"],
    [
      "header not UTF-8",
      () => rawFile(Buffer.from([0x7b, 0xff, 0x7d]).toString("latin1"), new Uint8Array(0)),
      "EM_CKPT_BAD_HEADER",
    ],
    ["header a JSON array", () => rawFile([1, 2]), "EM_CKPT_BAD_HEADER"],
    [
      "entry without dtype",
      () => rawFile({ a: { shape: [1], data_offsets: [0, 2] } }, new Uint8Array(2)),
      "EM_CKPT_BAD_HEADER",
    ],
    [
      "negative shape",
      () => rawFile({ a: t(0, 2, [-1]) }, new Uint8Array(2)),
      "EM_CKPT_BAD_HEADER",
    ],
    [
      "offsets not a pair",
      () => rawFile({ a: { dtype: "BF16", shape: [1], data_offsets: [0] } }, new Uint8Array(2)),
      "EM_CKPT_BAD_HEADER",
    ],
    ["end before begin", () => rawFile({ a: t(4, 0) }, new Uint8Array(4)), "EM_CKPT_BAD_HEADER"],
    [
      "size not shape x dtype",
      () => rawFile({ a: t(0, 6) }, new Uint8Array(6)),
      "EM_CKPT_BAD_HEADER",
    ],
    [
      "overlapping tensors",
      () => rawFile({ a: t(0, 4), b: t(2, 6) }, new Uint8Array(6)),
      "EM_CKPT_BAD_HEADER",
    ],
    [
      "gap between tensors",
      () => rawFile({ a: t(0, 4), b: t(6, 10) }, new Uint8Array(10)),
      "EM_CKPT_BAD_HEADER",
    ],
    [
      "data not starting at 0",
      () => rawFile({ a: t(2, 6) }, new Uint8Array(6)),
      "EM_CKPT_BAD_HEADER",
    ],
    [
      "bytes after the last tensor",
      () => rawFile({ a: t(0, 4) }, new Uint8Array(9)),
      "EM_CKPT_BAD_HEADER",
    ],
    ["metadata not strings", () => rawFile({ __metadata__: { format: 1 } }), "EM_CKPT_BAD_HEADER"],
    [
      "truncated data",
      () => rawFile({ a: t(0, 4), b: t(4, 8) }, new Uint8Array(6)),
      "EM_CKPT_TRUNCATED",
    ],
    ["missing file", () => join(root, "no-such.safetensors"), "EM_CKPT_READ"],
  ];
  it.each(cases)("%s", async (_name, make, code) => {
    expect(await asyncCodeOf(readSafetensorsHeader(make()))).toBe(code);
  });

  it("accepts tensors listed out of offset order in the JSON", async () => {
    const path = rawFile({ b: t(4, 8), a: t(0, 4) }, new Uint8Array(8));
    expect([...(await readSafetensorsHeader(path)).tensors.keys()]).toEqual(["a", "b"]);
  });
});

describe("Checkpoint", () => {
  async function tinyDir(opts: { shards?: number } = {}): Promise<string> {
    const dir = mkdtempSync(join(root, "ckpt-"));
    await writeTinyModel(dir, { arch: "v3", ...opts });
    return dir;
  }

  it("lists, describes and reads tensors", async () => {
    const ckpt = await Checkpoint.open(await tinyDir());
    expect(ckpt.config.architecture).toBe("DeepseekV3ForCausalLM");
    expect(ckpt.names()).toContain("model.layers.1.mlp.experts.15.down_proj.weight");
    expect(ckpt.names()).toEqual([...ckpt.names()].sort());
    expect(ckpt.has("lm_head.weight")).toBe(true);
    expect(ckpt.has("model.layers.0.mlp.gate.weight")).toBe(false); // layer 0 is dense
    expect(ckpt.tensorInfo("model.embed_tokens.weight")).toMatchObject({
      dtype: "BF16",
      shape: [320, 64],
    });
    const t = await ckpt.read("model.norm.weight", { shape: [64], dtypes: ["BF16"] });
    expect(t.data).toBeInstanceOf(Uint16Array);
    expect(t.data.length).toBe(64);
    expect(await asyncCodeOf(ckpt.read("model.norm.weight", { shape: [65] }))).toBe(
      "EM_CKPT_SHAPE_MISMATCH",
    );
    expect(codeOf(() => ckpt.tensorInfo("model.layers.9.nope.weight"))).toBe(
      "EM_CKPT_MISSING_TENSOR",
    );
    expect(await asyncCodeOf(ckpt.read("nope"))).toBe("EM_CKPT_MISSING_TENSOR");
  });

  it("reads only the bytes of the tensors asked for", async () => {
    const ckpt = await Checkpoint.open(await tinyDir());
    const afterOpen = ckpt.bytesRead;
    const info = ckpt.tensorInfo("model.layers.2.mlp.experts.3.up_proj.weight");
    await ckpt.read(info.name);
    expect(ckpt.bytesRead - afterOpen).toBe(info.byteLength);
    expect(info.byteLength).toBe(32 * 64 * 2);
  });

  it("reads a small tensor behind a 1 GiB one without touching the big one", async () => {
    // A sparse file: the big tensor's bytes are never written, so reading them would cost
    // a gigabyte of memory; reading only the small tensor costs 8 bytes.
    const big = 2 ** 29; // bf16 elements = 1 GiB
    const header = Buffer.from(
      JSON.stringify({
        big: { dtype: "BF16", shape: [big], data_offsets: [0, 2 * big] },
        small: { dtype: "F32", shape: [2], data_offsets: [2 * big, 2 * big + 8] },
      }),
    );
    const path = tmp();
    const fd = openSync(path, "w");
    const len = Buffer.alloc(8);
    len.writeBigUInt64LE(BigInt(header.length));
    writeSync(fd, len, 0, 8, 0);
    writeSync(fd, header, 0, header.length, 8);
    writeSync(
      fd,
      Buffer.from(new Float32Array([1.25, -3]).buffer),
      0,
      8,
      8 + header.length + 2 * big,
    );
    closeSync(fd);
    const before = process.memoryUsage().arrayBuffers;
    const t = await readTensor((await readSafetensorsHeader(path)).tensors.get("small")!);
    expect([...t.data]).toEqual([1.25, -3]);
    expect(process.memoryUsage().arrayBuffers - before).toBeLessThan(64 * 1024 * 1024);
  });

  it("skips the multi-token-prediction layer's tensors", async () => {
    const dir = mkdtempSync(join(root, "mtp-"));
    writeFileSync(join(dir, "config.json"), JSON.stringify(tinyConfigJson("v3")));
    await writeSafetensors(join(dir, "model.safetensors"), [
      {
        name: "model.layers.3.input_layernorm.weight",
        dtype: "BF16",
        shape: [1],
        data: new Uint16Array(1),
      },
      {
        name: "model.layers.4.eh_proj.weight",
        dtype: "BF16",
        shape: [1],
        data: new Uint16Array(1),
      },
      {
        name: "model.layers.4.embed_tokens.weight",
        dtype: "BF16",
        shape: [1],
        data: new Uint16Array(1),
      },
    ]);
    const ckpt = await Checkpoint.open(dir);
    expect(ckpt.names()).toEqual(["model.layers.3.input_layernorm.weight"]);
    expect(ckpt.has("model.layers.4.eh_proj.weight")).toBe(false);
    expect(() => ckpt.tensorInfo("model.layers.4.eh_proj.weight")).toThrow(
      /multi-token-prediction/,
    );
  });

  it("reads sharded checkpoints like single-file ones", async () => {
    const single = await Checkpoint.open(await tinyDir());
    const sharded = await Checkpoint.open(await tinyDir({ shards: 4 }));
    expect(sharded.names()).toEqual(single.names());
    const files = new Set(sharded.names().map((n) => sharded.tensorInfo(n).file));
    expect(files.size).toBe(4);
    for (const name of single.names()) {
      const [a, b] = await Promise.all([single.read(name), sharded.read(name)]);
      expect(Buffer.from(b.data.buffer).equals(Buffer.from(a.data.buffer))).toBe(true);
    }
  });

  describe("bad directories and index files", () => {
    async function shardedWith(edit: (index: Record<string, unknown>) => unknown): Promise<string> {
      const dir = await tinyDir({ shards: 2 });
      const path = join(dir, "model.safetensors.index.json");
      const index = JSON.parse(await import("node:fs").then((fs) => fs.readFileSync(path, "utf8")));
      const edited = edit(index);
      writeFileSync(path, typeof edited === "string" ? edited : JSON.stringify(edited));
      return dir;
    }
    const withMap =
      (f: (m: Record<string, string>) => void) => (index: Record<string, unknown>) => {
        f(index["weight_map"] as Record<string, string>);
        return index;
      };
    const cases: [string, () => Promise<string>, string][] = [
      ["index not JSON", () => shardedWith(() => "{oops"), "EM_CKPT_BAD_INDEX"],
      [
        "index without weight_map",
        () => shardedWith(() => ({ metadata: {} })),
        "EM_CKPT_BAD_INDEX",
      ],
      ["empty weight_map", () => shardedWith(() => ({ weight_map: {} })), "EM_CKPT_BAD_INDEX"],
      [
        "shard file missing",
        () =>
          shardedWith(
            withMap((m) => {
              m["lm_head.weight"] = "model-00009-of-00009.safetensors";
            }),
          ),
        "EM_CKPT_BAD_INDEX",
      ],
      [
        "shard path escapes the directory",
        () =>
          shardedWith(
            withMap((m) => {
              m["lm_head.weight"] = "../model.safetensors";
            }),
          ),
        "EM_CKPT_BAD_INDEX",
      ],
      [
        "tensor not in its shard",
        () =>
          shardedWith(
            withMap((m) => {
              m["model.extra.weight"] = m["lm_head.weight"]!;
            }),
          ),
        "EM_CKPT_BAD_INDEX",
      ],
      [
        "no weights at all",
        async () => {
          const d = mkdtempSync(join(root, "empty-"));
          writeFileSync(join(d, "config.json"), JSON.stringify(tinyConfigJson("v2")));
          return d;
        },
        "EM_CKPT_READ",
      ],
      ["no config.json", async () => mkdtempSync(join(root, "noconfig-")), "EM_CONFIG_READ"],
    ];
    it.each(cases)("%s", async (_name, make, code) => {
      expect(await asyncCodeOf(Checkpoint.open(await make()))).toBe(code);
    });
  });
});
