// What tells one checkpoint's weights from another's, by content, cheaply (ADR 0035): a
// SHA-256 over config.json and, per safetensors file (by name), its name, size, header and
// three samples of its tensor data (the first, middle and last 64 KiB). Two copies of the same
// checkpoint (each pod's own download, a node's own copy) give the same digest whatever their
// modification times; another model of the same shape (DeepSeek-V3 and R1, a new revision)
// gives another, since every sample falls in tensors that training changed. A file rewritten
// in place with the same header and samples is the one change it misses.
import { createHash } from "node:crypto";
import { type FileHandle, open, readFile } from "node:fs/promises";
import { join } from "node:path";
import { ExpertMeshError, formatError } from "../util/errors.ts";

/** Bytes of each sample of a file's tensor data. */
export const SAMPLE_BYTES = 64 * 1024;

/** The digest's length in hex characters (64 bits: a NATS subject token, a log word). */
export const DIGEST_HEX = 16;

/**
 * The weights digest of the checkpoint in `dir` made of `files` (safetensors file names in
 * `dir`, the index's or the single file). Throws EM_CKPT_READ when a file cannot be read.
 */
export async function weightsDigest(dir: string, files: readonly string[]): Promise<string> {
  const h = createHash("sha256");
  const part = (label: string, bytes: Uint8Array | string) => {
    const b = typeof bytes === "string" ? Buffer.from(bytes) : bytes;
    h.update(`${label} ${b.length}\n`);
    h.update(b);
  };
  part("config.json", await readFile(join(dir, "config.json")));
  for (const name of [...files].sort()) {
    const path = join(dir, name);
    let fd: FileHandle | undefined;
    try {
      fd = await open(path, "r");
      const size = (await fd.stat()).size;
      part("file", `${name}\n${size}`);
      const len = await readAt(fd, 0, 8);
      const headerLen = len.length === 8 ? Number(len.readBigUInt64LE(0)) : 0;
      // Opening the checkpoint checked the header; a file that changed since hashes as it is.
      const dataStart = Math.min(size, 8 + Math.min(headerLen, size));
      part("header", await readAt(fd, 8, dataStart - 8));
      for (const at of sampleOffsets(dataStart, size))
        part("sample", await readAt(fd, at, SAMPLE_BYTES));
    } catch (err) {
      throw new ExpertMeshError("EM_CKPT_READ", `${path}: ${formatError(err)}`, { cause: err });
    } finally {
      await fd?.close();
    }
  }
  return h.digest("hex").slice(0, DIGEST_HEX);
}

/** Where a file's samples start: the data's first, middle and last SAMPLE_BYTES (overlaps kept). */
export function sampleOffsets(dataStart: number, size: number): number[] {
  const data = size - dataStart;
  if (data <= 0) return [];
  const last = Math.max(dataStart, size - SAMPLE_BYTES);
  const middle = dataStart + Math.max(0, Math.floor((data - SAMPLE_BYTES) / 2));
  return [dataStart, middle, last];
}

async function readAt(fd: FileHandle, position: number, length: number): Promise<Buffer> {
  const buf = Buffer.alloc(Math.max(0, length));
  let done = 0;
  while (done < buf.length) {
    const { bytesRead } = await fd.read(buf, done, buf.length - done, position + done);
    if (bytesRead === 0) break;
    done += bytesRead;
  }
  return buf.subarray(0, done);
}
