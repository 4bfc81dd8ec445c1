// The GPU check runs scripts/gpu-forward.ts on a machine with no node_modules: the only npm
// packages there are the ones scripts/gpu-bundle.sh copies into .gpu-bundle/node_modules.
// The first H200 run's forward failed on an import nobody had listed; this walks the
// forward's import graph (static and dynamic imports, type-only ones skipped) and checks
// every package it reaches is in that list.
import { existsSync, readFileSync } from "node:fs";
import { builtinModules } from "node:module";
import { dirname, join, resolve } from "node:path";
import { describe, expect, it } from "vitest";

const root = resolve(import.meta.dirname, "../..");

/** Bare specifiers (packages) reached from `entry` through relative imports. */
function packagesReached(entry: string): Map<string, string> {
  const seen = new Set<string>();
  const packages = new Map<string, string>(); // package -> first file importing it
  const queue = [entry];
  while (queue.length > 0) {
    const file = queue.pop()!;
    if (seen.has(file)) continue;
    seen.add(file);
    const text = readFileSync(file, "utf8");
    const specifiers: string[] = [];
    for (const m of text.matchAll(/^\s*import\s+(type\s+)?[^;]*?from\s+["']([^"']+)["']/gm))
      if (!m[1]) specifiers.push(m[2]!);
    for (const m of text.matchAll(/^\s*export\s+(type\s+)?[^;]*?from\s+["']([^"']+)["']/gm))
      if (!m[1]) specifiers.push(m[2]!);
    for (const m of text.matchAll(/^\s*import\s+["']([^"']+)["']/gm)) specifiers.push(m[1]!);
    for (const m of text.matchAll(/\bimport\(\s*["']([^"']+)["']\s*\)/g)) specifiers.push(m[1]!);
    for (const spec of specifiers) {
      if (spec.startsWith(".")) {
        let target = join(dirname(file), spec);
        if (!existsSync(target) && existsSync(target.replace(/\.js$/, ".ts")))
          target = target.replace(/\.js$/, ".ts");
        queue.push(target);
      } else if (!spec.startsWith("node:") && !builtinModules.includes(spec)) {
        const name = spec.startsWith("@")
          ? spec.split("/").slice(0, 2).join("/")
          : spec.split("/")[0]!;
        if (!packages.has(name)) packages.set(name, file.slice(root.length + 1));
      }
    }
  }
  return packages;
}

/** The packages scripts/gpu-bundle.sh copies (its `for pkg in ...; do` line). */
function bundled(): string[] {
  const script = readFileSync(join(root, "scripts/gpu-bundle.sh"), "utf8");
  const line = /^for pkg in ([^;]+); do$/m.exec(script);
  if (!line) throw new Error("scripts/gpu-bundle.sh: no `for pkg in ...; do` line");
  return line[1]!.trim().split(/\s+/);
}

describe("GPU bundle", () => {
  it("carries every npm package the GPU forward imports", () => {
    const reached = packagesReached(join(root, "scripts/gpu-forward.ts"));
    // The walk itself works: the forward reaches the tokenizer's template engine.
    expect([...reached.keys()]).toContain("@huggingface/jinja");
    const missing = [...reached].filter(([name]) => !bundled().includes(name));
    expect(missing.map(([name, from]) => `${name} (imported by ${from})`)).toEqual([]);
  });

  it("carries no package the forward does not import", () => {
    const reached = packagesReached(join(root, "scripts/gpu-forward.ts"));
    expect(bundled().filter((name) => !reached.has(name))).toEqual([]);
  });
});
