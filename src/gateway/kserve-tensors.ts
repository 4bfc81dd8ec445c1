// KServe v2 tensor data outside JSON, for gRPC (raw_input_contents, raw_output_contents) and
// REST (Triton's binary tensor data extension), and the REST body that carries it:
//
//   body = JSON header (Inference-Header-Content-Length bytes) + binary section
//
// Each input whose `parameters.binary_data_size` is set has no `data`: its bytes are the next
// that many bytes of the binary section, in the order of `inputs`. Outputs asked for in binary
// (`parameters.binary_data` on the output, or `binary_data_output` on the request) come back
// the same way: `parameters.binary_data_size` in the JSON, the bytes after it. A BYTES
// tensor's bytes are its elements in row-major order, each a 4-byte little-endian length and
// then its bytes. Compressed bodies (Content-Encoding gzip or deflate, as Triton's client
// sends with request_compression_algorithm) are inflated first, within the body limit.
import { gunzipSync, inflateSync } from "node:zlib";
import { isObject } from "../util/objects.ts";
import { ApiError } from "./errors.ts";
import { bad } from "./text-model.ts";

/** The header naming the JSON part's length in bytes. */
export const HEADER_LENGTH = "inference-header-content-length";

/** BYTES elements from their binary form; anything else in `buf` is a 400 naming `param`. */
export function decodeBytesElements(buf: Buffer, what: string, param: string): Buffer[] {
  const out: Buffer[] = [];
  let at = 0;
  while (at + 4 <= buf.length) {
    const n = buf.readUInt32LE(at);
    if (at + 4 + n > buf.length) break;
    out.push(buf.subarray(at + 4, at + 4 + n));
    at += 4 + n;
  }
  if (at !== buf.length)
    throw bad(`${what} is not BYTES elements (each a 4-byte length, then its bytes)`, param);
  return out;
}

/** BYTES elements in binary form. */
export function encodeBytesElements(elements: readonly Buffer[]): Buffer {
  const parts: Buffer[] = [];
  for (const e of elements) {
    const len = Buffer.alloc(4);
    len.writeUInt32LE(e.length);
    parts.push(len, e);
  }
  return Buffer.concat(parts);
}

/** The body as sent, inflated when it says it is compressed (at most `limit` bytes). */
export function inflateBody(body: Buffer, encoding: string | undefined, limit: number): Buffer {
  const e = (encoding ?? "identity").trim().toLowerCase();
  if (e === "identity" || e === "") return body;
  if (e !== "gzip" && e !== "deflate")
    throw new ApiError(
      "EM_GATEWAY_BAD_REQUEST",
      `Content-Encoding '${encoding}' is not supported here (gzip, deflate or none)`,
      { status: 415, param: "Content-Encoding" },
    );
  try {
    return e === "gzip"
      ? gunzipSync(body, { maxOutputLength: limit })
      : inflateSync(body, { maxOutputLength: limit });
  } catch (err) {
    if ((err as { code?: string }).code === "ERR_BUFFER_TOO_LARGE")
      throw new ApiError(
        "EM_GATEWAY_BODY_TOO_LARGE",
        `the request body inflates to more than ${limit} bytes`,
      );
    throw bad(`the request body is not valid ${e} data`, "Content-Encoding");
  }
}

export interface InferBody {
  readonly json: Record<string, unknown>;
  /** The bytes after the JSON header (empty without the header). */
  readonly binary: Buffer;
}

/** Splits a body at Inference-Header-Content-Length (absent: all of it is JSON). */
export function splitBody(body: Buffer, headerLength: string | undefined): InferBody {
  let jsonBytes = body.length;
  if (headerLength !== undefined) {
    const n = /^\d+$/.test(headerLength.trim()) ? Number(headerLength) : Number.NaN;
    if (!Number.isSafeInteger(n) || n > body.length)
      throw bad(
        `Inference-Header-Content-Length must be the JSON header's length in bytes, at most the body's ${body.length}; got '${headerLength}'`,
        "Inference-Header-Content-Length",
      );
    jsonBytes = n;
  }
  let json: unknown;
  try {
    json = JSON.parse(body.subarray(0, jsonBytes).toString("utf8"));
  } catch (err) {
    throw new ApiError(
      "EM_GATEWAY_BAD_REQUEST",
      `the request's JSON header is not JSON: ${(err as Error).message}`,
    );
  }
  if (!isObject(json)) throw bad("the request body must be a JSON object", "body");
  return { json, binary: body.subarray(jsonBytes) };
}

/**
 * Each input's bytes from the binary section (null: its data is in the JSON). The sizes must
 * use the section exactly.
 */
export function inputBinaries(inputs: readonly unknown[], binary: Buffer): (Buffer | null)[] {
  let at = 0;
  const out = inputs.map((t, i) => {
    const size =
      isObject(t) && isObject(t["parameters"]) ? t["parameters"]["binary_data_size"] : undefined;
    if (size === undefined || size === null) return null;
    const param = `inputs.${i}.parameters.binary_data_size`;
    if (!Number.isSafeInteger(size) || (size as number) < 0)
      throw bad(`binary_data_size must be an integer >= 0, got ${JSON.stringify(size)}`, param);
    if (isObject(t) && t["data"] !== undefined)
      throw bad(`input ${i} has both data and binary_data_size: give one`, `inputs.${i}.data`);
    if (at + (size as number) > binary.length)
      throw bad(
        `the inputs' binary_data_size add up to more than the ${binary.length} bytes after the JSON header`,
        param,
      );
    const slice = binary.subarray(at, at + (size as number));
    at += size as number;
    return slice;
  });
  if (at !== binary.length)
    throw bad(
      `${binary.length - at} bytes after the JSON header belong to no input (binary_data_size adds up to ${at})`,
      "inputs",
    );
  return out;
}

/** A response body: the JSON, then the binary outputs' bytes, with the JSON's length. */
export function responseBody(
  json: unknown,
  binaries: readonly Buffer[],
): { body: Buffer; headerLength: number } {
  const head = Buffer.from(JSON.stringify(json), "utf8");
  return { body: Buffer.concat([head, ...binaries]), headerLength: head.length };
}
