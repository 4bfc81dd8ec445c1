// List + watch of one kind of object, level-based: list once, then watch from the list's
// resourceVersion; a dropped watch resumes from the last resourceVersion seen; a 410 Gone
// (the version is too old) lists again. Handlers receive every object's key on each change.
import { type KubeConfig, Watch } from "@kubernetes/client-node";

export interface ObjectMeta {
  metadata?: {
    name?: string;
    namespace?: string;
    resourceVersion?: string;
    labels?: Record<string, string>;
  };
}

export interface InformerOptions<T> {
  /** Short name for logs. */
  name: string;
  /** Lists objects; resolves items and the list's resourceVersion. */
  list: () => Promise<{ items: T[]; resourceVersion: string }>;
  /** Watch URL path (e.g. /apis/apps/v1/deployments) and query (labelSelector etc.). */
  watchPath: string;
  watchQuery?: Record<string, string>;
  /** Called for each added, modified or deleted object, and for each item of every list. */
  onChange: (obj: T, event: "ADDED" | "MODIFIED" | "DELETED" | "LISTED") => void;
  log?: (msg: string) => void;
}

export class Informer<T extends ObjectMeta> {
  readonly #kc: KubeConfig;
  readonly #opts: InformerOptions<T>;
  #resourceVersion = "";
  #abort: AbortController | undefined;
  #stopped = false;
  #synced = false;
  #retryTimer: NodeJS.Timeout | undefined;
  /** Lists done (the first plus each relist after 410 Gone or an error). */
  lists = 0;

  constructor(kc: KubeConfig, opts: InformerOptions<T>) {
    this.#kc = kc;
    this.#opts = opts;
  }

  get hasSynced(): boolean {
    return this.#synced;
  }

  get resourceVersion(): string {
    return this.#resourceVersion;
  }

  /**
   * Lists, then keeps watching until stop(). Resolves after the first successful list; a
   * failing list (API server starting, a CRD just created: 429/503) is retried with backoff.
   */
  async start(): Promise<void> {
    for (let delay = 250; ; delay = Math.min(delay * 2, 10_000)) {
      if (this.#stopped) return;
      try {
        await this.#relist();
        break;
      } catch (err) {
        this.#opts.log?.(
          `${this.#opts.name}: list failed (${String(err).split("\n")[0]}); retrying in ${delay} ms`,
        );
        await new Promise((r) => setTimeout(r, delay));
      }
    }
    void this.#watch();
  }

  stop(): void {
    this.#stopped = true;
    clearTimeout(this.#retryTimer);
    this.#abort?.abort();
  }

  async #relist(): Promise<void> {
    const { items, resourceVersion } = await this.#opts.list();
    this.lists++;
    this.#resourceVersion = resourceVersion;
    for (const item of items) this.#opts.onChange(item, "LISTED");
    this.#synced = true;
  }

  #retry(ms: number, relist: boolean): void {
    if (this.#stopped) return;
    this.#retryTimer = setTimeout(async () => {
      try {
        if (relist) await this.#relist();
        void this.#watch();
      } catch (err) {
        this.#opts.log?.(`${this.#opts.name}: list failed: ${String(err)}; retrying`);
        this.#retry(Math.min(ms * 2, 30_000), true);
      }
    }, ms);
  }

  async #watch(): Promise<void> {
    if (this.#stopped) return;
    let gone = false;
    const watch = new Watch(this.#kc);
    try {
      this.#abort = await watch.watch(
        this.#opts.watchPath,
        {
          ...this.#opts.watchQuery,
          resourceVersion: this.#resourceVersion,
          allowWatchBookmarks: true,
        },
        (phase, obj: T & { code?: number }) => {
          if (phase === "ERROR") {
            if (obj.code === 410) gone = true;
            return;
          }
          const rv = obj.metadata?.resourceVersion;
          if (rv) this.#resourceVersion = rv;
          if (phase === "BOOKMARK") return;
          this.#opts.onChange(obj, phase as "ADDED" | "MODIFIED" | "DELETED");
        },
        (err: unknown) => {
          if (this.#stopped) return;
          const status = (err as { statusCode?: number; code?: number } | null)?.statusCode;
          if (gone || status === 410) {
            this.#opts.log?.(
              `${this.#opts.name}: resourceVersion ${this.#resourceVersion} expired (410 Gone); listing again`,
            );
            this.#retry(100, true);
          } else if (err) {
            this.#retry(1000, false);
          } else {
            // The server ended the watch (timeout): resume from the last version seen.
            this.#retry(0, false);
          }
        },
      );
    } catch (err) {
      this.#opts.log?.(`${this.#opts.name}: watch failed: ${String(err)}; retrying`);
      this.#retry(1000, false);
    }
  }
}
