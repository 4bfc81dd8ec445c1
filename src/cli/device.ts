// --backend and --device of the commands that run the model (shard, gateway, generate):
// one place that picks the Backend, so the three agree on names, defaults and errors.
import type { Backend } from "../engine/backend.ts";
import {
  BF16_ISAS,
  CPU_MATMULS,
  type CpuMatmul,
  DEVICE_HELP,
  type NativeInfo,
  nativeBackend,
} from "../engine/native.ts";
import { referenceBackend } from "../engine/reference.ts";
import { ExpertMeshError } from "../util/errors.ts";

export interface SelectedBackend {
  readonly backend: Backend;
  /** The device the ops run on ("cpu", "cuda:0", ...). */
  readonly device: string;
  /** One line for logs: backend, device, what falls back to the CPU. */
  readonly summary: string;
}

/**
 * The Backend for `--backend` (native, default, or reference) on `--device` (cpu, default,
 * cuda or cuda:N), its CPU kernels chosen by `--cpu-matmul` (fp32, default, or bf16) and
 * `--batch-invariant` (ADR 0027). Throws EM_CLI_USAGE for unknown names, for a device or bf16
 * matmuls with the reference backend, and for --batch-invariant anywhere but the native
 * backend on the CPU; and the addon's EM_NATIVE_UNSUPPORTED / EM_NATIVE_ARG when the device
 * is not there (this build has no CUDA, no CUDA device) or is not a device string.
 */
export function selectBackend(
  backendFlag: string | undefined,
  deviceFlag: string | undefined,
  cpuMatmulFlag?: string,
  batchInvariant = false,
): SelectedBackend {
  const name = backendFlag ?? "native";
  const device = deviceFlag ?? "cpu";
  if (name !== "native" && name !== "reference")
    throw new ExpertMeshError(
      "EM_CLI_USAGE",
      `--backend must be native or reference, got '${name}'`,
    );
  if (cpuMatmulFlag !== undefined && !(CPU_MATMULS as readonly string[]).includes(cpuMatmulFlag))
    throw new ExpertMeshError(
      "EM_CLI_USAGE",
      `--cpu-matmul must be ${CPU_MATMULS.join(" or ")}, got '${cpuMatmulFlag}'`,
    );
  const cpuMatmul = cpuMatmulFlag as CpuMatmul | undefined;
  if (batchInvariant && name !== "native")
    throw new ExpertMeshError(
      "EM_CLI_USAGE",
      "--batch-invariant: only the native backend has batch-invariant kernels (use --backend native)",
    );
  if (batchInvariant && device !== "cpu")
    throw new ExpertMeshError(
      "EM_CLI_USAGE",
      `--batch-invariant needs --device cpu, not '${device}': only the CPU backend has batch-invariant kernels`,
    );
  if (name === "reference") {
    if (device !== "cpu")
      throw new ExpertMeshError(
        "EM_CLI_USAGE",
        `--device ${device}: the reference backend runs on the CPU only (use --backend native)`,
      );
    if (cpuMatmul === "bf16")
      throw new ExpertMeshError(
        "EM_CLI_USAGE",
        "--cpu-matmul bf16: the reference backend computes in fp32 only (use --backend native)",
      );
    return { backend: referenceBackend, device, summary: "reference backend (TypeScript, CPU)" };
  }
  if (device === "")
    throw new ExpertMeshError("EM_CLI_USAGE", `--device must be ${DEVICE_HELP}, got ''`);
  const backend = nativeBackend({
    device,
    ...(cpuMatmul ? { cpuMatmul } : {}),
    ...(batchInvariant ? { batchInvariant } : {}),
  });
  let summary = backendSummary(backend.info);
  if (cpuMatmul === "bf16" && !BF16_ISAS.includes(backend.info.cpu.isa))
    summary += "; --cpu-matmul bf16: this CPU has neither AMX nor AVX512_BF16, so fp32 products";
  return { backend, device: backend.info.device, summary };
}

/** "native backend on cuda:0 (cuda sm_90, 132 SMs; on the CPU (avx512, 16 threads): sample, ...)". */
export function backendSummary(
  info: Omit<NativeInfo, "ops" | "abiVersion"> & { ops: Partial<NativeInfo["ops"]> },
): string {
  if (info.backend === "cpu")
    return `native backend on cpu (${info.isa}, ${info.threads} threads${info.cpu.batchInvariant ? ", batch-invariant" : ""})`;
  type Op = keyof NativeInfo["ops"];
  const fallback = (Object.entries(info.fallback) as [Op, string[]][])
    .map(([op, dtypes]) =>
      dtypes.length === info.ops[op]?.length ? op : `${op} (${dtypes.join(", ")})`,
    )
    .join(", ");
  // sim: the stand-in device (shards/include/expertmesh/sim.h), the CPU kernels behind it
  const units = info.backend === "sim" ? "threads, a stand-in for a GPU" : "SMs";
  return (
    `native backend on ${info.device} (${info.backend} ${info.isa}, ${info.threads} ${units}; ` +
    `on the CPU (${info.cpu.isa}, ${info.cpu.threads} threads): ${fallback || "nothing"})`
  );
}
