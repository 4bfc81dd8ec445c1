// The native wire codec (shards/cpu/wire.cpp through the addon) against the TypeScript
// reference (src/moe/codec.ts): the same bytes for every dtype, gather and CRC seed, the
// same floats back for every scatter-add, and zlib's CRC-32 for any bytes at any offset.
// Property-based (fast-check) plus a table of special values. Skipped where the addon is
// not built (the reference then serves alone, and wire.test.ts covers it).
import { crc32 } from "node:zlib";
import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { groupByExpert } from "../../src/engine/experts.ts";
import {
  type CodecDtype,
  gatherRows,
  nativeCodec,
  rowBytes,
  tsCodec,
} from "../../src/moe/codec.ts";
import {
  addCombine,
  type Dispatch,
  decodeFrame,
  decodeReply,
  encodeCombine,
  encodeDispatch,
  encodeDispatchRows,
  encodeTable,
  requestBytes,
  splitDispatch,
  splitRanges,
} from "../../src/moe/wire.ts";

const native = nativeCodec();
const dtypes: CodecDtype[] = ["bf16", "fp8", "f32"];

/** Values a codec must agree on: ties, subnormals, overflow, infinities, NaN, zeros. */
const SPECIAL = [
  0,
  -0,
  1,
  -1,
  1.00390625,
  1.01171875,
  3e38,
  -3.4e38,
  Infinity,
  -Infinity,
  Number.NaN,
  1e-40,
  -1e-45,
  448,
  464,
  0.015625,
  0.0146484375,
  0.001953125,
  0.0029296875,
  65504,
  2 ** -126,
];

const rowsArb = fc
  .record({ dim: fc.integer({ min: 1, max: 300 }), rows: fc.integer({ min: 0, max: 6 }) })
  .chain(({ dim, rows }) =>
    fc.record({
      dim: fc.constant(dim),
      x: fc.float32Array({ minLength: (rows + 1) * dim, maxLength: (rows + 1) * dim }),
      index: fc.array(fc.integer({ min: 0, max: rows }), { minLength: 0, maxLength: 8 }),
      gather: fc.boolean(),
      seed: fc.integer({ min: 0, max: 2 ** 32 - 1 }),
      scale: fc.constantFrom(1, 1e-3, 1e5, 1e-30),
    }),
  );

/** Bit patterns, so NaN payloads and -0 count. */
const bitsOf = (a: Float32Array) => new Uint32Array(a.buffer, a.byteOffset, a.length);
/** Equal as floats, NaN equal to NaN (the addon and V8 may differ in NaN payloads). */
function sameFloats(a: Float32Array, b: Float32Array): boolean {
  if (a.length !== b.length) return false;
  const ab = bitsOf(a);
  const bb = bitsOf(b);
  for (let i = 0; i < a.length; i++)
    if (ab[i] !== bb[i] && !(Number.isNaN(a[i]!) && Number.isNaN(b[i]!))) return false;
  return true;
}

describe.skipIf(!native)("native wire codec = TypeScript reference", () => {
  const n = native!;

  it("CRC-32 equals zlib's for any bytes, offsets and seeds", () => {
    fc.assert(
      fc.property(
        fc.uint8Array({ maxLength: 3000 }),
        fc.nat({ max: 15 }),
        fc.integer({ min: 0, max: 2 ** 32 - 1 }),
        (bytes, off, seed) => {
          const b = bytes.subarray(Math.min(off, bytes.length));
          expect(n.crc32(b, seed)).toBe(crc32(b, seed));
          expect(n.crc32(b)).toBe(crc32(b));
        },
      ),
    );
  });

  it("packs every dtype to the same bytes and CRC, with and without a gather", () => {
    fc.assert(
      fc.property(rowsArb, ({ dim, x, index, gather, seed, scale }) => {
        const xs = x.map((v) => v * scale);
        const rowIndex = gather ? Int32Array.from(index) : null;
        const rows = rowIndex ? rowIndex.length : xs.length / dim;
        for (const dt of dtypes) {
          const a = new Uint8Array(rowBytes(dt, rows, dim));
          // Unaligned output inside a larger buffer, as in a frame after its assignments.
          const b = new Uint8Array(a.length + 3).subarray(1, a.length + 1);
          const crcA = tsCodec.pack(xs, dim, rowIndex, dt, a, seed);
          const crcB = n.pack(xs, dim, rowIndex, dt, b, seed);
          expect(Buffer.from(b).equals(Buffer.from(a)), dt).toBe(true);
          expect(crcB, dt).toBe(crcA);
        }
      }),
    );
  });

  it("unpacks and scatter-adds to the same floats", () => {
    fc.assert(
      fc.property(rowsArb, fc.boolean(), ({ dim, x, index, seed }, accumulate) => {
        const rows = index.length;
        const outIndex = Int32Array.from(index);
        const yRows = x.length / dim;
        for (const dt of dtypes) {
          const bytes = new Uint8Array(rowBytes(dt, rows, dim));
          tsCodec.pack(x, dim, outIndex, dt, bytes, seed);
          const yA = x.slice();
          const yB = x.slice();
          tsCodec.unpack(bytes, dt, rows, yA, dim, outIndex, accumulate);
          n.unpack(bytes.slice(), dt, rows, yB, dim, outIndex, accumulate);
          expect(sameFloats(yA, yB), `${dt} ${yRows} rows`).toBe(true);
        }
      }),
    );
  });

  it("unpacks with the CRC folded in: the same floats, and zlib's CRC of the bytes", () => {
    fc.assert(
      fc.property(
        rowsArb,
        fc.boolean(),
        fc.nat({ max: 7 }),
        ({ dim, x, index, seed }, accumulate, off) => {
          const rows = index.length;
          const outIndex = Int32Array.from(index);
          for (const dt of dtypes) {
            // Unaligned input, as a frame body is after its header and assignments.
            const bytes = new Uint8Array(rowBytes(dt, rows, dim) + off).subarray(off);
            tsCodec.pack(x, dim, outIndex, dt, bytes, 0);
            const yA = x.slice();
            const yB = x.slice();
            const crcA = tsCodec.unpackCrc(bytes, dt, rows, yA, dim, outIndex, accumulate, seed);
            const crcB = n.unpackCrc(bytes, dt, rows, yB, dim, outIndex, accumulate, seed);
            expect(crcA, dt).toBe(crc32(bytes, seed));
            expect(crcB, dt).toBe(crcA);
            expect(sameFloats(yA, yB), dt).toBe(true);
            // And the same floats as the plain unpack.
            const yC = x.slice();
            n.unpack(bytes, dt, rows, yC, dim, outIndex, accumulate);
            expect(sameFloats(yC, yB), dt).toBe(true);
          }
        },
      ),
    );
  });

  it("checks multi-chunk bodies (V3 width) the same way", () => {
    const dim = 7168;
    const rows = 9; // bf16: 14 KiB a row, several CRC chunks
    const x = Float32Array.from({ length: rows * dim }, (_, i) => Math.sin(i * 0.37) * 5);
    for (const dt of dtypes) {
      const bytes = new Uint8Array(rowBytes(dt, rows, dim) + 1).subarray(1);
      n.pack(x, dim, null, dt, bytes, 0);
      const yA = new Float32Array(rows * dim);
      const yB = new Float32Array(rows * dim);
      const crcA = tsCodec.unpackCrc(bytes, dt, rows, yA, dim, null, false, 0);
      expect(n.unpackCrc(bytes, dt, rows, yB, dim, null, false, 0), dt).toBe(crcA);
      expect(crcA, dt).toBe(crc32(bytes));
      expect(sameFloats(yA, yB), dt).toBe(true);
    }
  });

  it.each(dtypes)("agrees on special values (%s)", (dt) => {
    for (const dim of [1, 7, 8, 16, 21, 128, 131]) {
      const x = Float32Array.from({ length: 3 * dim }, (_, i) => SPECIAL[i % SPECIAL.length]!);
      const a = new Uint8Array(rowBytes(dt, 3, dim));
      const b = new Uint8Array(a.length);
      expect(n.pack(x, dim, null, dt, b, 0)).toBe(tsCodec.pack(x, dim, null, dt, a, 0));
      expect(Buffer.from(b).equals(Buffer.from(a))).toBe(true);
      const yA = new Float32Array(3 * dim);
      const yB = new Float32Array(3 * dim);
      tsCodec.unpack(a, dt, 3, yA, dim, null, false);
      n.unpack(a, dt, 3, yB, dim, null, false);
      expect(sameFloats(yA, yB)).toBe(true);
    }
  });
});

describe("frames from rows of a table", () => {
  const dispatchArb = fc
    .record({
      dtype: fc.constantFrom<Dispatch["dtype"]>("bf16", "fp8", "f32"),
      hidden: fc.integer({ min: 1, max: 200 }),
      tableRows: fc.integer({ min: 1, max: 10 }),
    })
    .chain(({ dtype, hidden, tableRows }) =>
      fc.record({
        dtype: fc.constant(dtype),
        hidden: fc.constant(hidden),
        x: fc.float32Array({
          minLength: tableRows * hidden,
          maxLength: tableRows * hidden,
          noNaN: true,
        }),
        rows: fc.uniqueArray(fc.integer({ min: 0, max: tableRows - 1 }), {
          minLength: 1,
          maxLength: tableRows,
        }),
        topK: fc.integer({ min: 1, max: 3 }),
      }),
    );

  it("encodeDispatchRows gives the bytes of encodeDispatch over the copied rows", () => {
    fc.assert(
      fc.property(dispatchArb, ({ dtype, hidden, x, rows, topK }) => {
        const numTokens = rows.length;
        const token = Uint32Array.from({ length: numTokens * topK }, (_, i) =>
          Math.floor(i / topK),
        );
        const expert = Uint32Array.from(token, (_, i) => i % 17);
        const weight = Float32Array.from(token, (_, i) => 0.25 * i);
        const h = { planVersion: 3, layer: 2, hidden, tokenOffset: 0, totalTokens: numTokens };
        const copied = new Float32Array(numTokens * hidden);
        rows.forEach((r, i) => {
          copied.set(x.subarray(r * hidden, (r + 1) * hidden), i * hidden);
        });
        const a = encodeDispatch({
          ...h,
          dtype,
          numTokens,
          activations: copied,
          token,
          expert,
          weight,
        });
        const b = encodeDispatchRows({
          ...h,
          dtype,
          x,
          rows: Int32Array.from(rows),
          token,
          expert,
          weight,
        });
        expect(Buffer.from(b).equals(Buffer.from(a))).toBe(true);
        // The same rows gathered from a table converted once (the dispatcher's path).
        const c = encodeDispatchRows({
          ...h,
          dtype,
          x: encodeTable(x, hidden, dtype),
          rows: Int32Array.from(rows),
          token,
          expert,
          weight,
        });
        expect(Buffer.from(c).equals(Buffer.from(a))).toBe(true);
        // splitRanges cuts where splitDispatch does, bounded by dispatch or reply.
        for (const combine of ["bf16", "f32"] as const) {
          const max = requestBytes(dtype, combine, 2, hidden, 2 * topK);
          const parts = splitDispatch(
            { ...h, dtype, numTokens, activations: copied, token, expert, weight },
            max,
            combine,
          );
          const ranges = splitRanges(dtype, numTokens, hidden, token, max, combine);
          expect(ranges.map((r) => [r.start, r.end - r.start, r.a1 - r.a0])).toEqual(
            parts.map((p) => [p.tokenOffset, p.numTokens, p.token.length]),
          );
          for (const r of ranges)
            expect(
              requestBytes(dtype, combine, r.end - r.start, hidden, r.a1 - r.a0),
            ).toBeLessThanOrEqual(max);
        }
      }),
    );
  });

  it("decodeReply + addCombine add what decodeFrame decodes", () => {
    fc.assert(
      fc.property(
        fc.constantFrom<"bf16" | "f32">("bf16", "f32"),
        fc.integer({ min: 1, max: 50 }),
        fc.integer({ min: 1, max: 5 }),
        (dtype, hidden, numTokens) => {
          const sums = Float32Array.from({ length: numTokens * hidden }, (_, i) => Math.sin(i) * 3);
          const frame = encodeCombine({
            planVersion: 1,
            layer: 1,
            hidden,
            tokenOffset: 0,
            totalTokens: numTokens,
            dtype,
            numTokens,
            sums,
          });
          const decoded = decodeFrame(frame);
          const view = decodeReply(frame);
          if (decoded.kind !== "combine" || view.kind !== "combine") throw new Error("kind");
          const outIndex = Int32Array.from({ length: numTokens }, (_, i) => numTokens - 1 - i);
          const out = new Float32Array(numTokens * hidden).fill(0.5);
          addCombine(view, out, outIndex);
          for (let t = 0; t < numTokens; t++)
            for (let j = 0; j < hidden; j++)
              expect(out[outIndex[t]! * hidden + j]).toBe(
                Math.fround(0.5 + decoded.sums[t * hidden + j]!),
              );
        },
      ),
    );
  });
});

describe("gatherRows", () => {
  const codecs = native ? [tsCodec, native] : [tsCodec];
  it("copies the indexed rows back to back with zlib's CRC, at any row size and offset", () => {
    fc.assert(
      fc.property(
        fc.integer({ min: 1, max: 40 }),
        fc.integer({ min: 1, max: 6 }),
        fc.nat({ max: 3 }),
        fc.array(fc.nat({ max: 5 }), { maxLength: 9 }),
        fc.integer({ min: 0, max: 2 ** 32 - 1 }),
        (rowSize, tableRows, offset, picks, seed) => {
          const backing = Uint8Array.from(
            { length: offset + rowSize * tableRows },
            (_, i) => (i * 37 + 11) & 0xff,
          );
          const table = backing.subarray(offset);
          const rowIndex = Int32Array.from(picks.map((p) => p % tableRows));
          const want = new Uint8Array(rowIndex.length * rowSize);
          rowIndex.forEach((r, i) => {
            want.set(table.subarray(r * rowSize, (r + 1) * rowSize), i * rowSize);
          });
          for (const codec of codecs) {
            const out = new Uint8Array(want.length);
            const crc = gatherRows(codec, table, rowSize, rowIndex, out, seed);
            expect(Buffer.from(out).equals(Buffer.from(want)), codec.name).toBe(true);
            expect(crc, codec.name).toBe(crc32(want, seed));
          }
        },
      ),
    );
  });

  it("refuses rows outside the table and an output of the wrong size", () => {
    const table = new Uint8Array(16);
    expect(() => gatherRows(tsCodec, table, 4, Int32Array.of(4), new Uint8Array(4), 0)).toThrow(
      /row 4 outside/,
    );
    expect(() => gatherRows(tsCodec, table, 4, Int32Array.of(0), new Uint8Array(5), 0)).toThrow(
      /5 bytes for 1 rows of 4/,
    );
  });
});

describe("checksums checked in the converting pass", () => {
  const combine = (dtype: "bf16" | "f32") =>
    encodeCombine({
      planVersion: 1,
      layer: 1,
      hidden: 300,
      tokenOffset: 0,
      totalTokens: 3,
      dtype,
      numTokens: 3,
      sums: Float32Array.from({ length: 900 }, (_, i) => Math.cos(i)),
    });
  const code = (f: () => unknown) => {
    try {
      f();
      return "ok";
    } catch (e) {
      return (e as { code?: string }).code;
    }
  };

  it.each(["bf16", "f32"] as const)(
    "a corrupted %s combine fails addCombine and decodeFrame",
    (dt) => {
      for (const at of [40, 41, 700, -1]) {
        const frame = combine(dt);
        frame[at < 0 ? frame.length - 1 : at]! ^= 0x10;
        expect(code(() => decodeFrame(frame))).toBe("EM_WIRE_CRC");
        const view = decodeReply(frame);
        if (view.kind !== "combine") throw new Error("kind");
        expect(code(() => addCombine(view, new Float32Array(900), Int32Array.of(0, 1, 2)))).toBe(
          "EM_WIRE_CRC",
        );
      }
      const view = decodeReply(combine(dt));
      if (view.kind !== "combine") throw new Error("kind");
      expect(code(() => addCombine(view, new Float32Array(900), Int32Array.of(0, 1, 2)))).toBe(
        "ok",
      );
    },
  );

  it.each(["bf16", "fp8", "f32"] as const)(
    "a corrupted %s dispatch is EM_WIRE_CRC wherever the flip (assignments or activations)",
    (dtype) => {
      const d: Dispatch = {
        dtype,
        planVersion: 1,
        layer: 1,
        hidden: 200,
        numTokens: 2,
        tokenOffset: 0,
        totalTokens: 2,
        activations: Float32Array.from({ length: 400 }, (_, i) => Math.sin(i)),
        token: Uint32Array.of(0, 1, 1),
        expert: Uint32Array.of(3, 4, 5),
        weight: Float32Array.of(0.5, 0.25, 0.25),
      };
      const good = encodeDispatch(d);
      expect(decodeFrame(good).kind).toBe("dispatch");
      // A token index byte (would be out of range), an expert, a weight, activations, scales.
      for (const at of [40, 46, 51, 76, 300, good.length - 1]) {
        const frame = good.slice();
        frame[at]! ^= 0x40;
        expect(
          code(() => decodeFrame(frame)),
          `byte ${at}`,
        ).toBe("EM_WIRE_CRC");
      }
    },
  );

  it("encodes into a reused buffer to the same bytes as a fresh one", () => {
    const x = Float32Array.from({ length: 5 * 64 }, (_, i) => Math.sin(i));
    const d = {
      dtype: "fp8" as const,
      planVersion: 2,
      layer: 1,
      hidden: 64,
      tokenOffset: 0,
      totalTokens: 3,
      x,
      rows: Int32Array.of(4, 0, 2),
      token: Uint32Array.of(0, 1, 2),
      expert: Uint32Array.of(1, 2, 3),
      weight: Float32Array.of(1, 1, 1),
    };
    const fresh = encodeDispatchRows(d);
    const used = new Uint8Array(fresh.length + 100).fill(0xa5);
    const again = encodeDispatchRows(d, 0, (n) => used.subarray(0, n));
    expect(Buffer.from(again).equals(Buffer.from(fresh))).toBe(true);
    expect(code(() => encodeDispatchRows(d, 0, (n) => used.subarray(1, n + 1)))).toBe(
      "EM_WIRE_RANGE",
    );
  });
});

describe("groupByExpert", () => {
  it("orders rows by (expert, token), ties in input order, and gathers instead of copying", () => {
    fc.assert(
      fc.property(
        fc.array(fc.record({ token: fc.nat({ max: 9 }), expert: fc.nat({ max: 6 }) }), {
          maxLength: 40,
        }),
        fc.boolean(),
        fc.boolean(),
        (pairs, sortTokens, layerKeys) => {
          if (sortTokens) pairs.sort((a, b) => a.token - b.token);
          // A shard's coalesced frames key experts as layer * 65536 + expert.
          if (layerKeys) for (const p of pairs) p.expert += 65536 * (1 + (p.expert % 3));
          const token = pairs.map((p) => p.token);
          const expert = pairs.map((p) => p.expert);
          const weight = pairs.map((_, i) => i);
          const x = new Float32Array(10 * 4);
          const g = groupByExpert(x, 4, token, expert, weight);
          const want = pairs
            .map((p, i) => ({ ...p, i }))
            .sort((a, b) => a.expert - b.expert || a.token - b.token || a.i - b.i);
          expect(Array.from(g.rowWeight)).toEqual(want.map((w) => w.i));
          expect(Array.from(g.outIndex)).toEqual(want.map((w) => w.token));
          expect(Array.from(g.xIndex)).toEqual(want.map((w) => w.token));
          expect(g.x).toBe(x);
          expect(g.experts).toEqual([...new Set(want.map((w) => w.expert))]);
          expect(Array.from(g.offsets)).toEqual([
            ...g.experts.map((e) => want.findIndex((w) => w.expert === e)),
            pairs.length,
          ]);
        },
      ),
    );
  });
});
