// Property-based tests of the wire codec (docs/wire-format.md): round trips for every
// dtype, splitting under max_payload, and corrupted or truncated input that must always
// end in an ExpertMeshError with an EM_WIRE_* code, never another exception.
import { crc32 } from "node:zlib";
import fc from "fast-check";
import { describe, expect, it } from "vitest";
import { bf16ToFloat32, float32ToBf16 } from "../../src/model/floats.ts";
import {
  type Combine,
  type Dispatch,
  decodeFrame,
  dispatchFrameBytes,
  encodeCombine,
  encodeDispatch,
  encodeError,
  HEADER_BYTES,
  joinCombines,
  requestBytes,
  splitDispatch,
} from "../../src/moe/wire.ts";
import { ExpertMeshError } from "../../src/util/errors.ts";

const finite = fc.float({ min: -1000, max: 1000, noNaN: true, noDefaultInfinity: true });

/** A random dispatch: tokens, widths, top-k assignments with distinct experts per token. */
const dispatchArb = (dtype: Dispatch["dtype"]) =>
  fc
    .record({
      numTokens: fc.integer({ min: 1, max: 12 }),
      hidden: fc.integer({ min: 1, max: 300 }),
      topK: fc.integer({ min: 1, max: 4 }),
      seed: fc.integer(),
    })
    .chain(({ numTokens, hidden, topK }) =>
      fc.record({
        activations: fc.float32Array({
          minLength: numTokens * hidden,
          maxLength: numTokens * hidden,
          min: -1000,
          max: 1000,
          noNaN: true,
          noDefaultInfinity: true,
        }),
        experts: fc.array(
          fc.uniqueArray(fc.integer({ min: 0, max: 255 }), { minLength: topK, maxLength: topK }),
          { minLength: numTokens, maxLength: numTokens },
        ),
        weights: fc.array(finite, { minLength: numTokens * topK, maxLength: numTokens * topK }),
        planVersion: fc.integer({ min: 1, max: 2 ** 31 }),
        layer: fc.integer({ min: 0, max: 200 }),
        numTokens: fc.constant(numTokens),
        hidden: fc.constant(hidden),
      }),
    )
    .map(
      ({ activations, experts, weights, planVersion, layer, numTokens, hidden }): Dispatch => ({
        dtype,
        planVersion,
        layer,
        hidden,
        numTokens,
        tokenOffset: 0,
        totalTokens: numTokens,
        activations,
        token: Uint32Array.from(experts.flatMap((e, t) => e.map(() => t))),
        expert: Uint32Array.from(experts.flat()),
        weight: Float32Array.from(weights),
      }),
    );

function code(f: () => unknown): string {
  try {
    f();
  } catch (err) {
    if (err instanceof ExpertMeshError) return err.code;
    return `NOT AN ExpertMeshError: ${String(err)}`;
  }
  return "no error";
}

describe("wire codec", () => {
  it("round-trips bf16 dispatches exactly (to bf16 precision)", () => {
    fc.assert(
      fc.property(dispatchArb("bf16"), (d) => {
        const f = decodeFrame(encodeDispatch(d));
        if (f.kind !== "dispatch") throw new Error(f.kind);
        expect(f.activations).toEqual(
          Float32Array.from(d.activations, (x) => bf16ToFloat32(float32ToBf16(x))),
        );
        expect([f.planVersion, f.layer, f.hidden, f.numTokens]).toEqual([
          d.planVersion,
          d.layer,
          d.hidden,
          d.numTokens,
        ]);
        expect(f.token).toEqual(d.token);
        expect(f.expert).toEqual(d.expert);
        expect(f.weight).toEqual(d.weight);
      }),
    );
  });

  it("decodes frames that sit inside a larger Node Buffer (as NATS delivers them)", () => {
    fc.assert(
      fc.property(dispatchArb("fp8"), fc.nat({ max: 64 }), (d, pad) => {
        const frame = encodeDispatch(d);
        const pool = Buffer.alloc(pad + frame.length + 16, 0x4d);
        pool.set(frame, pad);
        const f = decodeFrame(pool.subarray(pad, pad + frame.length));
        const g = decodeFrame(frame);
        expect(f).toEqual(g);
      }),
    );
  });

  it("round-trips f32 dispatches bit for bit", () => {
    fc.assert(
      fc.property(dispatchArb("f32"), (d) => {
        const f = decodeFrame(encodeDispatch(d));
        expect(f.kind === "dispatch" && f.activations).toEqual(d.activations);
      }),
    );
  });

  it("round-trips fp8 dispatches within e4m3's precision of each 128-block's scale", () => {
    fc.assert(
      fc.property(dispatchArb("fp8"), (d) => {
        const f = decodeFrame(encodeDispatch(d));
        if (f.kind !== "dispatch") throw new Error(f.kind);
        for (let t = 0; t < d.numTokens; t++) {
          for (let b = 0; b < d.hidden; b += 128) {
            const idx = [...Array(Math.min(128, d.hidden - b)).keys()].map(
              (j) => t * d.hidden + b + j,
            );
            const amax = Math.max(...idx.map((i) => Math.abs(d.activations[i]!)));
            // e4m3 keeps 3 mantissa bits: relative error <= 2^-4; subnormals below 2^-6 of the scale.
            for (const i of idx) {
              const x = d.activations[i]!;
              expect(Math.abs(f.activations[i]! - x)).toBeLessThanOrEqual(
                Math.abs(x) / 16 + (amax / 448) * 2 ** -9 + 1e-30,
              );
            }
          }
        }
      }),
    );
  });

  it("halves dispatch bytes with fp8 at hidden 7168, top-8", () => {
    const bf16 = dispatchFrameBytes("bf16", 64, 7168, 64 * 8);
    const fp8 = dispatchFrameBytes("fp8", 64, 7168, 64 * 8);
    expect(fp8 / bf16).toBeCloseTo(0.52, 2);
  });

  it.each(["bf16", "f32"] as const)("round-trips %s combine frames", (dtype) => {
    fc.assert(
      fc.property(
        fc.integer({ min: 0, max: 8 }),
        fc.integer({ min: 1, max: 64 }),
        (numTokens, hidden) => {
          const sums = Float32Array.from(
            { length: numTokens * hidden },
            (_, i) => Math.sin(i) * 100,
          );
          const c: Combine = {
            dtype,
            planVersion: 7,
            layer: 3,
            hidden,
            numTokens,
            tokenOffset: 0,
            totalTokens: numTokens,
            sums,
          };
          const f = decodeFrame(encodeCombine(c));
          const want =
            dtype === "f32"
              ? sums
              : Float32Array.from(sums, (x) => bf16ToFloat32(float32ToBf16(x)));
          expect(f.kind === "combine" && f.sums).toEqual(want);
        },
      ),
    );
  });

  it("round-trips error frames", () => {
    const f = decodeFrame(encodeError("EM_WIRE_PLAN_VERSION", "plan v3 not loaded", 3, 9));
    expect(f).toEqual({
      kind: "error",
      planVersion: 3,
      layer: 9,
      code: "EM_WIRE_PLAN_VERSION",
      message: "plan v3 not loaded",
    });
  });

  it("splits under max_payload (dispatch and reply) and reassembles to the same tokens", () => {
    fc.assert(
      fc.property(dispatchArb("bf16"), fc.integer({ min: 0, max: 4000 }), (d, extra) => {
        // f32 sums are twice the bf16 activations: the replies bound the split.
        const maxPayload = requestBytes("bf16", "f32", 1, d.hidden, 4) + extra;
        const parts = splitDispatch(d, maxPayload, "f32");
        const frames = parts.map((p) => encodeDispatch(p));
        for (const f of frames) expect(f.byteLength).toBeLessThanOrEqual(maxPayload);
        // A shard echoes each token's activations: joining the replies gives them all back in order.
        const replies = frames.map((buf) => {
          const f = decodeFrame(buf);
          if (f.kind !== "dispatch") throw new Error(f.kind);
          expect(f.expert.length).toBe(f.token.length);
          const reply = encodeCombine({ ...f, dtype: "f32", sums: f.activations });
          expect(reply.byteLength).toBeLessThanOrEqual(maxPayload);
          return decodeFrame(reply) as Combine & { kind: "combine" };
        });
        const joined = joinCombines(replies.reverse(), d);
        expect(joined).toEqual(
          Float32Array.from(d.activations, (x) => bf16ToFloat32(float32ToBf16(x))),
        );
        expect(parts.reduce((n, p) => n + p.token.length, 0)).toBe(d.token.length);
      }),
    );
  });

  it("rejects replies that miss or repeat tokens, or come from another plan", () => {
    const c = (tokenOffset: number, numTokens: number, planVersion = 1): Combine => ({
      dtype: "f32",
      planVersion,
      layer: 0,
      hidden: 2,
      tokenOffset,
      numTokens,
      totalTokens: 4,
      sums: new Float32Array(2 * numTokens),
    });
    const expectation = { planVersion: 1, layer: 0, hidden: 2, totalTokens: 4 };
    expect(code(() => joinCombines([c(0, 2)], expectation))).toBe("EM_WIRE_RANGE");
    expect(code(() => joinCombines([c(0, 3), c(2, 2)], expectation))).toBe("EM_WIRE_RANGE");
    expect(code(() => joinCombines([c(0, 2), c(2, 2, 2)], expectation))).toBe(
      "EM_WIRE_PLAN_VERSION",
    );
  });

  it("rejects every truncation with EM_WIRE_TRUNCATED", () => {
    fc.assert(
      fc.property(dispatchArb("fp8"), fc.nat(), (d, cut) => {
        const buf = encodeDispatch(d);
        const len = cut % buf.byteLength;
        expect(code(() => decodeFrame(buf.subarray(0, len)))).toBe("EM_WIRE_TRUNCATED");
      }),
    );
  });

  it("rejects extra bytes with EM_WIRE_LENGTH (checksum fixed up so only the length is wrong)", () => {
    const buf = encodeDispatch({
      dtype: "bf16",
      planVersion: 1,
      layer: 0,
      hidden: 4,
      numTokens: 1,
      tokenOffset: 0,
      totalTokens: 1,
      activations: new Float32Array(4),
      token: Uint32Array.of(0),
      expert: Uint32Array.of(3),
      weight: Float32Array.of(1),
    });
    const longer = new Uint8Array(buf.length + 2);
    longer.set(buf);
    new DataView(longer.buffer).setUint32(36, crc32(longer.subarray(HEADER_BYTES)), true);
    expect(code(() => decodeFrame(longer))).toBe("EM_WIRE_LENGTH");
  });

  it("never throws anything but an EM_WIRE error on corrupted bytes", () => {
    fc.assert(
      fc.property(
        dispatchArb("bf16"),
        fc.array(fc.tuple(fc.nat(), fc.integer({ min: 1, max: 255 })), {
          minLength: 1,
          maxLength: 8,
        }),
        (d, flips) => {
          const buf = encodeDispatch(d);
          for (const [pos, x] of flips) buf[pos % buf.length]! ^= x;
          const c = code(() => decodeFrame(buf));
          // A flip may, rarely, leave a valid frame (e.g. two flips cancelling): then no error.
          expect(c === "no error" || c.startsWith("EM_WIRE_")).toBe(true);
        },
      ),
      { numRuns: 500 },
    );
  });

  it.each([
    [
      "random bytes",
      () => Uint8Array.from({ length: 100 }, (_, i) => (i * 37) & 255),
      "EM_WIRE_MAGIC",
    ],
    ["empty", () => new Uint8Array(0), "EM_WIRE_TRUNCATED"],
    [
      "future version",
      () => {
        const b = encodeError("X", "y");
        b[4] = 2;
        return b;
      },
      "EM_WIRE_VERSION",
    ],
    [
      "unknown dtype",
      () => {
        const b = encodeError("X", "y");
        b[6] = 9;
        return b;
      },
      "EM_WIRE_DTYPE",
    ],
    [
      "flipped body byte",
      () => {
        const b = encodeError("X", "y");
        b[HEADER_BYTES + 2]! ^= 1;
        return b;
      },
      "EM_WIRE_CRC",
    ],
  ])("rejects %s", (_name, make, want) => {
    expect(code(() => decodeFrame(make()))).toBe(want);
  });
});

describe("fp8 activation codes", () => {
  it("agree with float32ToE4m3 on every float the quantizer can see", async () => {
    const { float32ToE4m3 } = await import("../../src/model/floats.ts");
    const { quantizeActivations } = await import("../../src/moe/wire.ts");
    fc.assert(
      fc.property(
        fc.float32Array({ minLength: 128, maxLength: 128, noNaN: true, noDefaultInfinity: true }),
        (x) => {
          const { codes, scales } = quantizeActivations(x, 1, 128);
          // float32 arithmetic, as docs/wire-format.md defines the quantizer.
          const inv = Math.fround(1 / scales[0]!);
          for (let i = 0; i < 128; i++)
            expect(codes[i], `x=${x[i]}`).toBe(float32ToE4m3(Math.fround(x[i]! * inv)));
        },
      ),
      { numRuns: 300 },
    );
  });
});
