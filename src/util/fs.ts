// File-system helpers where Node's own fall short.
import { randomBytes } from "node:crypto";
import { mkdirSync, readFileSync, renameSync, rmSync, statSync, writeFileSync } from "node:fs";
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
