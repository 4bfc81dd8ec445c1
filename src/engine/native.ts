// The native backend: the N-API addon built from shards/ (C++17, runtime ISA dispatch,
// thread pool; a CUDA backend when built with it). Loaded from shards/build/expertmesh.node,
// or $EM_NATIVE_ADDON. The device (`--device cpu|cuda|cuda:N`) is per process: the addon
// runs each op on the device when the device has it, else on its CPU backend.
import { existsSync } from "node:fs";
import { createRequire } from "node:module";
import { fileURLToPath } from "node:url";
import type * as Native from "../../shards/addon/expertmesh.d.ts";
import { ERROR_CODES, type ErrorCode, ExpertMeshError } from "../util/errors.ts";
import type { Backend, GateConfig, MlaArgs, MoeArgs, RopeConfig, Weight } from "./backend.ts";
import type { KvDtype } from "./kv-format.ts";

interface AddonWeight {
  dtype: Weight["dtype"];
  shape: number[];
  data: ArrayBufferView;
  scale?: Float32Array;
}

/** backendInfo() of the addon. */
export type NativeInfo = Native.BackendInfo;

/** The addon's functions (see shards/addon/addon.cpp). */
export interface Addon {
  backendInfo(): NativeInfo;
  configure(o: {
    device?: string;
    isa?: string;
    threads?: number;
    resident?: boolean;
    kvMirror?: boolean;
    batchInvariant?: boolean;
  }): NativeInfo;
  cudaStatus(): { compiled: boolean; devices: number; status: string };
  scratchBytes(): number;
  trimScratch(): number;
  matmul(x: Float32Array, rows: number, w: AddonWeight, out?: Float32Array): Float32Array;
  rmsnorm(x: Float32Array, weight: AddonWeight, eps: number, out?: Float32Array): Float32Array;
  siluMul(gate: Float32Array, up: Float32Array, out?: Float32Array): Float32Array;
  moeFfn(o: Record<string, unknown>): Float32Array;
  rope(x: Float32Array, positions: Int32Array, o: Record<string, unknown>): Float32Array;
  mlaAttention(o: Record<string, unknown>): Float32Array;
  kvRowBytes(dtype: KvDtype, kvLoraRank: number, ropeDim: number): number;
  kvEncode(
    dtype: KvDtype,
    kvLoraRank: number,
    ropeDim: number,
    rows: Float32Array,
    out: Uint8Array,
    byteOffset: number,
  ): void;
  kvWrite(src: Uint8Array, out: Uint8Array, byteOffset: number): void;
  gate(o: Record<string, unknown>): { indices: Int32Array; weights: Float32Array };
  sample: typeof Native.sample;
  logprobs: typeof Native.logprobs;
  crc32: typeof Native.crc32;
  wirePack: typeof Native.wirePack;
  wireUnpack: typeof Native.wireUnpack;
  convert(w: AddonWeight, to: string): unknown;
}

/** Where the addon is built by `npm run build` (shards/build.sh). */
export const DEFAULT_ADDON_PATH = fileURLToPath(
  new URL("../../shards/build/expertmesh.node", import.meta.url),
);

let loaded: Addon | undefined;

/** Loads the addon once; a clear error says how to build it when it is missing. */
export function loadAddon(path = process.env["EM_NATIVE_ADDON"] ?? DEFAULT_ADDON_PATH): Addon {
  if (loaded) return loaded;
  if (!existsSync(path)) {
    throw new ExpertMeshError(
      "EM_NATIVE_MISSING",
      `the native engine is not built (${path} missing): run \`npm run build\` (needs cmake and a C++17 compiler)`,
    );
  }
  loaded = createRequire(import.meta.url)(path) as Addon;
  return loaded;
}

const views = new WeakMap<Weight, AddonWeight>();

function addonWeight(w: Weight): AddonWeight {
  let v = views.get(w);
  if (!v) {
    v = {
      dtype: w.dtype,
      shape: w.rows === 1 ? [w.cols] : [w.rows, w.cols],
      data: w.data,
      ...(w.scaleInv ? { scale: w.scaleInv } : {}),
    };
    views.set(w, v);
  }
  return v;
}

/**
 * A weight in another dtype, converted by the addon (fp8: dequantized with its block scales;
 * to fp8: quantized per 128x128 block on the CPU backend, as DeepSeek-V3 stores its weights).
 */
export function convertWeight(w: Weight, to: Weight["dtype"], addon: Addon = loadAddon()): Weight {
  if (w.dtype === to) return w;
  const out = addon.convert(addonWeight(w), to);
  const shape = { rows: w.rows, cols: w.cols };
  if (to === "fp8") {
    const q = out as { data: Uint8Array; scaleInv: Float32Array };
    return { dtype: "fp8", data: q.data, scaleInv: q.scaleInv, ...shape };
  }
  return { dtype: to, data: out as Float32Array | Uint16Array, ...shape };
}

/** The devices `--device` takes: cpu, cuda (= cuda:0) or cuda:N. */
export const DEVICE_HELP = "cpu | cuda | cuda:N";

/**
 * Points the addon at `device` ("cpu", "cuda", "cuda:N") and returns its backendInfo().
 * Throws ExpertMeshError: EM_NATIVE_UNSUPPORTED when the device is not there (no CUDA in
 * this build, no CUDA device), EM_NATIVE_ARG for a string that is not a device.
 */
export function configureDevice(
  device: string,
  addon: Addon = loadAddon(),
  isa?: string,
  batchInvariant?: boolean,
): NativeInfo {
  try {
    return addon.configure({
      device,
      ...(isa ? { isa } : {}),
      ...(batchInvariant ? { batchInvariant } : {}),
    });
  } catch (e) {
    const code = (e as { code?: unknown }).code;
    if (typeof code === "string" && code in ERROR_CODES) {
      const detail = (e as Error).message.replace(/^device '[^']*': /, "");
      const hint = code === "EM_NATIVE_UNSUPPORTED" ? "; --device cpu runs on the CPU backend" : "";
      throw new ExpertMeshError(code as ErrorCode, `--device ${device}: ${detail}${hint}`, {
        cause: e,
      });
    }
    throw e;
  }
}

/** How the CPU backend multiplies by bf16 and fp8 weights (`--cpu-matmul`, spec.model.cpuMatmul). */
export const CPU_MATMULS = ["fp32", "bf16"] as const;
export type CpuMatmul = (typeof CPU_MATMULS)[number];

/**
 * The CPU ISA for `--cpu-matmul`: bf16 takes AMX tiles, else AVX512_BF16 dot products, where
 * the CPU has them (x rounded to bf16); fp32, or a CPU with neither, the default (fp32
 * products). undefined: the addon's default (auto, or $EM_CPU_ISA).
 */
export function cpuIsaFor(matmul: CpuMatmul, available: readonly string[]): string | undefined {
  if (matmul === "fp32") return undefined;
  return BF16_ISAS.find((isa) => available.includes(isa));
}

/** The CPU ISAs that round x to bf16 in bf16 GEMMs, the fastest first. */
export const BF16_ISAS: readonly string[] = ["amx", "avx512bf16"];

/**
 * The Backend over the addon; with `device`, configures the addon for it first, with
 * `cpuMatmul` its CPU backend (cpuIsaFor), and with `batchInvariant` that backend's
 * batch-invariant kernels (ADR 0027).
 */
export function nativeBackend(
  options: { device?: string; addon?: Addon; cpuMatmul?: CpuMatmul; batchInvariant?: boolean } = {},
): Backend & { info: NativeInfo } {
  const addon = options.addon ?? loadAddon();
  const current = addon.backendInfo();
  // With cpuMatmul the CPU backend is always configured (fp32 undoes an earlier bf16).
  const isa = options.cpuMatmul && (cpuIsaFor(options.cpuMatmul, current.availableIsas) ?? "auto");
  const info =
    options.device === undefined && isa === undefined && !options.batchInvariant
      ? current
      : configureDevice(options.device ?? current.device, addon, isa, options.batchInvariant);
  return {
    name: "native",
    info,
    matmul: (x, m, w, out) => addon.matmul(x, m, addonWeight(w), out),
    scratchBytes: () => addon.scratchBytes(),
    trimScratch: () => addon.trimScratch(),
    rmsnorm: (x, _m, weight, eps, out) => addon.rmsnorm(x, addonWeight(weight), eps, out),
    siluMul: (gate, up, out) => addon.siluMul(gate, up, out),
    rope(x, _t, _heads, stride, offset, positions, cfg: RopeConfig) {
      addon.rope(x, positions, { ...cfg, headDim: stride, offset });
    },
    gate(x, _t, weight, bias, cfg: GateConfig) {
      const r = addon.gate({
        x,
        weight: addonWeight(weight),
        ...(bias ? { bias } : {}),
        scoreFunc: cfg.scoring,
        topkMethod: cfg.method,
        topK: cfg.topK,
        nGroup: cfg.nGroup,
        topkGroup: cfg.topkGroup,
        normTopkProb: cfg.normTopkProb,
        routedScalingFactor: cfg.routedScalingFactor,
      });
      return { ids: r.indices, weights: r.weights };
    },
    moe: (a: MoeArgs) =>
      addon.moeFfn({
        x: a.x,
        dim: a.dim,
        expertOffsets: a.offsets,
        w1: a.w1.map(addonWeight),
        w2: a.w2.map(addonWeight),
        w3: a.w3.map(addonWeight),
        rowWeights: a.rowWeight,
        outIndex: a.outIndex,
        outRows: a.numOut,
        ...(a.xIndex ? { xIndex: a.xIndex } : {}),
        out: a.out,
      }),
    mla: (a: MlaArgs) =>
      addon.mlaAttention({
        q: a.q,
        positions: a.positions,
        qOffsets: a.qOffsets,
        pages: {
          pool: a.pages.pool,
          dtype: a.pages.dtype,
          blockSize: a.pages.blockSize,
          table: a.table,
          tableOffsets: a.tableOffsets,
        },
        numHeads: a.heads,
        qkNopeHeadDim: a.nopeDim,
        qkRopeHeadDim: a.ropeDim,
        vHeadDim: a.vDim,
        kvLoraRank: a.kvLoraRank,
        wkvB: addonWeight(a.wkvB),
        softmaxScale: a.softmaxScale,
        out: a.out,
      }),
    sample: (logits, vocab, rows) => addon.sample(logits, vocab, rows),
    logprobs: (logits, vocab, ids, k) => addon.logprobs(logits, vocab, ids, k),
  };
}
