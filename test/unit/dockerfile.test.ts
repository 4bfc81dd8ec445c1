// The Dockerfile cannot be built here (no Docker engine), so this keeps it honest: every
// file it copies from the build context exists and is not excluded by .dockerignore, the
// entrypoint is what tsc emits for the CLI, and the runtime runs as a non-root user.
import { existsSync, readFileSync } from "node:fs";
import { describe, expect, it } from "vitest";

const root = new URL("../../", import.meta.url);
const dockerfile = readFileSync(new URL("Dockerfile", root), "utf8");
const ignored = readFileSync(new URL(".dockerignore", root), "utf8")
  .split("\n")
  .map((l) => l.trim())
  .filter((l) => l && !l.startsWith("#"));

/** [sources, destination] of every COPY that reads the build context (not --from=stage). */
function contextCopies(): string[][] {
  return dockerfile
    .split("\n")
    .filter((l) => /^COPY\s/.test(l) && !/--from=/.test(l))
    .map((l) =>
      l
        .replace(/^COPY\s+/, "")
        .split(/\s+/)
        .filter((w) => !w.startsWith("--")),
    );
}

describe("Dockerfile", () => {
  it("copies only files that exist in the repository and are not dockerignored", () => {
    const sources = contextCopies().flatMap((words) => words.slice(0, -1));
    expect(sources.length).toBeGreaterThan(3);
    for (const src of sources) {
      const path = src.replace(/^\.\//, "");
      expect(existsSync(new URL(path, root)), `${path} exists`).toBe(true);
      expect(ignored.includes(path), `${path} is not in .dockerignore`).toBe(false);
    }
  });

  it("has a build stage and a runtime stage whose base can be switched to a CUDA image", () => {
    expect(dockerfile).toMatch(/^ARG NODE_IMAGE=node:24/m);
    expect(dockerfile).toMatch(/^ARG RUNTIME_BASE=/m);
    expect(dockerfile).toMatch(/^FROM \$\{NODE_IMAGE\} AS build$/m);
    expect(dockerfile).toMatch(/^FROM \$\{RUNTIME_BASE\} AS runtime$/m);
  });

  it("builds the addon's CUDA backend with --build-arg EM_CUDA=ON (GPU pods run --device=cuda:0)", () => {
    expect(dockerfile).toMatch(/^ARG EM_CUDA=OFF$/m);
    // The toolkit comes from the script the CI compile check uses, and build.sh gets the flag.
    expect(dockerfile).toMatch(/bash scripts\/cuda-toolkit\.sh\)\/bin\/nvcc/);
    expect(dockerfile).toMatch(/EM_CUDA=\$EM_CUDA .*bash shards\/build\.sh/);
  });

  it("starts the CLI that tsc emits, as a non-root user", () => {
    const tsconfig = JSON.parse(readFileSync(new URL("tsconfig.json", root), "utf8"));
    expect(tsconfig.compilerOptions.outDir).toBe("dist");
    expect(tsconfig.compilerOptions.rootDir).toBe("src");
    expect(existsSync(new URL("src/cli/main.ts", root))).toBe(true);
    expect(dockerfile).toMatch(
      /^ENTRYPOINT \["\/usr\/local\/bin\/node", "\/app\/dist\/cli\/main\.js"\]$/m,
    );
    const user = /^USER (\S+)$/m.exec(dockerfile)?.[1];
    expect(user).toBeDefined();
    expect(user!.startsWith("0") || user === "root").toBe(false);
  });
});
