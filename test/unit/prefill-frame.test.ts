// The prefill job frame (gateway/prefill.ts, ADR 0029): what a decode gateway sends a prefill
// gateway. Round trips, and every malformed frame refused with EM_PREFILL_FRAME (never run).
import { describe, expect, it } from "vitest";
import {
  decodePrefillAnswer,
  decodePrefillJob,
  encodePrefillJob,
  type PrefillFrame,
} from "../../src/gateway/prefill.ts";

const job: PrefillFrame = {
  fingerprint: "0123abcd",
  cacheSalt: null,
  priority: 0,
  prompt: [0, 1, 2, 65_535, 2 ** 32 - 1],
};
const header = (h: unknown, tokens: number[] = []) => {
  const json = Buffer.from(typeof h === "string" ? h : JSON.stringify(h));
  const out = Buffer.alloc(9 + json.length + 4 * tokens.length);
  out.write("EMPF", 0, "latin1");
  out.writeUInt8(1, 4);
  out.writeUInt32LE(json.length, 5);
  json.copy(out, 9);
  for (const [i, t] of tokens.entries()) out.writeUInt32LE(t, 9 + json.length + 4 * i);
  return out;
};

describe("prefill job frame", () => {
  it.each<PrefillFrame>([
    job,
    { ...job, cacheSalt: "tenant-7 \u00e9", priority: -5 },
    { ...job, prompt: [42] },
    { ...job, priority: 2 ** 40, prompt: Array.from({ length: 5000 }, (_, i) => i * 7) },
  ])("round trips %#", (j) => {
    expect(decodePrefillJob(encodePrefillJob(j))).toEqual(j);
  });

  const good = { fingerprint: "f", cacheSalt: null, priority: 0, tokens: 2 };
  it.each<[string, Uint8Array, string]>([
    ["empty", new Uint8Array(0), "not a prefill job frame"],
    ["another magic", Buffer.from("EMWF\u0001\0\0\0\0"), "not a prefill job frame"],
    [
      "another version",
      (() => {
        const b = header(good, [1, 2]);
        b.writeUInt8(2, 4);
        return b;
      })(),
      "version 2",
    ],
    [
      "a header past the frame",
      (() => {
        const b = header(good, [1, 2]);
        b.writeUInt32LE(1000, 5);
        return b;
      })(),
      "a header of 1000 bytes",
    ],
    ["a header not JSON", header("{nope", [1, 2]), "not JSON"],
    ["a header not an object", header([1, 2], [1, 2]), "not a JSON object"],
    ["no fingerprint", header({ ...good, fingerprint: 3 }, [1, 2]), "no fingerprint"],
    ["a salt not a string", header({ ...good, cacheSalt: 5 }, [1, 2]), "cacheSalt"],
    ["a priority not an integer", header({ ...good, priority: 0.5 }, [1, 2]), "priority"],
    ["no tokens", header({ ...good, tokens: 0 }), "tokens"],
    ["fewer token bytes", header(good, [1]), "2 tokens need 8 bytes"],
    ["more token bytes", header(good, [1, 2, 3]), "2 tokens need 8 bytes"],
  ])("refuses %s", (_, data, message) => {
    expect(() => decodePrefillJob(data)).toThrow(
      expect.objectContaining({
        code: "EM_PREFILL_FRAME",
        message: expect.stringContaining(message),
      }),
    );
  });

  it.each<[string, unknown, boolean]>([
    ["done", { ok: true, shared: 3, blocks: 3, ms: 12.5 }, true],
    ["refused", { ok: false, code: "EM_PREFILL_MISMATCH", message: "x" }, true],
    ["no counts", { ok: true }, false],
    ["no code", { ok: false }, false],
    ["not an answer", [1], false],
  ])("reads an answer: %s", (_, a, valid) => {
    const data = Buffer.from(JSON.stringify(a));
    if (valid) expect(decodePrefillAnswer(data)).toEqual(a);
    else
      expect(() => decodePrefillAnswer(data)).toThrow(
        expect.objectContaining({ code: "EM_PREFILL_FRAME" }),
      );
  });
});
