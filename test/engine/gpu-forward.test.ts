// scripts/gpu-forward.ts is what the GPU check runs on the device (CUDA against the CPU
// backend); its CPU self-test (--device cpu: the scalar kernels against the best ones) runs
// here so the script itself cannot rot between GPU sessions: it must pass, replay the CPU's
// routing and count the router's decisions.
import { spawnSync } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { afterAll, describe, expect, it } from "vitest";

const root = resolve(import.meta.dirname, "../..");
const dir = mkdtempSync(join(tmpdir(), "em-gpu-forward-"));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

function forward(...args: string[]) {
  return forwardOn("cpu", {}, ...args);
}

function forwardOn(device: string, env: Record<string, string>, ...args: string[]) {
  const json = join(dir, `${device}${args.join("_").replace(/\W/g, "")}.json`);
  const r = spawnSync(
    process.execPath,
    [
      "--no-warnings",
      "scripts/gpu-forward.ts",
      "--device",
      device,
      "--models",
      "tiny-v2",
      "--decode",
      "2",
      "--json",
      json,
      ...args,
    ],
    { cwd: root, encoding: "utf8", timeout: 120_000, env: { ...process.env, ...env } },
  );
  return {
    status: r.status,
    stdout: r.stdout,
    stderr: r.stderr,
    report: existsSync(json) ? JSON.parse(readFileSync(json, "utf8")) : null,
  };
}

describe("gpu-forward CPU self-test", () => {
  it("passes with the CPU run's routing replayed, counting every router decision", () => {
    const r = forward();
    expect(r.status, r.stderr).toBe(0);
    expect(r.stdout).toContain("- forward: PASS");
    const [row] = r.report.results;
    expect(row.model).toBe("tiny-v2");
    expect(row.prefillErr).toBeLessThan(1e-5); // scalar vs SIMD kernels: rounding only
    // 16 prompt tokens + 2 decode steps, each through every MoE layer of tiny-v2.
    expect(row.routing.decisions % 18).toBe(0);
    expect(row.routing.decisions).toBeGreaterThan(0);
    expect(row.routing).toMatchObject({ sets: 0, weights: 0 });
  });

  it("runs with the device's own routing (--replay off) and says so", () => {
    const r = forward("--replay", "off");
    expect(r.status, r.stderr).toBe(0);
    expect(r.stdout).toContain("own routing");
    expect(r.report.results[0].routing.sets).toBe(0);
  });

  it("keeps the latent cache in the dtype asked for (the GPU check's mirrored run uses bf16)", () => {
    const r = forward("--kv-dtype", "fp8");
    expect(r.status, r.stderr).toBe(0);
    expect(r.stdout).toContain("fp8 KV rows");
    expect(r.report.kvDtype).toBe("fp8");
    expect(r.report.results[0].prefillErr).toBeLessThan(1e-5);
    const bad = forward("--kv-dtype", "f16");
    expect(bad.status).toBe(1);
    expect(bad.stdout).toContain("--kv-dtype must be f32, bf16 or fp8");
  });

  it("serves the linear layers in the dtype asked for (the GPU check's converted-weights runs)", () => {
    const r = forward("--dtype", "fp8");
    expect(r.status, r.stderr).toBe(0);
    expect(r.stdout).toContain("linear layers served in fp8");
    // tiny-v2 quantized: far from the bf16 golden, the same on both runs.
    expect(r.report.results[0].prefillErr).toBeLessThan(1e-5);
    expect(r.report.results[0].goldenCpu).toBeGreaterThan(1e-3);
    const bad = forward("--dtype", "int4");
    expect(bad.status).toBe(1);
    expect(bad.stdout).toContain("--dtype must be auto, bf16, fp16, fp32, fp8, got 'int4'");
  });

  it("runs the GPU check's resident and mirrored forward on the sim device: the CPU's logits exactly", () => {
    // sim (shards/include/expertmesh/sim.h): the CPU kernels behind the addon's device paths
    const r = forwardOn(
      "sim",
      { EM_ADDON_RESIDENT: "1", EM_ADDON_KV_MIRROR: "1" },
      "--kv-dtype",
      "bf16",
      "--isa",
      "auto",
    );
    expect(r.status, r.stderr).toBe(0);
    expect(r.stdout).toContain("native backend on sim");
    const [row] = r.report.results;
    expect(row.prefillErr).toBe(0);
    expect(row.decodeErr).toBe(0);
  });
});
