// The prefill job frame (gateway/prefill.ts, ADR 0029): what a decode gateway sends a prefill
// gateway. Round trips, and every malformed frame refused with EM_PREFILL_FRAME (never run);
// the prefill gateways' load reports, and which one a decode gateway picks from them.
import { describe, expect, it } from "vitest";
import {
  decodePrefillAnswer,
  decodePrefillJob,
  decodePrefillLoad,
  encodePrefillJob,
  type KnownPrefillWorker,
  type PrefillFrame,
  pickPrefillWorker,
  prefillSubjects,
  type SentPrefillJob,
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
    { ...job, id: "Zq-9_x" },
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
    ["an id not a string", header({ ...good, id: 7 }, [1, 2]), "id (1 to 64"],
    ["an id with a dot", header({ ...good, id: "a.b" }, [1, 2]), "id (1 to 64"],
    ["an empty id", header({ ...good, id: "" }, [1, 2]), "id (1 to 64"],
    ["an id too long", header({ ...good, id: "x".repeat(65) }, [1, 2]), "id (1 to 64"],
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

  it("names the subjects of one model's jobs", () => {
    const s = prefillSubjects("em.ns.m.prefill");
    expect([s.jobs, s.to("pod-1"), s.load, s.cancel]).toEqual([
      "em.ns.m.prefill",
      "em.ns.m.prefill.to.pod-1",
      "em.ns.m.prefill.load",
      "em.ns.m.prefill.cancel",
    ]);
  });

  it.each<[string, unknown, ReturnType<typeof decodePrefillLoad>]>([
    ["a load", { id: "p-1", tokens: 900, jobs: 2 }, { id: "p-1", tokens: 900, jobs: 2 }],
    ["an idle one", { id: "p_2", tokens: 0, jobs: 0 }, { id: "p_2", tokens: 0, jobs: 0 }],
    ["one that stops", { id: "p-1", gone: true }, { id: "p-1", tokens: 0, jobs: 0, gone: true }],
    ["no id", { tokens: 1, jobs: 1 }, null],
    ["an id that is no token", { id: "a.b", tokens: 1, jobs: 1 }, null],
    ["negative tokens", { id: "p", tokens: -1, jobs: 0 }, null],
    ["fractional jobs", { id: "p", tokens: 1, jobs: 0.5 }, null],
    ["not an object", "p", null],
  ])("reads a load report: %s", (_, r, want) => {
    expect(decodePrefillLoad(Buffer.from(JSON.stringify(r)))).toEqual(want);
  });
  it("reads no load report from bytes that are not JSON", () => {
    expect(decodePrefillLoad(Buffer.from("{nope"))).toBeNull();
  });
});

describe("pickPrefillWorker: the least loaded prefill gateway a decode gateway knows", () => {
  const w = (id: string, tokens: number, seenAt = 1000): KnownPrefillWorker => ({
    id,
    tokens,
    seenAt,
  });
  const sent = (worker: string, tokens: number, sentAt: number): SentPrefillJob => ({
    worker,
    tokens,
    sentAt,
  });
  const NOW = 2000;
  it.each<[string, KnownPrefillWorker[], SentPrefillJob[], number, string | null]>([
    ["none known: the queue group", [], [], 0, null],
    ["the one with fewer tokens", [w("a", 900), w("b", 100)], [], 0, "b"],
    ["a stale report is not counted", [w("a", 900), w("b", 100, NOW - 5000)], [], 0, "a"],
    ["all stale: the queue group", [w("a", 0, NOW - 4000)], [], 0, null],
    [
      "jobs sent since its report count",
      [w("a", 300), w("b", 100)],
      [sent("b", 500, 1500)],
      0,
      "a",
    ],
    [
      "jobs sent before its report are in it already",
      [w("a", 300), w("b", 100, 1600)],
      [sent("b", 500, 1500)],
      0,
      "b",
    ],
    ["jobs to an unknown gateway are ignored", [w("a", 300)], [sent("zz", 1, 1500)], 0, "a"],
    ["a tie goes by the random draw (low)", [w("a", 0), w("b", 0), w("c", 0)], [], 0, "a"],
    ["a tie goes by the random draw (high)", [w("a", 0), w("b", 0), w("c", 0)], [], 0.99, "c"],
    ["a draw of 1 stays in range", [w("a", 0), w("b", 0)], [], 1, "b"],
  ])("%s", (_, workers, jobs, draw, want) => {
    expect(pickPrefillWorker(workers, jobs, NOW, 3500, () => draw)).toBe(want);
  });
});
