// Errors with stable codes. Every failure a user can meet has a code `EM_<AREA>_<WHAT>`,
// listed in docs/errors.md (a unit test keeps the two in step).

/** The registry of error codes: code -> one-line meaning. */
export const ERROR_CODES = {
  EM_CLI_USAGE: "a command was called with missing or invalid options",
  EM_ENV_MISSING_BINARY: "a binary the command needs (nats-server, kubectl, ...) was not found",
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
