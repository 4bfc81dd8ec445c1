// Parsing of the option values the commands share, with EM_CLI_USAGE errors that name
// the flag.
import { ExpertMeshError } from "../util/errors.ts";

/** An integer flag (`dflt` when absent), at least `min`. */
export function intFlag(v: string | undefined, flag: string, dflt: number, min = 1): number {
  if (v === undefined) return dflt;
  const n = Number(v);
  if (!Number.isSafeInteger(n) || n < min)
    throw new ExpertMeshError("EM_CLI_USAGE", `${flag} must be an integer >= ${min}, got '${v}'`);
  return n;
}

/** A number flag (`dflt` when absent), at least `min`. */
export function numberFlag(v: string | undefined, flag: string, dflt: number, min = 0): number {
  if (v === undefined) return dflt;
  const n = Number(v);
  if (!Number.isFinite(n) || n < min)
    throw new ExpertMeshError("EM_CLI_USAGE", `${flag} must be a number >= ${min}, got '${v}'`);
  return n;
}

/** A true/false flag (`dflt` when absent). */
export function boolFlag(v: string | undefined, flag: string, dflt: boolean): boolean {
  if (v === undefined) return dflt;
  if (v === "true") return true;
  if (v === "false") return false;
  throw new ExpertMeshError("EM_CLI_USAGE", `${flag} must be true or false, got '${v}'`);
}

/** The model name in NATS subjects when --model-name is absent: the checkpoint folder's name. */
export function defaultModelName(modelDir: string): string {
  return modelDir.replace(/\/+$/, "").split("/").pop()!;
}
