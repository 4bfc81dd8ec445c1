// Errors in OpenAI's format, {error: {message, type, param, code}}, with our stable codes
// (docs/errors.md) in `code`. Every error the routes raise goes through toApiError.
import { ERROR_CODES, type ErrorCode, ExpertMeshError } from "../util/errors.ts";

export interface ApiErrorBody {
  error: { message: string; type: string; param: string | null; code: ErrorCode };
}

/** An error with its HTTP status and the request field it is about. */
export class ApiError extends ExpertMeshError {
  readonly status: number;
  readonly param: string | null;
  /** Seconds, for 429. */
  readonly retryAfter?: number;

  constructor(
    code: ErrorCode,
    message: string,
    o: { status?: number; param?: string | null; retryAfter?: number } = {},
  ) {
    super(code, message);
    this.name = "ApiError";
    this.status = o.status ?? STATUS[code] ?? 500;
    this.param = o.param ?? null;
    if (o.retryAfter !== undefined) this.retryAfter = o.retryAfter;
  }
}

const STATUS: Partial<Record<ErrorCode, number>> = {
  EM_GATEWAY_BAD_REQUEST: 400,
  EM_GATEWAY_PROMPT_TOO_LONG: 400,
  // The template compiled at start: failing on a request's messages is the request's fault
  // (a conversation it refuses, a message to continue that it rewrites).
  EM_TOKENIZER_TEMPLATE: 400,
  EM_GATEWAY_UNAUTHORIZED: 401,
  EM_GATEWAY_UNKNOWN_MODEL: 404,
  EM_GATEWAY_RESPONSE_NOT_FOUND: 404,
  EM_GATEWAY_NOT_FOUND: 404,
  EM_GATEWAY_BODY_TOO_LARGE: 413,
  EM_GATEWAY_OVERLOADED: 429,
  EM_GATEWAY_STARTING: 503,
  EM_DISPATCH_UNAVAILABLE: 503,
  EM_DISPATCH_REJECTED: 503,
  EM_WIRE_PLAN_VERSION: 503,
};

/** OpenAI's error `type` for a status. */
function typeOf(status: number): string {
  if (status === 401) return "authentication_error";
  if (status === 404) return "not_found_error";
  if (status === 429) return "rate_limit_error";
  if (status >= 500) return "server_error";
  return "invalid_request_error";
}

interface FastifyLikeError {
  code?: string;
  statusCode?: number;
  message: string;
  validation?: { instancePath?: string; params?: Record<string, unknown>; message?: string }[];
}

/** Maps anything thrown while serving a request to an ApiError. */
export function toApiError(err: unknown): ApiError {
  if (err instanceof ApiError) return err;
  if (err instanceof ExpertMeshError)
    return new ApiError(err.code, err.message, { status: STATUS[err.code] ?? 500 });
  const e = err as FastifyLikeError;
  if (e?.validation?.length) {
    const v = e.validation[0]!;
    const path = (v.instancePath ?? "").replace(/^\//, "").replaceAll("/", ".");
    const missing = v.params?.["missingProperty"];
    const param = [path, typeof missing === "string" ? missing : ""].filter(Boolean).join(".");
    return new ApiError("EM_GATEWAY_BAD_REQUEST", `invalid request: ${e.message}`, {
      param: param || null,
    });
  }
  if (e?.code === "FST_ERR_CTP_BODY_TOO_LARGE")
    return new ApiError("EM_GATEWAY_BODY_TOO_LARGE", e.message);
  if (typeof e?.statusCode === "number" && e.statusCode >= 400 && e.statusCode < 500)
    return new ApiError("EM_GATEWAY_BAD_REQUEST", e.message, { status: e.statusCode });
  return new ApiError(
    "EM_GATEWAY_INTERNAL",
    `${ERROR_CODES.EM_GATEWAY_INTERNAL}: ${err instanceof Error ? err.message : String(err)}`,
  );
}

export function errorBody(e: ApiError): ApiErrorBody {
  return { error: { message: e.message, type: typeOf(e.status), param: e.param, code: e.code } };
}

/**
 * `err` with its param renamed by the first rule whose pattern matches it (the match
 * replaced, as String.replace does), else as it is: a refusal of the chat machinery naming
 * the field of the API the request came in (Responses, Messages).
 */
export function renameParam(err: unknown, rules: readonly [RegExp, string][]): unknown {
  if (!(err instanceof ApiError) || err.param === null) return err;
  const hit = rules.find(([re]) => re.test(err.param!));
  if (!hit) return err;
  return new ApiError(err.code, err.message, {
    status: err.status,
    param: err.param.replace(hit[0], hit[1]),
    ...(err.retryAfter !== undefined ? { retryAfter: err.retryAfter } : {}),
  });
}
