// Where `expertmesh up` runs each role: as the operator would place its pods (the roles that
// request GPUs, `spec.gateway.gpus` and `spec.experts.gpusPerShard`, run `--device cuda:N`),
// on the CUDA devices of this machine. Pure, so that the choice is unit-tested.
import { ExpertMeshError } from "../util/errors.ts";

/** `up --device`: auto (default) follows the manifest where CUDA is there, else the CPU. */
export type DeviceFlag = "auto" | "cpu" | "cuda";

export interface LocalDevices {
  /** The --device of shard k (every replica of it). */
  readonly shard: (k: number) => string;
  readonly gateway: string;
  /** One line for the user: where things run, and why. */
  readonly note: string;
}

/** What this machine has: the addon's cudaStatus() (devices 0 when it has no CUDA). */
export interface CudaFound {
  readonly devices: number;
  readonly status: string;
}

export function parseDeviceFlag(v: string | undefined): DeviceFlag {
  const flag = v ?? "auto";
  if (flag !== "auto" && flag !== "cpu" && flag !== "cuda")
    throw new ExpertMeshError("EM_CLI_USAGE", `--device must be auto, cpu or cuda, got '${flag}'`);
  return flag;
}

/**
 * Shard k of a manifest that gives shards GPUs runs on cuda:(k mod devices), the gateway of
 * one that gives it GPUs on cuda:0; everything else on the CPU. `cuda` insists (no device:
 * EM_NATIVE_UNSUPPORTED with the driver's or the build's reason), `auto` falls back to the
 * CPU and says why, `cpu` never uses a GPU.
 */
export function localDevices(
  flag: DeviceFlag,
  gpus: { readonly gateway: number; readonly perShard: number },
  cuda: CudaFound,
): LocalDevices {
  const wanted = gpus.gateway > 0 || gpus.perShard > 0;
  const cpu = (note: string): LocalDevices => ({ shard: () => "cpu", gateway: "cpu", note });
  if (flag === "cpu") return cpu("devices: everything on the CPU (--device cpu)");
  if (!wanted) return cpu("devices: everything on the CPU (the manifest requests no GPUs)");
  if (cuda.devices === 0) {
    if (flag === "cuda")
      throw new ExpertMeshError(
        "EM_NATIVE_UNSUPPORTED",
        `--device cuda: the manifest requests GPUs but this machine has no usable CUDA device (${cuda.status})`,
      );
    return cpu(`devices: everything on the CPU (the manifest requests GPUs; ${cuda.status})`);
  }
  const shard = (k: number) => (gpus.perShard > 0 ? `cuda:${k % cuda.devices}` : "cpu");
  const gateway = gpus.gateway > 0 ? "cuda:0" : "cpu";
  const shards =
    gpus.perShard > 0
      ? `shards over ${cuda.devices} CUDA device${cuda.devices > 1 ? "s" : ""} (shard k on cuda:k mod ${cuda.devices})`
      : "shards on the CPU";
  return { shard, gateway, note: `devices: ${shards}, the gateway on ${gateway}` };
}
