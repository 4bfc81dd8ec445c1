// File-system helpers where Node's own fall short.
import { mkdirSync, statSync } from "node:fs";
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

function exists(path: string): boolean {
  try {
    statSync(path);
    return true;
  } catch {
    return false;
  }
}
