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
  EM_CONFIG_READ: "a model's config.json is missing, unreadable or not JSON",
  EM_CONFIG_UNKNOWN_ARCH: "config.json names an architecture other than DeepseekV2/V3ForCausalLM",
  EM_CONFIG_MISSING_FIELD: "config.json lacks a field that has no default",
  EM_CONFIG_INVALID: "a config.json field has the wrong type, an unsupported or inconsistent value",
  EM_GENERATION_CONFIG_INVALID:
    "generation_config.json or --override-generation-config is unreadable, not JSON, or has a sampling field out of range",
  EM_CKPT_READ: "a checkpoint file is missing or cannot be read",
  EM_CKPT_BAD_HEADER: "a safetensors file's header is malformed",
  EM_CKPT_TRUNCATED: "a safetensors file is shorter than its header says",
  EM_CKPT_READ_STALLED: "loading the weights made no progress for --load-stall-timeout seconds",
  EM_CKPT_BAD_INDEX: "model.safetensors.index.json is malformed or disagrees with its shards",
  EM_CKPT_MISSING_TENSOR: "a tensor asked for is not in the checkpoint",
  EM_CKPT_NO_MTP:
    "MTP speculative decoding asked for, but the model has no multi-token-prediction layer",
  EM_CKPT_SHAPE_MISMATCH: "a tensor's shape differs from the expected one",
  EM_CKPT_UNSUPPORTED_DTYPE: "a tensor's dtype cannot be read or is not one the caller accepts",
  EM_CKPT_WRITE_INVALID: "tensors given to the safetensors writer are inconsistent",
  EM_TOKENIZER_READ: "tokenizer.json or tokenizer_config.json is missing, unreadable or not JSON",
  EM_TOKENIZER_INVALID: "the tokenizer files are rejected or lack a special token",
  EM_TOKENIZER_TEMPLATE: "the chat template is missing or fails to render",
  EM_WIRE_TRUNCATED: "a wire frame is shorter than its header says",
  EM_WIRE_LENGTH: "a wire frame is longer than its header says",
  EM_WIRE_MAGIC: "a message is not an expertmesh wire frame",
  EM_WIRE_VERSION: "a wire frame has a version this build does not speak",
  EM_WIRE_KIND: "a wire frame has an unknown kind",
  EM_WIRE_DTYPE: "a wire frame has an unknown or misplaced dtype",
  EM_WIRE_CRC: "a wire frame's body does not match its checksum",
  EM_WIRE_RANGE: "a wire frame field is out of range (token index, width, offsets, weights)",
  EM_WIRE_PLAN_VERSION:
    "a frame was routed with another placement plan version than the receiver's",
  EM_NATIVE_MISSING: "the native engine (shards/build/expertmesh.node) is not built",
  EM_DISPATCH_UNAVAILABLE: "no replica of an expert shard answered within the deadline (HTTP 503)",
  EM_DISPATCH_REJECTED: "an expert shard refused a dispatch frame (its error reply says why)",
  EM_SHARD_INTERNAL: "an expert shard failed while computing a batch",
  EM_NATIVE_SHAPE: "a native op got arrays whose lengths do not match the shapes",
  EM_NATIVE_DTYPE: "a native op got a dtype it does not take",
  EM_NATIVE_ARG: "a native op got an invalid argument",
  EM_NATIVE_UNSUPPORTED:
    "the native backend does not implement this op, dtype or ISA here, or the --device is not there",
  EM_ENGINE_NONFINITE:
    "the model's logits hold NaN or infinity (weights or activations overflowed): the request ends instead of returning a random token",
  EM_NATIVE_NOMEM: "the native engine could not allocate memory",
  EM_NATIVE_INTERNAL: "the native engine hit an internal error (a bug)",
  EM_NATIVE_CRASH:
    "the process died of a fatal signal (a fault or abort in the native engine, or a fatal error of Node.js); written by the addon's signal handler to the termination log",
  EM_KV_BUDGET:
    "the KV cache memory budget cannot hold what was asked (blocks, one max-length sequence)",
  EM_PREFIX_DISK:
    "the prefix cache's disk folder (--prefix-cache-disk) cannot be made or written at start",
  EM_PREFIX_REMOTE:
    "the prefix cache's NATS tier (--prefix-cache-remote) cannot be used: no JetStream, a block over 64 values of max_payload, or the bucket cannot be made",
  EM_PREFILL_FRAME:
    "a prefill job (disaggregated prefill, ADR 0029) or its answer is malformed: refused, never run",
  EM_PREFILL_MISMATCH:
    "a prefill job is for blocks of another fingerprint (model, weights, kernels or KV cache layout) than the prefill gateway writes",
  EM_PREFILL_CANCELLED:
    "a prefill job was cancelled by the gateway that sent it (its requests were cancelled, or it stopped waiting): dropped unfinished",
  EM_GATEWAY_TLS:
    "the gateway's --tls-cert holds no PEM certificate, --tls-key no PEM key, the key is not the certificate's, or --tls-client-ca holds anything but PEM certificates",
  EM_GATEWAY_API_KEYS:
    "the gateway's --api-keys-file holds no key (keys are separated by commas or line ends)",
  EM_GATEWAY_BAD_REQUEST: "a request body is not JSON, or a field is missing or invalid (HTTP 400)",
  EM_GATEWAY_UNKNOWN_MODEL: "a request names a model this gateway does not serve (HTTP 404)",
  EM_GATEWAY_RESPONSE_NOT_FOUND:
    "a response id this gateway does not keep (not stored, deleted, pushed out, expired, or another gateway's without a shared files folder) (HTTP 404)",
  EM_GATEWAY_CONVERSATION_NOT_FOUND:
    "a conversation id this gateway does not keep (deleted, pushed out, another API key's, or another gateway's without a shared files folder), or an item id its conversation does not hold (HTTP 404)",
  EM_GATEWAY_COMPLETION_NOT_FOUND:
    "a stored chat completion id this gateway does not keep (not made with store: true, deleted, pushed out, expired, another API key's, or another gateway's without a shared files folder) (HTTP 404)",
  EM_GATEWAY_RESPONSE_LOST:
    "a response in a shared files folder was left in_progress by a gateway that stopped (the failed response's error)",
  EM_FILES_DIR:
    "the gateway's --files-dir (spec.gateway.batch's folder) cannot be made or written at start",
  EM_BATCH_REMOTE:
    "expertmesh batch: the gateway could not be reached, or refused or failed a call of its Files or Batch API (the answer's message says which)",
  EM_GATEWAY_FILE_NOT_FOUND:
    "a file id this gateway does not keep (deleted, another API key's, or another gateway's) (HTTP 404)",
  EM_GATEWAY_FILE_TOO_LARGE: "an uploaded file is larger than --files-max-bytes (HTTP 413)",
  EM_GATEWAY_FILES_FULL:
    "the files folder holds --files-max-total bytes (spec.gateway.batch.storageBytes): an upload or a new batch that would take it past that is refused until files are deleted or expire (HTTP 507)",
  EM_GATEWAY_FILES_OFF:
    "the Files and Batch APIs on a gateway started without --files-dir (a manifest without spec.gateway.batch) (HTTP 404)",
  EM_GATEWAY_BATCH_NOT_FOUND:
    "a batch id this gateway does not keep (another API key's, or another gateway's) (HTTP 404)",
  EM_GATEWAY_BATCH_STATE:
    "a batch asked to do what its status does not allow: cancel one that is done (HTTP 409)",
  EM_GATEWAY_UPLOAD_NOT_FOUND:
    "an upload id this gateway does not keep (made with another API key, forgotten an hour after it expired, or another gateway's without a shared files folder) (HTTP 404)",
  EM_GATEWAY_UPLOAD_STATE:
    "an upload asked to take a part, complete or cancel when it is no longer pending (completed, cancelled, expired, or being completed) (HTTP 409)",
  EM_GATEWAY_PROMPT_TOO_LONG: "prompt plus max_tokens exceed the model's context length (HTTP 400)",
  EM_GATEWAY_BODY_TOO_LARGE: "a request body is larger than --max-request-bytes (HTTP 413)",
  EM_GATEWAY_UNAUTHORIZED: "a request lacks a valid bearer API key (HTTP 401)",
  EM_GATEWAY_OVERLOADED: "the admission queue is full; retry after Retry-After seconds (HTTP 429)",
  EM_GATEWAY_NOT_FOUND: "no such route (HTTP 404)",
  EM_GATEWAY_STARTING:
    "the gateway is still loading its weights or connecting; retry after Retry-After seconds (HTTP 503)",
  EM_GATEWAY_INTERNAL: "the gateway failed while serving a request (HTTP 500, a bug)",
  EM_PLAN_MISMATCH: "a placement plan is for another model (other expert count or MoE layers)",
  EM_LISTEN_FAILED:
    "a server could not listen on its address (the port is in use, or the host is not local)",
  EM_NATS_CONNECT:
    "the NATS server could not be reached in time, refused the credentials, or --nats is no NATS URL",
  EM_NATS_TLS:
    "the NATS TLS files (--nats-tls-ca, --nats-tls-cert, --nats-tls-key) are not PEM certificates and a key, or the key is not the certificate's",
  EM_NATS_AUTH:
    "the NATS credentials are not what they claim (an empty password or token, a seed that is no NKEY user seed, a .creds file without its JWT and seed), more than one kind was given, or the URL holds them",
  EM_NATS_PERMISSION:
    "the NATS server refused a subscription a gateway or shard needs: its NATS user lacks permissions on its model's subjects",
  EM_CLI_FILE: "a file named by a command-line option (--plan, --nats-creds, ...) cannot be read",
  EM_WRITE_FAILED: "files could not be written (no permission, not a folder, disk full)",
  EM_LOCAL_CHILD_EXITED:
    "a process `expertmesh up` started (nats-server, a shard, the gateway) exited before it was ready",
  EM_HF_DOWNLOAD:
    "`expertmesh fetch` or `up` could not fetch a model from the Hugging Face Hub (unreachable, refused, not a checkpoint, cut short)",
  EM_BENCH_UNREACHABLE: "`expertmesh bench` got no answer from the server's URL",
  EM_BENCH_REFUSED:
    "the server `expertmesh bench` measures refused to list its models or does not serve the one named",
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
