// --device cpu|cuda|cuda:N: the addon's configure({ device }), the CLI's selection, and the
// commands as subprocesses. Without a CUDA device (CI, most machines) cuda must fail with
// a stable code and a non-zero exit, never a crash; with one (a CUDA build on a GPU
// machine) it must select the CUDA backend and fall back to the CPU for what it lacks.
import { spawnSync } from "node:child_process";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { backendSummary, selectBackend } from "../../src/cli/device.ts";
import { configureDevice, cpuIsaFor, loadAddon, nativeBackend } from "../../src/engine/native.ts";
import { ExpertMeshError } from "../../src/util/errors.ts";

const addon = loadAddon();
const cuda = addon.cudaStatus();
const hasCudaDevice = cuda.compiled && cuda.devices > 0;
const repo = join(import.meta.dirname, "..", "..");
const main = join(repo, "src/cli/main.ts");

const codeOf = (fn: () => unknown): string | undefined => {
  try {
    fn();
  } catch (e) {
    return (e as { code?: string }).code;
  }
  return undefined;
};

describe("addon configure({ device })", () => {
  it("configures the CPU backend for 'cpu', with nothing falling back", () => {
    const info = addon.configure({ device: "cpu" });
    expect(info.backend).toBe("cpu");
    expect(info.device).toBe("cpu");
    expect(info.fallback).toEqual({});
    expect(info.cpu.threads).toBeGreaterThan(0);
    expect(info.ops.sample).toEqual(["f32"]);
    // Ops still run after a configure.
    const w = { dtype: "f32" as const, shape: [2, 3], data: new Float32Array([1, 0, 0, 0, 1, 0]) };
    const y = addon.matmul(new Float32Array([1, 2, 3]), 1, w);
    expect([...y]).toEqual([1, 2]);
  });

  it("keeps the device when configure() is called without one (isa, threads)", () => {
    addon.configure({ device: "cpu" });
    expect(addon.configure({ threads: 1 }).device).toBe("cpu");
    expect(addon.configure({ threads: 1 }).cpu.threads).toBe(1);
    addon.configure({});
  });

  it.each(["cuda:x", "tpu", "cuda:", "cuda0", "cuda:-1", "", "CPU", "gpu:0"])(
    "rejects '%s' with EM_NATIVE_ARG and keeps the backends",
    (device) => {
      addon.configure({ device: "cpu" });
      expect(codeOf(() => addon.configure({ device }))).toBe("EM_NATIVE_ARG");
      expect(addon.backendInfo().device).toBe("cpu");
    },
  );

  it("rejects a device that is not a string with EM_NATIVE_ARG", () => {
    expect(codeOf(() => addon.configure({ device: 0 as unknown as string }))).toBe("EM_NATIVE_ARG");
  });

  // One test for both kinds of machine (CI has no GPU; the GPU check runs it with one).
  it("cuda, cuda:N: the CUDA backend (what it lacks on the CPU backend) with a device; EM_NATIVE_UNSUPPORTED without", () => {
    if (!hasCudaDevice) {
      expect(cuda.devices).toBe(0);
      expect(cuda.status).not.toBe("");
      for (const device of ["cuda", "cuda:0", "cuda:3"]) {
        expect(codeOf(() => addon.configure({ device }))).toBe("EM_NATIVE_UNSUPPORTED");
        expect(addon.backendInfo().backend).toBe("cpu");
      }
      return;
    }
    const info = addon.configure({ device: "cuda:0" });
    try {
      expect(info.backend).toBe("cuda");
      expect(info.device).toBe("cuda:0");
      expect(info.isa).toMatch(/^sm_\d+$/);
      expect(info.fallback.sample).toEqual(["f32"]);
      expect(info.fallback.wirePack).toEqual(["f32"]);
      expect(info.ops.matmul).toEqual(["f32", "bf16", "f16", "fp8"]);
      expect(codeOf(() => addon.configure({ device: `cuda:${cuda.devices}` }))).toBe(
        "EM_NATIVE_ARG",
      );
    } finally {
      addon.configure({ device: "cpu" });
    }
  });
});

describe("selectBackend (--backend, --device)", () => {
  it("defaults to the native backend on cpu", () => {
    const s = selectBackend(undefined, undefined);
    expect(s.device).toBe("cpu");
    expect(s.backend.name).toBe("native");
    expect(s.summary).toMatch(/^native backend on cpu/);
  });

  it("takes the reference backend on cpu only", () => {
    expect(selectBackend("reference", "cpu").backend.name).toBe("reference");
    expect(codeOf(() => selectBackend("reference", "cuda:0"))).toBe("EM_CLI_USAGE");
    expect(codeOf(() => selectBackend("tensorrt", "cpu"))).toBe("EM_CLI_USAGE");
  });

  it("wraps the addon's errors as ExpertMeshError naming the flag", () => {
    let err: unknown;
    try {
      configureDevice("tpu");
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(ExpertMeshError);
    expect((err as ExpertMeshError).code).toBe("EM_NATIVE_ARG");
    expect((err as Error).message).toBe(
      "--device tpu: unknown device 'tpu' (expected cpu, cuda or cuda:N)",
    );
    expect(codeOf(() => nativeBackend({ device: "cuda:x" }))).toBe("EM_NATIVE_ARG");
    addon.configure({ device: "cpu" });
  });

  it("describes a device with its CPU fallbacks", () => {
    const text = backendSummary({
      backend: "cuda",
      device: "cuda:0",
      isa: "sm_90",
      threads: 132,
      availableIsas: ["scalar", "avx2"],
      cpu: { isa: "avx2", threads: 16, batchInvariant: false },
      cudaCompiled: true,
      ops: { sample: ["f32"], matmul: ["f32", "bf16", "f16", "fp8"] },
      fallback: { sample: ["f32"], matmul: ["fp8"] },
    });
    expect(text).toBe(
      "native backend on cuda:0 (cuda sm_90, 132 SMs; on the CPU (avx2, 16 threads): sample, matmul (fp8))",
    );
  });

  it("says the sim device is a stand-in, with the CUDA backend's fallbacks", () => {
    const info = addon.configure({ device: "sim" });
    try {
      expect(backendSummary(info)).toBe(
        `native backend on sim (sim ${info.cpu.isa}, ${info.threads} threads, a stand-in for a GPU; ` +
          `on the CPU (${info.cpu.isa}, ${info.cpu.threads} threads): sample, wirePack, wireUnpack, logprobs)`,
      );
    } finally {
      addon.configure({ device: "cpu" });
    }
  });
});

describe("--cpu-matmul fp32|bf16", () => {
  it.each([
    ["fp32", ["scalar", "avx2", "avx512", "avx512bf16", "amx"], undefined],
    ["bf16", ["scalar", "avx2", "avx512", "avx512bf16", "amx"], "amx"],
    ["bf16", ["scalar", "avx2", "avx512", "avx512bf16"], "avx512bf16"],
    ["bf16", ["scalar", "avx2", "avx512"], undefined],
    ["bf16", ["scalar"], undefined],
  ] as const)("cpuIsaFor(%s, %j) = %s", (matmul, isas, want) => {
    expect(cpuIsaFor(matmul, isas)).toBe(want);
  });

  it("refuses other values, and bf16 on the reference backend", () => {
    expect(codeOf(() => selectBackend(undefined, "cpu", "int8"))).toBe("EM_CLI_USAGE");
    expect(codeOf(() => selectBackend("reference", "cpu", "bf16"))).toBe("EM_CLI_USAGE");
    expect(selectBackend("reference", "cpu", "fp32").backend.name).toBe("reference");
  });

  it("bf16 runs this CPU's bf16 kernels, or says it keeps fp32; fp32 goes back", () => {
    const s = selectBackend(undefined, "cpu", "bf16");
    const want = cpuIsaFor("bf16", addon.backendInfo().availableIsas);
    const info = addon.backendInfo();
    if (want) {
      expect(info.cpu.isa).toBe(want);
      expect(s.summary).toBe(`native backend on cpu (${want}, ${info.threads} threads)`);
    } else {
      expect(s.summary).toContain("this CPU has neither AMX nor AVX512_BF16, so fp32 products");
    }
    selectBackend(undefined, "cpu", "fp32");
    expect(["scalar", "avx2", "avx512"]).toContain(addon.backendInfo().cpu.isa);
  });
});

describe.skipIf(hasCudaDevice)("the commands with --device cuda on a machine without CUDA", () => {
  const run = (...args: string[]) =>
    spawnSync(process.execPath, [main, ...args], { encoding: "utf8", timeout: 30_000 });
  // Required options with values that are never read: the device is checked first.
  const shard = ["shard", "--model", "/nonexistent", "--plan", "/nonexistent", "--shard", "0"];
  const commands: [string, string[]][] = [
    ["shard", [...shard, "--nats", "nats://127.0.0.1:1"]],
    ["gateway", ["gateway", "--model", "/nonexistent", "--local"]],
    ["generate", ["generate", "--model", "/nonexistent", "--prompt", "hi"]],
  ];

  it.each(commands)("%s --device cuda:0 exits 1 with [EM_NATIVE_UNSUPPORTED]", (_name, args) => {
    const r = run(...args, "--device=cuda:0");
    expect(r.signal).toBeNull();
    expect(r.status).toBe(1);
    expect(r.stderr).toContain("[EM_NATIVE_UNSUPPORTED] --device cuda:0: ");
    expect(r.stderr).toContain("--device cpu runs on the CPU backend");
  });

  it.each(commands)("%s --device tpu exits 1 with [EM_NATIVE_ARG]", (_name, args) => {
    const r = run(...args, "--device", "tpu");
    expect(r.status).toBe(1);
    expect(r.stderr).toContain("[EM_NATIVE_ARG] --device tpu: unknown device 'tpu'");
  });

  it("shard --help documents the devices", () => {
    const r = run("shard", "--help");
    expect(r.status).toBe(0);
    expect(r.stdout).toContain("--device DEV");
    expect(r.stdout).toContain("cuda:N");
  });
});

describe("--batch-invariant", () => {
  it("configures the CPU backend's batch-invariant kernels, and says so; without it they go", () => {
    try {
      const s = selectBackend(undefined, "cpu", undefined, true);
      const info = addon.backendInfo();
      expect(info.cpu.batchInvariant).toBe(true);
      expect(s.summary).toBe(
        `native backend on cpu (${info.isa}, ${info.threads} threads, batch-invariant)`,
      );
      // Asked for bf16 products, the invariant backend runs the ISA the default one would
      // (AMX's tiles too, from one row up: ADR 0027).
      selectBackend(undefined, "cpu", "bf16");
      const bf16Isa = addon.backendInfo().cpu.isa;
      selectBackend(undefined, "cpu", "bf16", true);
      expect(addon.backendInfo().cpu.isa).toBe(bf16Isa);
      expect(addon.backendInfo().cpu.batchInvariant).toBe(true);
    } finally {
      selectBackend(undefined, "cpu", "fp32");
    }
    expect(addon.backendInfo().cpu.batchInvariant).toBe(false);
  });

  it("is refused on the reference backend and on a device, by the CLI and by the addon", () => {
    expect(codeOf(() => selectBackend("reference", "cpu", undefined, true))).toBe("EM_CLI_USAGE");
    expect(codeOf(() => selectBackend(undefined, "sim", undefined, true))).toBe("EM_CLI_USAGE");
    expect(codeOf(() => selectBackend(undefined, "cuda:0", undefined, true))).toBe("EM_CLI_USAGE");
    expect(codeOf(() => addon.configure({ device: "sim", batchInvariant: true }))).toBe(
      "EM_NATIVE_ARG",
    );
    // The refusal left the backends as they were.
    expect(addon.backendInfo().device).toBe("cpu");
    expect(codeOf(() => addon.configure({ batchInvariant: "yes" as unknown as boolean }))).toBe(
      "EM_NATIVE_ARG",
    );
  });
});
