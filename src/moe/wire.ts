// Binary frames between gateways and shards: see docs/wire-format.md (the layout is
// written there once; this file follows it field by field).
import { type ErrorCode, ExpertMeshError } from "../util/errors.ts";
import { FP8_GROUP, gatherRows, quantizeActivations, rowBytes, wireCodec } from "./codec.ts";

export { FP8_GROUP, quantizeActivations };

export const WIRE_MAGIC = 0x46574d45;
export const WIRE_VERSION = 1;
export const HEADER_BYTES = 40;
const MAX_HIDDEN = 65536;

/** Header flag of a dispatch frame: reply with f32 sums (default bf16). */
export const FLAG_COMBINE_F32 = 1;

export const FrameKind = { dispatch: 1, combine: 2, error: 3 } as const;
export const WireDtype = { bf16: 1, fp8: 2, f32: 3 } as const;
export type WireDtypeName = keyof typeof WireDtype;

/** Fields every frame carries. */
export interface FrameHeader {
  planVersion: number;
  layer: number;
  hidden: number;
  /** Index of the frame's first token in the whole request, and the request's size. */
  tokenOffset: number;
  totalTokens: number;
}

/** Tokens routed to one shard: activations [numTokens, hidden] and (token, expert, weight) triples. */
export interface Dispatch extends FrameHeader {
  dtype: WireDtypeName;
  numTokens: number;
  /** [numTokens * hidden] */
  activations: Float32Array;
  token: Uint32Array;
  expert: Uint32Array;
  weight: Float32Array;
}

/** A shard's weighted partial sums, [numTokens * hidden]. */
export interface Combine extends FrameHeader {
  dtype: "bf16" | "f32";
  numTokens: number;
  sums: Float32Array;
}

export interface ErrorFrame {
  kind: "error";
  planVersion: number;
  layer: number;
  code: string;
  message: string;
}

export type Frame =
  | ({ kind: "dispatch" } & Dispatch)
  | ({ kind: "combine" } & Combine)
  | ErrorFrame;

function fail(code: ErrorCode, message: string): never {
  throw new ExpertMeshError(code, message);
}

function activationBytes(dtype: WireDtypeName, numTokens: number, hidden: number): number {
  return rowBytes(dtype, numTokens, hidden);
}

/**
 * A frame buffer of n bytes, not zero-filled: every encoder writes all of it (header,
 * then body). Its own ArrayBuffer at offset 0, so typed-array views of the body align.
 */
function allocFrame(n: number): Uint8Array {
  const b = Buffer.allocUnsafeSlow(n);
  return new Uint8Array(b.buffer, b.byteOffset, n);
}

/** Bytes of a dispatch frame (for splitting under max_payload). */
export function dispatchFrameBytes(
  dtype: WireDtypeName,
  numTokens: number,
  hidden: number,
  numAssignments: number,
): number {
  return HEADER_BYTES + 12 * numAssignments + activationBytes(dtype, numTokens, hidden);
}

function writeHeader(
  buf: Uint8Array,
  kind: number,
  dtype: number,
  h: FrameHeader,
  numTokens: number,
  numAssignments: number,
): DataView {
  const v = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  v.setUint32(0, WIRE_MAGIC, true);
  v.setUint8(4, WIRE_VERSION);
  v.setUint8(5, kind);
  v.setUint8(6, dtype);
  v.setUint8(7, 0);
  v.setUint32(8, h.planVersion, true);
  v.setUint32(12, h.layer, true);
  v.setUint32(16, h.hidden, true);
  v.setUint32(20, numTokens, true);
  v.setUint32(24, numAssignments, true);
  v.setUint32(28, h.tokenOffset, true);
  v.setUint32(32, h.totalTokens, true);
  return v;
}

function seal(buf: Uint8Array, v: DataView): Uint8Array {
  v.setUint32(36, wireCodec().crc32(buf.subarray(HEADER_BYTES)), true);
  return buf;
}

/** Copies `src`'s bytes into `dst` at `offset` (any typed array). */
function put(dst: Uint8Array, offset: number, src: ArrayBufferView): number {
  dst.set(new Uint8Array(src.buffer, src.byteOffset, src.byteLength), offset);
  return offset + src.byteLength;
}

/** Encodes a dispatch frame; `flags` is FLAG_COMBINE_F32 to ask for f32 sums. */
export function encodeDispatch(d: Dispatch, flags = 0): Uint8Array {
  if (d.activations.length !== d.numTokens * d.hidden)
    fail(
      "EM_WIRE_RANGE",
      `activations hold ${d.activations.length} values, expected ${d.numTokens} x ${d.hidden}`,
    );
  return writeDispatch(d, d.activations, null, flags);
}

/**
 * Activation rows already converted to their wire bytes (encodeTable): `bytes` is the
 * activation section of a frame holding all `rows` of them (fp8: every row's codes, then
 * every row's scales). Each token is converted once however many shards it goes to; each
 * shard's frame copies its rows.
 */
export interface WireTable {
  dtype: WireDtypeName;
  hidden: number;
  rows: number;
  bytes: Uint8Array;
}

/**
 * x [rows, hidden] in the wire bytes of `dtype`, for encodeDispatchRows; `alloc` gives the
 * table's buffer of n bytes (any contents, every byte is written; the caller may reuse it
 * once the frames are encoded).
 */
export function encodeTable(
  x: Float32Array,
  hidden: number,
  dtype: WireDtypeName,
  alloc: (n: number) => Uint8Array = (n) => new Uint8Array(n),
): WireTable {
  if (hidden < 1 || x.length % hidden !== 0)
    fail("EM_WIRE_RANGE", `x holds ${x.length} values, not rows of ${hidden}`);
  const rows = x.length / hidden;
  if (dtype === "f32")
    return { dtype, hidden, rows, bytes: new Uint8Array(x.buffer, x.byteOffset, x.byteLength) };
  const bytes = alloc(activationBytes(dtype, rows, hidden));
  wireCodec().pack(x, hidden, null, dtype, bytes, null);
  return { dtype, hidden, rows, bytes };
}

/**
 * A dispatch whose activations are rows of a larger table, read in place: frame token i
 * is row `rows[i]` of `x` (so a sender need not copy each shard's rows out first), floats
 * or a WireTable of the frame's dtype and width.
 */
export interface DispatchRows extends FrameHeader {
  dtype: WireDtypeName;
  /** [*, hidden] */
  x: Float32Array | WireTable;
  /** [numTokens] row of x of each frame token. */
  rows: Int32Array;
  token: Uint32Array;
  expert: Uint32Array;
  weight: Float32Array;
}

/**
 * Encodes a dispatch frame from rows of a table (the same bytes as encodeDispatch of the
 * copied rows). `alloc` gives the frame's buffer of n bytes (a Uint8Array at offset 0 of
 * its ArrayBuffer, so typed views of the body align; any contents, every byte is written):
 * a sender may hand back a buffer of an earlier frame whose reply has arrived.
 */
export function encodeDispatchRows(
  d: DispatchRows,
  flags = 0,
  alloc: (n: number) => Uint8Array = allocFrame,
): Uint8Array {
  let xRows: number;
  if (d.x instanceof Float32Array) {
    if (d.x.length % d.hidden !== 0)
      fail("EM_WIRE_RANGE", `x holds ${d.x.length} values, not rows of ${d.hidden}`);
    xRows = d.x.length / d.hidden;
  } else {
    if (d.x.dtype !== d.dtype || d.x.hidden !== d.hidden)
      fail(
        "EM_WIRE_RANGE",
        `table of ${d.x.dtype} x ${d.x.hidden} for a ${d.dtype} frame of hidden ${d.hidden}`,
      );
    xRows = d.x.rows;
  }
  for (const r of d.rows)
    if (r < 0 || r >= xRows) fail("EM_WIRE_RANGE", `row ${r} outside x's ${xRows} rows`);
  return writeDispatch({ ...d, numTokens: d.rows.length }, d.x, d.rows, flags, alloc);
}

/** Writes the activations of rows `rows` of table `t` into `out`; returns the CRC continued from `crc`. */
function gatherTable(t: WireTable, rows: Int32Array, out: Uint8Array, crc: number): number {
  const codec = wireCodec();
  if (t.dtype !== "fp8") {
    const rb = rowBytes(t.dtype, 1, t.hidden);
    return gatherRows(codec, t.bytes, rb, rows, out, crc);
  }
  // fp8: the codes of the rows, then their scales.
  const codes = rows.length * t.hidden;
  crc = gatherRows(codec, t.bytes, t.hidden, rows, out.subarray(0, codes), crc);
  const scaleBytes = 4 * Math.ceil(t.hidden / FP8_GROUP);
  const scales = t.bytes.subarray(t.rows * t.hidden);
  return gatherRows(codec, scales, scaleBytes, rows, out.subarray(codes), crc);
}

function writeDispatch(
  d: FrameHeader & {
    dtype: WireDtypeName;
    numTokens: number;
    token: Uint32Array;
    expert: Uint32Array;
    weight: Float32Array;
  },
  x: Float32Array | WireTable,
  rows: Int32Array | null,
  flags: number,
  alloc: (n: number) => Uint8Array = allocFrame,
): Uint8Array {
  const n = d.token.length;
  if (d.expert.length !== n || d.weight.length !== n)
    fail("EM_WIRE_RANGE", "token, expert and weight arrays differ in length");
  const size = dispatchFrameBytes(d.dtype, d.numTokens, d.hidden, n);
  const buf = alloc(size);
  if (buf.byteLength !== size || buf.byteOffset !== 0)
    fail(
      "EM_WIRE_RANGE",
      `frame buffer of ${buf.byteLength} bytes at ${buf.byteOffset}, need ${size} at 0`,
    );
  const v = writeHeader(buf, FrameKind.dispatch, WireDtype[d.dtype], d, d.numTokens, n);
  v.setUint8(7, flags);
  let o = HEADER_BYTES;
  o = put(buf, o, d.token);
  o = put(buf, o, d.expert);
  o = put(buf, o, d.weight);
  const codec = wireCodec();
  const head = codec.crc32(buf.subarray(HEADER_BYTES, o));
  // A table is only ever read through rows (encodeDispatchRows).
  const crc =
    x instanceof Float32Array
      ? codec.pack(x, d.hidden, rows, d.dtype, buf.subarray(o), head)
      : gatherTable(x, rows!, buf.subarray(o), head);
  v.setUint32(36, crc, true);
  return buf;
}

/** Encodes a combine (reply) frame; `alloc` as for encodeDispatchRows. */
export function encodeCombine(
  c: Combine,
  alloc: (n: number) => Uint8Array = allocFrame,
): Uint8Array {
  if (c.sums.length !== c.numTokens * c.hidden)
    fail(
      "EM_WIRE_RANGE",
      `sums hold ${c.sums.length} values, expected ${c.numTokens} x ${c.hidden}`,
    );
  const size = HEADER_BYTES + activationBytes(c.dtype, c.numTokens, c.hidden);
  const buf = alloc(size);
  if (buf.byteLength !== size || buf.byteOffset !== 0)
    fail(
      "EM_WIRE_RANGE",
      `frame buffer of ${buf.byteLength} bytes at ${buf.byteOffset}, need ${size} at 0`,
    );
  const v = writeHeader(buf, FrameKind.combine, WireDtype[c.dtype], c, c.numTokens, 0);
  const crc = wireCodec().pack(c.sums, c.hidden, null, c.dtype, buf.subarray(HEADER_BYTES), 0);
  v.setUint32(36, crc, true);
  return buf;
}

/** Encodes an error reply. */
export function encodeError(code: string, message: string, planVersion = 0, layer = 0): Uint8Array {
  const body = new TextEncoder().encode(JSON.stringify({ code, message }));
  const buf = allocFrame(HEADER_BYTES + body.length);
  const v = writeHeader(
    buf,
    FrameKind.error,
    WireDtype.f32,
    { planVersion, layer, hidden: 1, tokenOffset: 0, totalTokens: 0 },
    0,
    0,
  );
  put(buf, HEADER_BYTES, body);
  return seal(buf, v);
}

/**
 * A combine frame whose header and length are checked but whose body is not yet converted
 * nor checksummed: `body` holds its sums' wire bytes, `crc` the header's CRC-32 of them
 * (addCombine checks it in the pass that adds the sums).
 */
export interface CombineView extends FrameHeader {
  kind: "combine";
  dtype: "bf16" | "f32";
  numTokens: number;
  body: Uint8Array;
  crc: number;
}

/**
 * Decodes and validates any frame. Throws ExpertMeshError with an EM_WIRE_* code for
 * anything malformed; never anything else. `alloc(n)` gives n float32 values (any
 * contents: every element is written), e.g. from a shard's pool: a dispatch's activations
 * and, after them, its assignment arrays (views of the same buffer).
 */
export function decodeFrame(buf: Uint8Array, alloc: (n: number) => Float32Array = allocF32): Frame {
  return parseFrame(buf, false, alloc) as Frame;
}

/**
 * Like decodeFrame (the same checks, the same errors), but a combine frame comes back
 * unconverted, for addCombine to add straight into the caller's sums; its checksum is
 * checked there (EM_WIRE_CRC), in the same pass.
 */
export function decodeReply(buf: Uint8Array): Exclude<Frame, { kind: "combine" }> | CombineView {
  return parseFrame(buf, true, allocF32) as Exclude<Frame, { kind: "combine" }> | CombineView;
}

/**
 * out[outIndex[i]] += sums of token i of the combine, for its numTokens tokens, checking
 * the body's CRC-32 while reading it. Throws EM_WIRE_CRC on a mismatch, after the rows were
 * added: the caller must then discard `out` (the dispatcher fails the layer).
 */
export function addCombine(c: CombineView, out: Float32Array, outIndex: Int32Array): void {
  if (outIndex.length !== c.numTokens)
    fail("EM_WIRE_RANGE", `${outIndex.length} output rows for ${c.numTokens} tokens`);
  const crc = wireCodec().unpackCrc(c.body, c.dtype, c.numTokens, out, c.hidden, outIndex, true, 0);
  if (crc !== c.crc) fail("EM_WIRE_CRC", "frame body checksum mismatch (corrupted in transit?)");
}

/** A Float32Array of n elements, not zero-filled (the caller writes every element). */
function allocF32(n: number): Float32Array {
  return new Float32Array(Buffer.allocUnsafeSlow(4 * n).buffer, 0, n);
}

function parseFrame(
  buf: Uint8Array,
  lazyCombine: boolean,
  alloc: (n: number) => Float32Array,
): Frame | CombineView {
  if (buf.byteLength < HEADER_BYTES)
    fail(
      "EM_WIRE_TRUNCATED",
      `frame of ${buf.byteLength} bytes is shorter than the ${HEADER_BYTES}-byte header`,
    );
  const v = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  if (v.getUint32(0, true) !== WIRE_MAGIC)
    fail("EM_WIRE_MAGIC", "not an expertmesh frame (bad magic)");
  const version = v.getUint8(4);
  if (version !== WIRE_VERSION)
    fail("EM_WIRE_VERSION", `frame version ${version}, this build speaks ${WIRE_VERSION}`);
  const kind = v.getUint8(5);
  const dtypeCode = v.getUint8(6);
  const h: FrameHeader = {
    planVersion: v.getUint32(8, true),
    layer: v.getUint32(12, true),
    hidden: v.getUint32(16, true),
    tokenOffset: v.getUint32(28, true),
    totalTokens: v.getUint32(32, true),
  };
  const numTokens = v.getUint32(20, true);
  const numAssignments = v.getUint32(24, true);
  const dtype =
    dtypeCode === WireDtype.bf16
      ? "bf16"
      : dtypeCode === WireDtype.fp8
        ? "fp8"
        : dtypeCode === WireDtype.f32
          ? "f32"
          : undefined;
  if (!dtype) fail("EM_WIRE_DTYPE", `unknown dtype code ${dtypeCode}`);
  const codec = wireCodec();
  const crc = v.getUint32(36, true);
  const badCrc = () => fail("EM_WIRE_CRC", "frame body checksum mismatch (corrupted in transit?)");
  // Dispatch and combine bodies are checksummed in the pass that converts them (below,
  // after the length checks: a truncated frame is reported as such, not as a mismatch);
  // anything else first.
  const data = kind === FrameKind.dispatch || kind === FrameKind.combine;
  if (!data && codec.crc32(buf.subarray(HEADER_BYTES)) !== crc) badCrc();
  if (kind === FrameKind.error) {
    try {
      const { code, message } = JSON.parse(
        new TextDecoder("utf-8", { fatal: true }).decode(buf.subarray(HEADER_BYTES)),
      ) as { code: unknown; message: unknown };
      if (typeof code !== "string" || typeof message !== "string") throw new Error("fields");
      return { kind: "error", planVersion: h.planVersion, layer: h.layer, code, message };
    } catch {
      fail("EM_WIRE_RANGE", "error frame body is not {code, message} JSON");
    }
  }
  if (kind !== FrameKind.dispatch && kind !== FrameKind.combine)
    fail("EM_WIRE_KIND", `unknown frame kind ${kind}`);
  if (h.hidden < 1 || h.hidden > MAX_HIDDEN)
    fail("EM_WIRE_RANGE", `hidden ${h.hidden} out of range 1..${MAX_HIDDEN}`);
  if (h.tokenOffset + numTokens > h.totalTokens)
    fail(
      "EM_WIRE_RANGE",
      `tokens ${h.tokenOffset}+${numTokens} exceed the request's ${h.totalTokens}`,
    );
  checkLength(buf, kind, dtype, numTokens, h.hidden, numAssignments);

  const o = HEADER_BYTES;
  if (kind === FrameKind.combine) {
    if (dtype === "fp8") fail("EM_WIRE_DTYPE", "combine frames carry bf16 or f32");
    const body = buf.subarray(o);
    if (lazyCombine) return { kind: "combine", ...h, dtype, numTokens, body, crc };
    const sums = allocF32(numTokens * h.hidden);
    if (codec.unpackCrc(body, dtype, numTokens, sums, h.hidden, null, false, 0) !== crc) badCrc();
    return { kind: "combine", ...h, dtype, numTokens, sums };
  }
  // Activations first (with the checksum of the whole body), then the assignments: a
  // corrupted body is reported as such, not as an out-of-range assignment.
  const act = o + 12 * numAssignments;
  // The activations and, after them, the three assignment arrays in one allocation (a copy:
  // `buf` may be a view of the NATS client's reused read buffer, and it need not be aligned).
  const n = numTokens * h.hidden;
  const space = alloc(n + 3 * numAssignments);
  if (space.length !== n + 3 * numAssignments)
    throw new RangeError(`alloc gave ${space.length} values for ${n + 3 * numAssignments}`);
  const activations = space.subarray(0, n);
  const bodyCrc = codec.unpackCrc(
    buf.subarray(act),
    dtype,
    numTokens,
    activations,
    h.hidden,
    null,
    false,
    codec.crc32(buf.subarray(o, act)),
  );
  if (bodyCrc !== crc) badCrc();
  const at = space.byteOffset + 4 * n;
  new Uint8Array(space.buffer, at, 12 * numAssignments).set(buf.subarray(o, act));
  const token = new Uint32Array(space.buffer, at, numAssignments);
  const expert = new Uint32Array(space.buffer, at + 4 * numAssignments, numAssignments);
  const weight = new Float32Array(space.buffer, at + 8 * numAssignments, numAssignments);
  for (let i = 0; i < numAssignments; i++) {
    if (token[i]! >= numTokens)
      fail("EM_WIRE_RANGE", `assignment ${i} names token ${token[i]} of ${numTokens}`);
    if (!Number.isFinite(weight[i]!))
      fail("EM_WIRE_RANGE", `assignment ${i} has a non-finite weight`);
  }
  return { kind: "dispatch", ...h, dtype, numTokens, activations, token, expert, weight };
}

function checkLength(
  buf: Uint8Array,
  kind: number,
  dtype: WireDtypeName,
  numTokens: number,
  hidden: number,
  numAssignments: number,
): void {
  const want =
    kind === FrameKind.dispatch
      ? dispatchFrameBytes(dtype, numTokens, hidden, numAssignments)
      : HEADER_BYTES + activationBytes(dtype, numTokens, hidden);
  if (buf.byteLength < want)
    fail("EM_WIRE_TRUNCATED", `frame has ${buf.byteLength} bytes, its header promises ${want}`);
  if (buf.byteLength > want)
    fail("EM_WIRE_LENGTH", `frame has ${buf.byteLength} bytes, its header promises ${want}`);
}

/** Bytes of a combine frame. */
export function combineFrameBytes(
  dtype: Combine["dtype"],
  numTokens: number,
  hidden: number,
): number {
  return HEADER_BYTES + activationBytes(dtype, numTokens, hidden);
}

/**
 * Bytes a request of `numTokens` tokens and `numAssignments` assignments needs under
 * max_payload: its dispatch frame, or the combine frame it is answered with when that is
 * larger (fp8 activations are answered with bf16 sums, bf16 ones with f32 sums on request).
 */
export function requestBytes(
  dtype: WireDtypeName,
  combine: Combine["dtype"],
  numTokens: number,
  hidden: number,
  numAssignments: number,
): number {
  return Math.max(
    dispatchFrameBytes(dtype, numTokens, hidden, numAssignments),
    combineFrameBytes(combine, numTokens, hidden),
  );
}

function tooBig(bytes: number, maxPayload: number): never {
  fail(
    "EM_WIRE_RANGE",
    `one token needs ${bytes} bytes (its dispatch or its reply), more than max_payload ${maxPayload}`,
  );
}

/**
 * Splits a dispatch into consecutive frames (by tokens; a token's assignments travel with
 * it) such that each frame and its `combine` reply fit in `maxPayload` bytes. Throws when
 * one token alone is too big.
 */
export function splitDispatch(
  d: Dispatch,
  maxPayload: number,
  combine: Combine["dtype"] = "bf16",
): Dispatch[] {
  const perToken = new Uint32Array(d.numTokens);
  for (const t of d.token) perToken[t]!++;
  const order = Array.from(d.token.keys()).sort((a, b) => d.token[a]! - d.token[b]! || a - b);
  const frames: Dispatch[] = [];
  let start = 0;
  let a = 0; // index into `order`
  while (start < d.numTokens) {
    let end = start;
    let assigns = 0;
    const bytes = (n: number, a: number) => requestBytes(d.dtype, combine, n, d.hidden, a);
    while (end < d.numTokens && bytes(end - start + 1, assigns + perToken[end]!) <= maxPayload) {
      assigns += perToken[end]!;
      end++;
    }
    if (end === start) tooBig(bytes(1, perToken[start]!), maxPayload);
    const idx = order.slice(a, a + assigns);
    a += assigns;
    frames.push({
      ...d,
      tokenOffset: d.tokenOffset + start,
      numTokens: end - start,
      activations: d.activations.subarray(start * d.hidden, end * d.hidden),
      token: Uint32Array.from(idx, (i) => d.token[i]! - start),
      expert: Uint32Array.from(idx, (i) => d.expert[i]!),
      weight: Float32Array.from(idx, (i) => d.weight[i]!),
    });
    start = end;
  }
  return frames;
}

/** One frame of a split request: tokens [start, end) and their assignments [a0, a1). */
export interface FrameRange {
  start: number;
  end: number;
  a0: number;
  a1: number;
}

/**
 * Cuts a request of `numTokens` tokens into consecutive frames whose dispatch and `combine`
 * reply fit in `maxPayload` bytes, as splitDispatch does; `token` holds the assignments'
 * tokens in non-decreasing order, so each frame's assignments are one slice. Throws when
 * one token alone is too big.
 */
export function splitRanges(
  dtype: WireDtypeName,
  numTokens: number,
  hidden: number,
  token: ArrayLike<number>,
  maxPayload: number,
  combine: Combine["dtype"] = "bf16",
): FrameRange[] {
  const frames: FrameRange[] = [];
  let start = 0;
  let a = 0;
  while (start < numTokens) {
    let end = start;
    let b = a;
    for (;;) {
      if (end >= numTokens) break;
      let c = b;
      while (c < token.length && token[c] === end) c++;
      const bytes = requestBytes(dtype, combine, end - start + 1, hidden, c - a);
      if (bytes > maxPayload) {
        if (end === start) tooBig(bytes, maxPayload);
        break;
      }
      end++;
      b = c;
    }
    frames.push({ start, end, a0: a, a1: b });
    start = end;
    a = b;
  }
  return frames;
}

/**
 * Checks that combine replies of one split request cover every token exactly once and
 * agree on plan, layer, width and request size.
 */
export function checkCombines(
  parts: readonly (FrameHeader & { numTokens: number })[],
  expect: { planVersion: number; layer: number; hidden: number; totalTokens: number },
): void {
  // One reply (the common case) must cover the whole request: no coverage array needed.
  const covered = parts.length === 1 ? undefined : new Uint8Array(expect.totalTokens);
  for (const p of parts) {
    if (p.planVersion !== expect.planVersion)
      fail(
        "EM_WIRE_PLAN_VERSION",
        `reply for plan v${p.planVersion}, expected v${expect.planVersion}`,
      );
    if (
      p.layer !== expect.layer ||
      p.hidden !== expect.hidden ||
      p.totalTokens !== expect.totalTokens
    )
      fail("EM_WIRE_RANGE", "reply for another layer, width or request");
    if (!covered) {
      if (p.tokenOffset !== 0 || p.numTokens !== expect.totalTokens)
        fail(
          "EM_WIRE_RANGE",
          `the one reply covers tokens ${p.tokenOffset}..${p.tokenOffset + p.numTokens - 1} of ${expect.totalTokens}`,
        );
      continue;
    }
    for (let t = p.tokenOffset; t < p.tokenOffset + p.numTokens; t++) {
      if (covered[t]) fail("EM_WIRE_RANGE", `token ${t} answered twice`);
      covered[t] = 1;
    }
  }
  const missing = covered ? covered.indexOf(0) : -1;
  if (missing !== -1) fail("EM_WIRE_RANGE", `no reply covers token ${missing}`);
}

/**
 * Reassembles combine replies of one split request into [totalTokens * hidden]; checks
 * that they cover every token exactly once and agree on plan, layer and width.
 */
export function joinCombines(
  parts: Combine[],
  expect: { planVersion: number; layer: number; hidden: number; totalTokens: number },
): Float32Array {
  checkCombines(parts, expect);
  const out = new Float32Array(expect.totalTokens * expect.hidden);
  for (const p of parts) out.set(p.sums, p.tokenOffset * expect.hidden);
  return out;
}
