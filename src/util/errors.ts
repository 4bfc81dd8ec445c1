// Errors with stable codes. Every failure a user can meet has a code `EM_<AREA>_<WHAT>`,
// listed in docs/errors.md (a unit test keeps the two in step).

/** The registry of error codes: code -> one-line meaning. */
export const ERROR_CODES = {
  EM_CLI_USAGE: "a command was called with missing or invalid options",
  EM_ENV_MISSING_BINARY: "a binary the command needs (nats-server, kubectl, ...) was not found",
  EM_ARCH_UNKNOWN_PRESET: "a model preset name is not one of the known presets",
  EM_ARCH_INVALID: "explicit model architecture figures are missing or inconsistent",
  EM_PLAN_INVALID: "placement planner input is invalid (shards, redundant experts, plan version)",
  EM_PLAN_LOAD_INVALID:
    "per-expert load figures have the wrong shape or negative/non-finite values",
  EM_PLAN_CORRUPT: "a serialized placement plan failed validation",
  EM_PLAN_LOOKUP: "a layer or expert id is not in the placement plan",
  EM_MANIFEST_READ: "a manifest file could not be read",
  EM_MANIFEST_PARSE: "a manifest file is not valid YAML",
  EM_MANIFEST_INVALID: "a DeepSeekModel manifest has a missing or invalid field",
} as const;

export type ErrorCode = keyof typeof ERROR_CODES;

/** An error a user can act on: a stable code plus a message that says what to do. */
export class ExpertMeshError extends Error {
  readonly code: ErrorCode;
  constructor(code: ErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = "ExpertMeshError";
    this.code = code;
  }
}

/** One line for a user: `[EM_CODE] message` for our errors, the message otherwise. */
export function formatError(err: unknown): string {
  if (err instanceof ExpertMeshError) return `[${err.code}] ${err.message}`;
  if (err instanceof Error) return err.message;
  return String(err);
}
