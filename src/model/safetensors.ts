// The safetensors file format (https://github.com/huggingface/safetensors): an 8-byte
// little-endian header length N, N bytes of JSON `{name: {dtype, shape, data_offsets},
// "__metadata__": {...}}`, then the tensors' bytes, contiguous, with offsets relative to
// the end of the header. Reading parses the header and then reads only the byte ranges of
// the tensors asked for (positional reads); writing streams one tensor at a time.
import { type FileHandle, open } from "node:fs/promises";
import { endianness } from "node:os";
import { ExpertMeshError } from "../util/errors.ts";

/** The dtypes this project reads and writes. */
export type Dtype = "BF16" | "F16" | "F32" | "F8_E4M3";

/** Bytes per element of every dtype the format defines (to validate headers). */
const DTYPE_BYTES: Readonly<Record<string, number>> = {
  BOOL: 1,
  U8: 1,
  I8: 1,
  F8_E4M3: 1,
  F8_E5M2: 1,
  F8_E8M0: 1,
  I16: 2,
  U16: 2,
  F16: 2,
  BF16: 2,
  I32: 4,
  U32: 4,
  F32: 4,
  I64: 8,
  U64: 8,
  F64: 8,
};

const SUPPORTED: readonly Dtype[] = ["BF16", "F16", "F32", "F8_E4M3"];

/** Raw tensor bytes as a typed array: bf16/f16 bits, float32 values or e4m3 codes. */
export type TensorData = Uint16Array | Float32Array | Uint8Array;

/** Where one tensor lives in one file. */
export interface TensorInfo {
  readonly name: string;
  /** The dtype string from the header (possibly one this project cannot read). */
  readonly dtype: string;
  readonly shape: readonly number[];
  /** Path of the file that holds it. */
  readonly file: string;
  /** Absolute byte offset of its first byte in the file. */
  readonly offset: number;
  /** Its size in bytes. */
  readonly byteLength: number;
}

/** A tensor read from a file. */
export interface Tensor {
  readonly name: string;
  readonly dtype: Dtype;
  readonly shape: readonly number[];
  readonly data: TensorData;
}

/** The parsed header of one safetensors file. */
export interface SafetensorsHeader {
  readonly path: string;
  readonly fileSize: number;
  /** `__metadata__` (string to string), `{}` when absent. */
  readonly metadata: Readonly<Record<string, string>>;
  /** Tensors by name, in order of their data offsets. */
  readonly tensors: ReadonlyMap<string, TensorInfo>;
  /** Bytes read to parse the header (8 + header length). */
  readonly headerBytes: number;
}

/** What a reader checks about a tensor before reading it. */
export interface ReadOptions {
  /** The expected shape; a different one throws EM_CKPT_SHAPE_MISMATCH. */
  readonly shape?: readonly number[];
  /** Dtypes the caller accepts (default: all four supported ones). */
  readonly dtypes?: readonly Dtype[];
}

/** Headers larger than this are rejected as malformed (the reference library's limit). */
const MAX_HEADER_BYTES = 100_000_000;
/** Largest single positional read; bigger tensors are read in pieces. */
const MAX_READ_BYTES = 1 << 30;

/** Bytes per element of a dtype, or undefined for a dtype the format does not define. */
export function dtypeBytes(dtype: string): number | undefined {
  return Object.hasOwn(DTYPE_BYTES, dtype) ? DTYPE_BYTES[dtype] : undefined;
}

/** Number of elements of a shape (1 for a scalar). */
export function numElements(shape: readonly number[]): number {
  return shape.reduce((a, b) => a * b, 1);
}

function badHeader(path: string, msg: string): never {
  throw new ExpertMeshError("EM_CKPT_BAD_HEADER", `${path}: malformed safetensors header: ${msg}`);
}

function readError(path: string, err: unknown): ExpertMeshError {
  const why = err instanceof Error ? err.message : String(err);
  return new ExpertMeshError("EM_CKPT_READ", `cannot read ${path}: ${why}`, { cause: err });
}

/**
 * Parses and validates the header of the safetensors file at `path`, reading only its
 * first 8 + N bytes. Throws EM_CKPT_READ, EM_CKPT_BAD_HEADER or EM_CKPT_TRUNCATED. Async
 * I/O: a volume that hangs blocks this read, not the event loop (probes, watchdogs).
 */
export async function readSafetensorsHeader(path: string): Promise<SafetensorsHeader> {
  let fd: FileHandle;
  try {
    fd = await open(path, "r");
  } catch (err) {
    throw readError(path, err);
  }
  try {
    let fileSize: number;
    try {
      fileSize = (await fd.stat()).size;
    } catch (err) {
      throw readError(path, err);
    }
    if (fileSize < 8) badHeader(path, `file has ${fileSize} bytes, fewer than the 8-byte length`);
    const lenBuf = Buffer.alloc(8);
    await readFully(fd, lenBuf, 0, path);
    const n = lenBuf.readBigUInt64LE(0);
    if (n === 0n || n > BigInt(MAX_HEADER_BYTES)) {
      badHeader(path, `header length ${n} is not in 1..${MAX_HEADER_BYTES}`);
    }
    const headerLen = Number(n);
    if (8 + headerLen > fileSize) {
      badHeader(path, `header length ${headerLen} runs past the end of the ${fileSize}-byte file`);
    }
    const json = Buffer.alloc(headerLen);
    await readFully(fd, json, 8, path);
    return parseHeader(path, fileSize, headerLen, json);
  } finally {
    await fd.close();
  }
}

async function readFully(
  fd: FileHandle,
  buf: Uint8Array,
  position: number,
  path: string,
): Promise<void> {
  let done = 0;
  while (done < buf.length) {
    let got: number;
    try {
      ({ bytesRead: got } = await fd.read(
        buf,
        done,
        Math.min(buf.length - done, MAX_READ_BYTES),
        position + done,
      ));
    } catch (err) {
      throw readError(path, err);
    }
    if (got === 0) {
      throw new ExpertMeshError("EM_CKPT_TRUNCATED", `${path}: unexpected end of file`);
    }
    done += got;
  }
}

function parseHeader(
  path: string,
  fileSize: number,
  headerLen: number,
  json: Buffer,
): SafetensorsHeader {
  let raw: unknown;
  try {
    raw = JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(json));
  } catch (err) {
    badHeader(path, `not UTF-8 JSON (${err instanceof Error ? err.message : err})`);
  }
  if (typeof raw !== "object" || raw === null || Array.isArray(raw)) {
    badHeader(path, "not a JSON object");
  }
  const dataStart = 8 + headerLen;
  const entries: { info: TensorInfo; begin: number; end: number }[] = [];
  let metadata: Record<string, string> = {};
  for (const [name, value] of Object.entries(raw as Record<string, unknown>)) {
    if (name === "__metadata__") {
      metadata = parseMetadata(path, value);
      continue;
    }
    const { dtype, shape, begin, end } = parseEntry(path, name, value);
    const elemBytes = dtypeBytes(dtype);
    if (elemBytes !== undefined && end - begin !== numElements(shape) * elemBytes) {
      badHeader(
        path,
        `tensor ${name}: data_offsets [${begin}, ${end}] hold ${end - begin} bytes, but ${dtype} [${shape.join(", ")}] needs ${numElements(shape) * elemBytes}`,
      );
    }
    const info = {
      name,
      dtype,
      shape,
      file: path,
      offset: dataStart + begin,
      byteLength: end - begin,
    };
    entries.push({ info, begin, end });
  }
  // The tensors must tile the data section exactly: sorted by offset, no gaps or overlaps.
  entries.sort((a, b) => a.begin - b.begin || a.end - b.end);
  let expected = 0;
  for (const e of entries) {
    if (e.begin !== expected) {
      const what = e.begin < expected ? "overlaps the previous tensor" : "leaves a gap before it";
      badHeader(
        path,
        `tensor ${e.info.name}: data_offsets start ${e.begin} ${what} (expected ${expected})`,
      );
    }
    expected = e.end;
  }
  if (dataStart + expected > fileSize) {
    throw new ExpertMeshError(
      "EM_CKPT_TRUNCATED",
      `${path}: truncated: the header places tensor data up to byte ${dataStart + expected}, but the file has ${fileSize} bytes`,
    );
  }
  if (dataStart + expected < fileSize) {
    badHeader(path, `${fileSize - dataStart - expected} bytes after the last tensor`);
  }
  return {
    path,
    fileSize,
    metadata,
    tensors: new Map(entries.map((e) => [e.info.name, e.info])),
    headerBytes: dataStart,
  };
}

function parseMetadata(path: string, value: unknown): Record<string, string> {
  if (typeof value !== "object" || value === null || Array.isArray(value)) {
    badHeader(path, "__metadata__ is not an object");
  }
  for (const [k, v] of Object.entries(value)) {
    if (typeof v !== "string") badHeader(path, `__metadata__.${k} is not a string`);
  }
  return { ...(value as Record<string, string>) };
}

function parseEntry(path: string, name: string, value: unknown) {
  if (typeof value !== "object" || value === null || Array.isArray(value)) {
    badHeader(path, `tensor ${name} is not an object`);
  }
  const v = value as Record<string, unknown>;
  const { dtype, shape, data_offsets: offsets } = v;
  if (typeof dtype !== "string" || dtype === "")
    badHeader(path, `tensor ${name}: dtype is not a string`);
  if (!Array.isArray(shape) || !shape.every(isNonNegativeInt)) {
    badHeader(path, `tensor ${name}: shape is not an array of non-negative integers`);
  }
  if (!Array.isArray(offsets) || offsets.length !== 2 || !offsets.every(isNonNegativeInt)) {
    badHeader(path, `tensor ${name}: data_offsets is not [begin, end]`);
  }
  const [begin, end] = offsets as [number, number];
  if (end < begin)
    badHeader(path, `tensor ${name}: data_offsets [${begin}, ${end}] end before they begin`);
  return { dtype, shape: shape as number[], begin, end };
}

function isNonNegativeInt(x: unknown): x is number {
  return typeof x === "number" && Number.isSafeInteger(x) && x >= 0;
}

/**
 * Checks `info` against `opts` (dtype readable and accepted, shape as expected).
 * Throws EM_CKPT_UNSUPPORTED_DTYPE or EM_CKPT_SHAPE_MISMATCH.
 */
export function checkTensor(info: TensorInfo, opts: ReadOptions = {}): Dtype {
  const accepted = opts.dtypes ?? SUPPORTED;
  if (!(SUPPORTED as readonly string[]).includes(info.dtype)) {
    throw new ExpertMeshError(
      "EM_CKPT_UNSUPPORTED_DTYPE",
      `tensor ${info.name} in ${info.file} has dtype ${info.dtype}; supported: ${SUPPORTED.join(", ")}`,
    );
  }
  if (!(accepted as readonly string[]).includes(info.dtype)) {
    throw new ExpertMeshError(
      "EM_CKPT_UNSUPPORTED_DTYPE",
      `tensor ${info.name} in ${info.file} has dtype ${info.dtype}; expected ${accepted.join(" or ")}`,
    );
  }
  if (opts.shape !== undefined && !sameShape(info.shape, opts.shape)) {
    throw new ExpertMeshError(
      "EM_CKPT_SHAPE_MISMATCH",
      `tensor ${info.name} in ${info.file} has shape [${info.shape.join(", ")}], expected [${opts.shape.join(", ")}]`,
    );
  }
  return info.dtype as Dtype;
}

function sameShape(a: readonly number[], b: readonly number[]): boolean {
  return a.length === b.length && a.every((d, i) => d === b[i]);
}

/** Counts the bytes a reader takes from disk; tests use it to prove reads are partial. */
export interface ReadCounter {
  bytesRead: number;
}

/**
 * Reads one tensor's bytes (and nothing else) from its file, after `checkTensor`.
 * The result owns a fresh, aligned buffer. Throws EM_CKPT_* codes.
 */
export async function readTensor(
  info: TensorInfo,
  opts: ReadOptions = {},
  counter?: ReadCounter,
): Promise<Tensor> {
  const dtype = checkTensor(info, opts);
  if (endianness() !== "LE") {
    throw new ExpertMeshError("EM_CKPT_READ", "safetensors reading needs a little-endian host");
  }
  const buf = new ArrayBuffer(info.byteLength);
  let fh: FileHandle;
  try {
    fh = await open(info.file, "r");
  } catch (err) {
    throw readError(info.file, err);
  }
  try {
    const bytes = new Uint8Array(buf);
    let done = 0;
    while (done < bytes.length) {
      const len = Math.min(bytes.length - done, MAX_READ_BYTES);
      let got: number;
      try {
        ({ bytesRead: got } = await fh.read(bytes, done, len, info.offset + done));
      } catch (err) {
        throw readError(info.file, err);
      }
      if (got === 0) {
        throw new ExpertMeshError(
          "EM_CKPT_TRUNCATED",
          `${info.file}: truncated while reading tensor ${info.name}`,
        );
      }
      done += got;
      // Per read, not per tensor: a 2 GiB embedding read slowly still shows progress.
      if (counter) counter.bytesRead += got;
    }
  } finally {
    await fh.close();
  }
  return { name: info.name, dtype, shape: info.shape, data: typedView(dtype, buf) };
}

function typedView(dtype: Dtype, buf: ArrayBuffer): TensorData {
  switch (dtype) {
    case "BF16":
    case "F16":
      return new Uint16Array(buf);
    case "F32":
      return new Float32Array(buf);
    case "F8_E4M3":
      return new Uint8Array(buf);
  }
}

/** One tensor to write; `data` may be a function so big files are produced one tensor at a time. */
export interface TensorToWrite {
  readonly name: string;
  readonly dtype: Dtype;
  readonly shape: readonly number[];
  readonly data: TensorData | (() => TensorData);
}

/** Progress of a write, reported after each tensor. */
export interface WriteProgress {
  readonly path: string;
  readonly tensor: string;
  /** Bytes of tensor data written to this file so far. */
  readonly bytesWritten: number;
  readonly totalBytes: number;
}

/**
 * Writes a safetensors file: header (tensors in the given order, `__metadata__` first,
 * padded with spaces to a multiple of 8 bytes so the data is aligned), then each tensor's
 * bytes. Tensors whose `data` is a function are produced just before they are written, so
 * at most one is held in memory. Throws EM_CKPT_WRITE_INVALID for inconsistent input.
 */
export async function writeSafetensors(
  path: string,
  tensors: readonly TensorToWrite[],
  metadata: Readonly<Record<string, string>> = { format: "pt" },
  onProgress?: (p: WriteProgress) => void,
): Promise<void> {
  const header = safetensorsHeaderBytes(tensors, metadata);
  const totalBytes = tensors.reduce((a, t) => a + tensorBytes(t), 0);
  const fh = await open(path, "w");
  try {
    await fh.write(header);
    let written = 0;
    for (const t of tensors) {
      const data = typeof t.data === "function" ? t.data() : t.data;
      checkData(t, data);
      await fh.write(new Uint8Array(data.buffer, data.byteOffset, data.byteLength));
      written += data.byteLength;
      onProgress?.({ path, tensor: t.name, bytesWritten: written, totalBytes });
    }
  } finally {
    await fh.close();
  }
}

/** Bytes of a tensor's data from its dtype and shape. */
export function tensorBytes(t: Pick<TensorToWrite, "dtype" | "shape">): number {
  return numElements(t.shape) * DTYPE_BYTES[t.dtype]!;
}

/** The 8-byte length plus the padded JSON header for `tensors` written in order. */
export function safetensorsHeaderBytes(
  tensors: readonly TensorToWrite[],
  metadata: Readonly<Record<string, string>>,
): Uint8Array {
  const header: Record<string, unknown> = { __metadata__: metadata };
  let offset = 0;
  for (const t of tensors) {
    if (t.name === "__metadata__" || Object.hasOwn(header, t.name)) {
      throw new ExpertMeshError(
        "EM_CKPT_WRITE_INVALID",
        `tensor name ${t.name} is reserved or repeated`,
      );
    }
    if (!SUPPORTED.includes(t.dtype) || !t.shape.every(isNonNegativeInt)) {
      throw new ExpertMeshError(
        "EM_CKPT_WRITE_INVALID",
        `tensor ${t.name}: dtype ${t.dtype} / shape [${t.shape.join(", ")}] is not writable`,
      );
    }
    const bytes = tensorBytes(t);
    header[t.name] = { dtype: t.dtype, shape: t.shape, data_offsets: [offset, offset + bytes] };
    offset += bytes;
  }
  const json = Buffer.from(JSON.stringify(header), "utf8");
  const padded = Math.ceil(json.length / 8) * 8;
  const out = Buffer.alloc(8 + padded, 0x20);
  out.writeBigUInt64LE(BigInt(padded), 0);
  json.copy(out, 8);
  return out;
}

function checkData(t: TensorToWrite, data: TensorData): void {
  const want = t.dtype === "F32" ? Float32Array : t.dtype === "F8_E4M3" ? Uint8Array : Uint16Array;
  if (!(data instanceof want) || data.byteLength !== tensorBytes(t)) {
    throw new ExpertMeshError(
      "EM_CKPT_WRITE_INVALID",
      `tensor ${t.name}: ${t.dtype} [${t.shape.join(", ")}] needs a ${want.name} of ${tensorBytes(t)} bytes, got ${data.constructor.name} of ${data.byteLength}`,
    );
  }
}
