// The disk tier's block file (ADR 0019), shared by the store (kv-disk.ts), which writes and
// checks files, and its reader thread (kv-disk-reader.ts), which checks the files it reads
// ahead off the engine's thread. A file: a 48-byte header (magic "EMKV", version, payload
// bytes, CRC-32 of the payload, the block's 32-byte hash) and the payload, the block's rows
// layer after layer.
import { mkdir, rename, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { crc32 } from "node:zlib";
import { ExpertMeshError } from "../util/errors.ts";

const MAGIC = 0x564b4d45; // "EMKV" read as a little-endian u32
const VERSION = 1;
export const DISK_HEADER_BYTES = 48;
/** A block file's name: its prefix hash in base64url, then .kv. */
export const BLOCK_FILE_RE = /^[A-Za-z0-9_-]{43}\.kv$/;
/** A block file's temporary name while it is written: the writer's pid, and a count. */
export const BLOCK_TMP_RE = /^[A-Za-z0-9_-]{43}\.kv\.tmp-(\d+)-\d+$/;
/** A temporary file older than this is a write that died (a write takes far less). */
export const STALE_TMP_MS = 300_000;

/** A prefix hash (base64 of 32 bytes, kv-blocks' Sequence.blockHashes) as a file name. */
export function blockFileName(hash: string): string {
  const raw = Buffer.from(hash, "base64");
  if (raw.length !== 32)
    throw new ExpertMeshError("EM_GATEWAY_INTERNAL", `a block hash is 32 bytes, got '${hash}'`);
  return `${raw.toString("base64url")}.kv`;
}

/**
 * The prefix hash a block file's name stands for, or null when it is not a name this tier
 * writes (base64url's spare bits: only the name written for a hash stands for it).
 */
export function hashOfBlockFile(name: string): string | null {
  if (!BLOCK_FILE_RE.test(name)) return null;
  const hash = Buffer.from(name.slice(0, -3), "base64url").toString("base64");
  return blockFileName(hash) === name ? hash : null;
}

/**
 * Writes the header of `buf` (a whole file: its payload in place after the header); the
 * CRC-32 of the payload too unless `crc` is false (then the writer fills it: fillBlockCrc).
 */
export function writeBlockHeader(buf: Buffer, blockBytes: number, hash: Buffer, crc = true): void {
  buf.writeUInt32LE(MAGIC, 0);
  buf.writeUInt32LE(VERSION, 4);
  buf.writeUInt32LE(blockBytes, 8);
  if (crc) fillBlockCrc(buf);
  hash.copy(buf, 16);
}

/**
 * Fills `buf` (a whole block file of `blockBytes` of payload) with `parts`, the block's rows
 * layer after layer, and its header for `hash` (with the CRC-32 unless `crc` is false).
 */
export function fillBlockFile(
  buf: Buffer,
  parts: readonly Uint8Array[],
  blockBytes: number,
  hash: string,
  crc = true,
): void {
  let at = DISK_HEADER_BYTES;
  for (const p of parts) {
    buf.set(p, at);
    at += p.length;
  }
  if (at !== DISK_HEADER_BYTES + blockBytes)
    throw new ExpertMeshError(
      "EM_GATEWAY_INTERNAL",
      `a block has ${at - DISK_HEADER_BYTES} bytes, not ${blockBytes}`,
    );
  writeBlockHeader(buf, blockBytes, Buffer.from(hash, "base64"), crc);
}

/** Sets the header's CRC-32 of `buf`'s payload. */
export function fillBlockCrc(buf: Buffer): void {
  buf.writeUInt32LE(crc32(buf.subarray(DISK_HEADER_BYTES)), 12);
}

/**
 * Writes a whole block file `buf` under `tmp` and renames it to `path`, both in `dir`; a
 * folder removed from under the store is made again (with its fingerprint.json), once.
 */
export async function writeBlockFile(
  buf: Uint8Array,
  tmp: string,
  path: string,
  dir: string,
  fingerprintJson: string,
): Promise<void> {
  try {
    await writeFile(tmp, buf, { mode: 0o600 });
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== "ENOENT") throw e;
    await mkdir(dir, { recursive: true, mode: 0o700 });
    await writeFile(join(dir, "fingerprint.json"), fingerprintJson);
    await writeFile(tmp, buf, { mode: 0o600 });
  }
  await rename(tmp, path);
}

/**
 * What is wrong with `buf` (`got` bytes read of a file that should hold `blockBytes` of
 * payload for the block `hash`), or null when nothing is: its length, its header, its hash
 * and the CRC-32 of its payload.
 */
export function blockFileProblem(
  buf: Buffer,
  got: number,
  blockBytes: number,
  hash: Buffer,
): string | null {
  const fileBytes = DISK_HEADER_BYTES + blockBytes;
  if (got !== fileBytes) return `${got} bytes, not ${fileBytes}`;
  if (buf.readUInt32LE(0) !== MAGIC || buf.readUInt32LE(4) !== VERSION)
    return "not a version 1 block file";
  if (buf.readUInt32LE(8) !== blockBytes) return "another block size";
  if (!buf.subarray(16, DISK_HEADER_BYTES).equals(hash)) return "another block's hash";
  if (buf.readUInt32LE(12) !== crc32(buf.subarray(DISK_HEADER_BYTES, fileBytes)))
    return "CRC-32 mismatch";
  return null;
}
