// File-system helpers where Node's own fall short.
import { randomBytes } from "node:crypto";
import {
  closeSync,
  fstatSync,
  mkdirSync,
  openSync,
  readFileSync,
  readSync,
  renameSync,
  rmdirSync,
  rmSync,
  statSync,
  writeFileSync,
} from "node:fs";
import { dirname } from "node:path";

/**
 * `mkdir -p`: creates `dir` and its missing parents. Node's `mkdirSync(dir, {recursive})`
 * never returns for a path under /proc (mkdir there says ENOENT though the parent exists,
 * and it retries the parent forever); this one throws that ENOENT.
 */
export function makeDirs(dir: string): void {
  try {
    mkdirSync(dir);
  } catch (err) {
    const code = (err as { code?: string }).code;
    if (code === "EEXIST" && statSync(dir).isDirectory()) return;
    const parent = dirname(dir);
    if (code !== "ENOENT" || parent === dir || exists(parent)) throw err;
    makeDirs(parent);
    mkdirSync(dir);
  }
}

/**
 * Writes `text` to `path` whole: a temporary file beside it renamed over it, so a reader (or
 * a process started meanwhile) sees the old content or the new, never half. `mode`: the new
 * file's permissions.
 */
export function writeFileAtomic(path: string, text: string, mode?: number): void {
  const tmp = `${path}.${randomBytes(4).toString("hex")}.tmp`;
  try {
    writeFileSync(tmp, text, mode === undefined ? {} : { mode });
    renameSync(tmp, path);
  } catch (err) {
    rmSync(tmp, { force: true });
    throw err;
  }
}

/** A JSON file's value, or undefined when it is not there (or not whole yet). */
export function readJson<T>(path: string): T | undefined {
  try {
    return JSON.parse(readFileSync(path, "utf8")) as T;
  } catch {
    return undefined;
  }
}

/** Writes a JSON file whole (writeFileAtomic: readers never see half). */
export function writeJson(path: string, v: unknown): void {
  writeFileAtomic(path, JSON.stringify(v));
}

function exists(path: string): boolean {
  try {
    statSync(path);
    return true;
  } catch {
    return false;
  }
}

/**
 * The bytes of file `path` from `offset` to its end, and its size (what another process
 * appends to a file, read since the last look); undefined when it is missing. A file shorter
 * than `offset` gives no bytes.
 */
export function readFrom(
  path: string,
  offset: number,
): { bytes: Buffer; size: number } | undefined {
  let fd: number;
  try {
    fd = openSync(path, "r");
  } catch {
    return undefined;
  }
  try {
    const size = fstatSync(fd).size;
    const buf = Buffer.alloc(Math.max(0, size - offset));
    let got = 0;
    while (got < buf.length) {
      const n = readSync(fd, buf, got, buf.length - got, offset + got);
      if (n === 0) break;
      got += n;
    }
    return { bytes: buf.subarray(0, got), size };
  } finally {
    closeSync(fd);
  }
}

/** What withDirLock waits on between tries (nothing wakes it: a 2 ms sleep). */
const PAUSE = new Int32Array(new SharedArrayBuffer(4));

/** A lock dir older than this was left by a process that died holding it. */
export const DIR_LOCK_STALE_MS = 5000;

/**
 * Runs `fn` holding the lock `path` (a directory: mkdir is one atomic operation on every file
 * system a folder is shared over, NFS included, where O_APPEND is not: an NFS client appends
 * at the size it last saw, over another client's append). Waits for another holder up to
 * `waitMs`, blocking (the holders keep it for one small write); breaks a lock older than
 * DIR_LOCK_STALE_MS. Throws if the lock cannot be had in time.
 */
export function withDirLock<T>(path: string, fn: () => T, waitMs = 2000): T {
  const deadline = Date.now() + waitMs;
  for (;;) {
    try {
      mkdirSync(path);
      break;
    } catch (err) {
      if ((err as { code?: string }).code !== "EEXIST") throw err;
    }
    const since = (() => {
      try {
        return Date.now() - statSync(path).mtimeMs;
      } catch {
        return 0; // (released meanwhile)
      }
    })();
    if (since > DIR_LOCK_STALE_MS) unlock(path);
    else if (Date.now() > deadline)
      throw new Error(`${path}: held by another process for ${Math.round(since)} ms`);
    else Atomics.wait(PAUSE, 0, 0, 2);
  }
  try {
    return fn();
  } finally {
    unlock(path);
  }
}

/** Removes lock directory `path` (one rmdir: it is empty), if it is still there. */
function unlock(path: string): void {
  try {
    rmdirSync(path);
  } catch (err) {
    if ((err as { code?: string }).code !== "ENOENT") throw err;
  }
}
