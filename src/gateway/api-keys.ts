// The bearer keys a gateway accepts (--api-key, $EM_API_KEYS, --api-keys-file), shared by the
// HTTP and the gRPC API. A keys file is read again when it changes (ADR 0043): in a pod it is
// spec.gateway.apiKeySecret's key, mounted, which the kubelet updates in place when the Secret
// changes, so a key is added, rotated or revoked without a restart, as a TLS renewal is
// (serving-tls.ts). A gateway that started with keys never becomes open: a file that changes
// to hold none (or cannot be read) is logged once and the previous keys kept.
import { timingSafeEqual } from "node:crypto";
import { readOptionFile } from "../cli/options.ts";
import { ExpertMeshError } from "../util/errors.ts";

/** The keys a text holds: separated by commas or line ends, blanks around them dropped. */
export function parseApiKeys(text: string): string[] {
  return text
    .split(/[,\r\n]/)
    .map((k) => k.trim())
    .filter((k) => k !== "");
}

/**
 * The keys of an --api-keys-file: EM_CLI_FILE for one that cannot be read, EM_GATEWAY_API_KEYS
 * for one that holds none (a file given to require keys that requires nothing).
 */
export function readApiKeysFile(path: string): string[] {
  const keys = parseApiKeys(readOptionFile(path, "--api-keys-file").toString("utf8"));
  if (keys.length === 0)
    throw new ExpertMeshError(
      "EM_GATEWAY_API_KEYS",
      `--api-keys-file ${path} holds no key (give keys separated by commas or line ends)`,
    );
  return keys;
}

export class ApiKeys {
  /** The fixed keys (--api-key, $EM_API_KEYS), accepted whatever the file says. */
  readonly #fixed: Buffer[];
  #fromFile: Buffer[];
  #timer: NodeJS.Timeout | undefined;

  constructor(fixed: readonly string[], fromFile: readonly string[] = []) {
    this.#fixed = fixed.map((k) => Buffer.from(k));
    this.#fromFile = fromFile.map((k) => Buffer.from(k));
  }

  /** The keys as given, or these already (buildGatewayApp's and the gRPC API's option). */
  static from(keys: readonly string[] | ApiKeys | undefined): ApiKeys {
    return keys instanceof ApiKeys ? keys : new ApiKeys(keys ?? []);
  }

  /** Whether requests need a key (fixed for the gateway's life: it never turns open). */
  get required(): boolean {
    return this.#fixed.length > 0 || this.#fromFile.length > 0;
  }

  /** How many keys are accepted now. */
  get count(): number {
    return this.#fixed.length + this.#fromFile.length;
  }

  /** Whether `given` (the bytes a client sent) is one of the keys, compared in constant time. */
  accepts(given: Buffer): boolean {
    let ok = false;
    for (const keys of [this.#fixed, this.#fromFile])
      for (const k of keys) if (k.length === given.length && timingSafeEqual(k, given)) ok = true;
    return ok;
  }

  /**
   * Looks at `file` every `intervalMs` and takes its keys once they changed; a file that
   * cannot be read or holds no key is logged (once per failure) and the previous keys kept.
   */
  watch(file: string, intervalMs: number, log: (message: string) => void): void {
    this.stop();
    let lastFailure = "";
    this.#timer = setInterval(() => {
      let next: string[];
      try {
        next = readApiKeysFile(file);
      } catch (err) {
        const message = err instanceof Error ? err.message : String(err);
        if (message !== lastFailure)
          log(`API keys file changed but cannot be used (the previous keys stay): ${message}`);
        lastFailure = message;
        return;
      }
      lastFailure = "";
      const buffers = next.map((k) => Buffer.from(k));
      const same =
        buffers.length === this.#fromFile.length &&
        buffers.every((b, i) => b.equals(this.#fromFile[i]!));
      if (same) return;
      const before = this.#fromFile.length;
      this.#fromFile = buffers;
      log(`API keys reloaded (${file}): ${buffers.length} key(s), ${before} before`);
    }, intervalMs);
    this.#timer.unref();
  }

  stop(): void {
    clearInterval(this.#timer);
    this.#timer = undefined;
  }
}
