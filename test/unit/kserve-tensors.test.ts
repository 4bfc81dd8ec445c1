// KServe v2 binary tensor data (src/gateway/kserve-tensors.ts): BYTES elements both ways, the
// body split at Inference-Header-Content-Length, each input's slice of the binary section,
// and compressed bodies, with the param each refusal names.
import { deflateSync, gzipSync } from "node:zlib";
import { describe, expect, it } from "vitest";
import { ApiError } from "../../src/gateway/errors.ts";
import {
  decodeBytesElements,
  encodeBytesElements,
  inflateBody,
  inputBinaries,
  responseBody,
  splitBody,
} from "../../src/gateway/kserve-tensors.ts";

const b = (...bytes: number[]) => Buffer.from(bytes);
const text = (xs: Buffer[]) => xs.map((x) => x.toString("utf8"));

/** The ApiError `f` throws, as [status, code, param]. */
function refusal(f: () => unknown): [number, string, string | null] {
  try {
    f();
  } catch (e) {
    expect(e).toBeInstanceOf(ApiError);
    const a = e as ApiError;
    return [a.status, a.code, a.param ?? null];
  }
  throw new Error("no refusal");
}

describe("BYTES elements", () => {
  // biome-ignore format: a table
  const cases: [string, string[], Buffer][] = [
    ["none", [], b()],
    ["one empty", [""], b(0, 0, 0, 0)],
    ["two", ["hi", "é"], b(2, 0, 0, 0, 0x68, 0x69, 2, 0, 0, 0, 0xc3, 0xa9)],
  ];
  it.each(cases)("%s: encode and decode", (_what, elements, bytes) => {
    expect(encodeBytesElements(elements.map((e) => Buffer.from(e)))).toEqual(bytes);
    expect(text(decodeBytesElements(bytes, "x", "p"))).toEqual(elements);
  });

  // biome-ignore format: a table
  const bad: [string, Buffer][] = [
    ["a short length", b(1, 0, 0)],
    ["a length past the end", b(9, 0, 0, 0, 65)],
    ["bytes after the last element", b(1, 0, 0, 0, 65, 0)],
  ];
  it.each(bad)("refuses %s", (_what, bytes) => {
    expect(refusal(() => decodeBytesElements(bytes, "x", "p"))).toEqual([
      400,
      "EM_GATEWAY_BAD_REQUEST",
      "p",
    ]);
  });
});

describe("splitBody", () => {
  const json = Buffer.from('{"inputs":[]}');
  it("takes the whole body as JSON without the header, the rest as binary with it", () => {
    expect(splitBody(json, undefined)).toEqual({ json: { inputs: [] }, binary: b() });
    const body = Buffer.concat([json, b(1, 2, 3)]);
    const s = splitBody(body, String(json.length));
    expect(s.json).toEqual({ inputs: [] });
    expect(s.binary).toEqual(b(1, 2, 3));
  });

  // biome-ignore format: a table
  const bad: [string, Buffer, string | undefined, string | null][] = [
    ["a header length that is no number", json, "1e3", "Inference-Header-Content-Length"],
    ["a negative header length", json, "-1", "Inference-Header-Content-Length"],
    ["a header length past the body", json, "100", "Inference-Header-Content-Length"],
    ["a JSON header cut short", json, "5", null],
    ["no JSON at all", b(0xff), undefined, null],
    ["JSON that is no object", Buffer.from("[1]"), undefined, "body"],
  ];
  it.each(bad)("refuses %s", (_what, body, header, param) => {
    expect(refusal(() => splitBody(body, header))).toEqual([400, "EM_GATEWAY_BAD_REQUEST", param]);
  });
});

describe("inputBinaries", () => {
  const sized = (size: unknown) => ({ name: "x", parameters: { binary_data_size: size } });
  it("gives each sized input its slice, in order, and null to the others", () => {
    const got = inputBinaries(
      [sized(2), { name: "json", data: [1] }, sized(0), sized(1)],
      b(1, 2, 3),
    );
    expect(got).toEqual([b(1, 2), null, b(), b(3)]);
  });

  // biome-ignore format: a table
  const bad: [string, unknown[], Buffer, string][] = [
    ["a size past the section", [sized(4)], b(1, 2, 3), "inputs.0.parameters.binary_data_size"],
    ["bytes no input takes", [sized(1)], b(1, 2), "inputs"],
    ["bytes and no sized input", [{ name: "x", data: [] }], b(1), "inputs"],
    ["a negative size", [sized(-1)], b(), "inputs.0.parameters.binary_data_size"],
    ["a fractional size", [sized(1.5)], b(1, 2), "inputs.0.parameters.binary_data_size"],
    ["a size as a string", [sized("1")], b(1), "inputs.0.parameters.binary_data_size"],
    ["data beside a size", [{ ...sized(1), data: ["a"] }], b(1), "inputs.0.data"],
  ];
  it.each(bad)("refuses %s", (_what, inputs, binary, param) => {
    expect(refusal(() => inputBinaries(inputs, binary))).toEqual([
      400,
      "EM_GATEWAY_BAD_REQUEST",
      param,
    ]);
  });
});

describe("inflateBody", () => {
  const body = Buffer.from('{"a":1}');
  it.each([
    [undefined, body],
    ["identity", body],
    ["gzip", gzipSync(body)],
    ["GZIP", gzipSync(body)],
    ["deflate", deflateSync(body)],
  ])("%s", (encoding, sent) => {
    expect(inflateBody(sent, encoding, 1024)).toEqual(body);
  });

  it("refuses other encodings (415), broken data (400) and bodies inflating past the limit (413)", () => {
    expect(refusal(() => inflateBody(body, "br", 1024))).toEqual([
      415,
      "EM_GATEWAY_BAD_REQUEST",
      "Content-Encoding",
    ]);
    expect(refusal(() => inflateBody(body, "gzip", 1024))).toEqual([
      400,
      "EM_GATEWAY_BAD_REQUEST",
      "Content-Encoding",
    ]);
    const big = gzipSync(Buffer.alloc(4096));
    expect(refusal(() => inflateBody(big, "gzip", 1024))).toEqual([
      413,
      "EM_GATEWAY_BODY_TOO_LARGE",
      null,
    ]);
  });
});

describe("responseBody", () => {
  it("puts the binary outputs after the JSON and gives the JSON's length in bytes", () => {
    const r = responseBody({ t: "é" }, [b(1), b(2, 3)]);
    expect(r.headerLength).toBe(Buffer.byteLength('{"t":"é"}'));
    expect(JSON.parse(r.body.subarray(0, r.headerLength).toString("utf8"))).toEqual({ t: "é" });
    expect(r.body.subarray(r.headerLength)).toEqual(b(1, 2, 3));
  });
});
