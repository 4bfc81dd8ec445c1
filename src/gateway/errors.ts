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
  EM_GATEWAY_CONVERSATION_NOT_FOUND: 404,
  EM_GATEWAY_COMPLETION_NOT_FOUND: 404,
  EM_GATEWAY_NOT_FOUND: 404,
  EM_GATEWAY_FILE_NOT_FOUND: 404,
  EM_GATEWAY_BATCH_NOT_FOUND: 404,
  EM_GATEWAY_FILES_OFF: 404,
  EM_GATEWAY_FILE_TOO_LARGE: 413,
  EM_GATEWAY_FILES_FULL: 507,
  EM_GATEWAY_BATCH_STATE: 409,
  EM_GATEWAY_UPLOAD_NOT_FOUND: 404,
  EM_GATEWAY_UPLOAD_STATE: 409,
  EM_GATEWAY_BODY_TOO_LARGE: 413,
  EM_GATEWAY_OVERLOADED: 429,
  EM_GATEWAY_STARTING: 503,
  EM_DISPATCH_UNAVAILABLE: 503,
  EM_DISPATCH_REJECTED: 503,
  EM_WIRE_PLAN_VERSION: 503,
};

/**
 * Refusals that the same request, sent again at once, meets again: the official SDKs retry
 * any 5xx unless told otherwise (their `x-should-retry: false`), and an upload of 200 MB
 * three times over to a full folder is only waste.
 */
const NOT_RETRIED = new Set<ErrorCode>(["EM_GATEWAY_FILES_FULL"]);

/** The headers of a refusal: when to come back (429, 503), or not to retry at once. */
export function refusalHeaders(e: ApiError): Record<string, string> {
  const h: Record<string, string> = {};
  if (e.retryAfter !== undefined) h["retry-after"] = String(e.retryAfter);
  if (NOT_RETRIED.has(e.code as ErrorCode)) h["x-should-retry"] = "false";
  return h;
}

/** OpenAI's error `type` for a status. */
function typeOf(status: number): string {
  if (status === 401) return "authentication_error";
  if (status === 404) return "not_found_error";
  if (status === 429) return "rate_limit_error";
  if (status >= 500) return "server_error";
  return "invalid_request_error";
}

/** One of ajv's errors, as fastify hands them over in `error.validation`. */
export interface SchemaError {
  keyword?: string;
  instancePath?: string;
  params?: Record<string, unknown>;
  message?: string;
}

interface FastifyLikeError {
  code?: string;
  statusCode?: number;
  message: string;
  validation?: SchemaError[];
}

/**
 * What ajv's errors say, for a person: the failures of a nullable field's `null` branch and
 * the anyOf/oneOf summaries left out where a real failure at that place or inside it says more, a
 * field's const failures (one per allowed value) merged into "must be one of ...", the name
 * of an unknown property given, and each sentence once.
 */
export function describeSchemaErrors(errors: readonly SchemaError[]): string {
  const where = (e: SchemaError) => `body${e.instancePath ?? ""}`;
  const specific = new Set(errors.filter((e) => !isUnionSummary(e) && !isNullBranch(e)).map(where));
  // a real failure at this place or inside it
  const saysMore = (at: string) => [...specific].some((p) => p === at || p.startsWith(`${at}/`));
  // a field's allowed values, gathered over its const failures; its sentence keeps the place
  // of the first one
  const allowed = new Map<string, unknown[]>();
  const parts: (string | { oneOf: string })[] = [];
  for (const e of errors) {
    const at = where(e);
    if (e.keyword === "const") {
      if (!allowed.has(at)) {
        allowed.set(at, []);
        parts.push({ oneOf: at });
      }
      allowed.get(at)!.push(e.params?.["allowedValue"]);
      continue;
    }
    if ((isUnionSummary(e) || isNullBranch(e)) && saysMore(at)) continue;
    let text = `${at} ${e.message ?? "is invalid"}`;
    const extra = e.params?.["additionalProperty"];
    if (e.keyword === "additionalProperties" && typeof extra === "string") text += ` ('${extra}')`;
    parts.push(text);
  }
  const sentences = parts.map((p) => {
    if (typeof p === "string") return p;
    const values = allowed.get(p.oneOf)!.map((v) => JSON.stringify(v));
    return values.length === 1
      ? `${p.oneOf} must be ${values[0]}`
      : `${p.oneOf} must be one of ${values.join(", ")}`;
  });
  return [...new Set(sentences)].join(", ");
}

function isUnionSummary(e: SchemaError): boolean {
  return e.keyword === "anyOf" || e.keyword === "oneOf";
}

function isNullBranch(e: SchemaError): boolean {
  return e.keyword === "type" && e.params?.["type"] === "null";
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
    const what = describeSchemaErrors(e.validation) || e.message;
    return new ApiError("EM_GATEWAY_BAD_REQUEST", `invalid request: ${what}`, {
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

/** Anthropic's error type for an HTTP status. */
function anthropicType(status: number): string {
  if (status === 401) return "authentication_error";
  if (status === 403) return "permission_error";
  if (status === 404) return "not_found_error";
  if (status === 413) return "request_too_large";
  if (status === 429) return "rate_limit_error";
  if (status === 503) return "overloaded_error";
  if (status >= 500) return "api_error";
  return "invalid_request_error";
}

/** The body of a refusal in Anthropic's shape (Messages, and any request of its SDK). */
export function anthropicErrorBody(e: ApiError) {
  return {
    type: "error",
    error: {
      type: anthropicType(e.status),
      message: e.message,
      code: e.code,
      ...(e.param ? { param: e.param } : {}),
    },
  };
}

/**
 * The body of a refusal in the shape of the API the request speaks: Anthropic's when it
 * carries `anthropic-version` (its SDK sends that header with every request: the Files API,
 * the models list), else OpenAI's.
 */
export function errorBodyFor(headers: Record<string, unknown>, e: ApiError) {
  return headers["anthropic-version"] !== undefined ? anthropicErrorBody(e) : errorBody(e);
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
