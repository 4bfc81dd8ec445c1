// File-system helpers where Node's own fall short.
import { randomBytes } from "node:crypto";
import { mkdirSync, renameSync, rmSync, statSync, writeFileSync } from "node:fs";
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

function exists(path: string): boolean {
  try {
    statSync(path);
    return true;
  } catch {
    return false;
  }
}
