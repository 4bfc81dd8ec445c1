// What the gateways on one files folder share of the batches they run (ADR 0049), beside
// their leases (src/util/leases.ts: which gateway runs a batch, or a part of its lines; a
// part's lease is marked done when its lines are answered and kept so, so that no gateway
// takes the part again): answer files, one JSON line per answer, appended whole.
import {
  closeSync,
  copyFileSync,
  fstatSync,
  ftruncateSync,
  linkSync,
  openSync,
  readSync,
  writeSync,
} from "node:fs";

/** An answer's line (null: an empty or damaged line). */
export function parseAnswer(
  line: string,
): { custom_id: string; response?: { body?: unknown } | null } | null {
  if (line === "") return null;
  try {
    const a = JSON.parse(line) as { custom_id?: unknown; response?: { body?: unknown } | null };
    return typeof a.custom_id === "string" ? (a as { custom_id: string }) : null;
  } catch {
    return null;
  }
}

/**
 * The whole lines of answers file `path` from byte `offset` on ("" when there is none); with
 * `cut`, a last line cut short (its writer died midway) is removed from the file, so that the
 * next answer starts a line. Whole lines: their byte length is where the next read starts.
 */
export function readAnswers(path: string, offset = 0, cut = false): string {
  let fd: number;
  try {
    fd = openSync(path, cut ? "r+" : "r");
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "ENOENT") return "";
    throw err;
  }
  try {
    const size = fstatSync(fd).size;
    if (size <= offset) return "";
    const buf = Buffer.allocUnsafe(size - offset);
    const n = readSync(fd, buf, 0, buf.length, offset);
    const end = n === 0 ? 0 : buf.lastIndexOf(10, n - 1) + 1;
    if (cut && offset + end < size) ftruncateSync(fd, offset + end);
    return buf.toString("utf8", 0, end);
  } finally {
    closeSync(fd);
  }
}

/**
 * Appends one JSON line (a whole line per write: a stop cuts at most the last); the bytes
 * written.
 */
export function append(path: string, v: object): number {
  const fd = openSync(path, "a");
  try {
    return writeSync(fd, `${JSON.stringify(v)}\n`);
  } finally {
    closeSync(fd);
  }
}

/** A hard link `to` of `from` (one file on disk), or a copy where the filesystem has none. */
export function linkOrCopy(from: string, to: string): void {
  try {
    linkSync(from, to);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "EEXIST") return;
    copyFileSync(from, to);
  }
}
