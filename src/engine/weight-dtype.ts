// Serving a checkpoint in another weight dtype (`--dtype`, the manifest's spec.model.dtype):
// the linear layers' weights (attention projections, dense MLPs, shared and routed experts,
// the MTP layer's eh_proj), the ones DeepSeek-V3's fp8 release stores in fp8, are converted
// as they load. Embeddings, the LM head, norms and the router keep the checkpoint's dtype
// (vLLM's fp8 quantization leaves them too). fp8 is DeepSeek-V3's format: e4m3 with one
// scale per 128x128 block, so a bf16 checkpoint (DeepSeek-V2) served in fp8 takes half the
// memory; an fp8 checkpoint served in bf16 runs bf16 GEMMs (dequantized once, at load).
import { ExpertMeshError } from "../util/errors.ts";
import type { Weight } from "./backend.ts";
import { convertWeight } from "./native.ts";

/** What `--dtype` takes: "auto" keeps the checkpoint's dtype. */
export const SERVE_DTYPES = ["auto", "bf16", "fp16", "fp32", "fp8"] as const;
export type ServeDtype = (typeof SERVE_DTYPES)[number];

const WEIGHT_DTYPE: Record<Exclude<ServeDtype, "auto">, Weight["dtype"]> = {
  bf16: "bf16",
  fp16: "f16",
  fp32: "f32",
  fp8: "fp8",
};

/** `--dtype`'s value, or EM_CLI_USAGE. */
export function parseServeDtype(v: string | undefined): ServeDtype {
  if (v === undefined) return "auto";
  if (!(SERVE_DTYPES as readonly string[]).includes(v))
    throw new ExpertMeshError(
      "EM_CLI_USAGE",
      `--dtype must be ${SERVE_DTYPES.join(", ")}, got '${v}'`,
    );
  return v as ServeDtype;
}

/** A linear layer's weight in the serving dtype (the weight itself for "auto" or its own dtype). */
export function servedLinear(w: Weight, dtype: ServeDtype): Weight {
  return dtype === "auto" ? w : convertWeight(w, WEIGHT_DTYPE[dtype]);
}
