// Leader election with a coordination.k8s.io/v1 Lease, as client-go's leaderelection does:
// the holder renews every retry period; others take over once the lease has not been
// renewed for its duration. Updates carry the resourceVersion they read, so two
// candidates can never both win. On graceful shutdown the leader releases the lease.
import { CoordinationV1Api, type KubeConfig, type V1Lease } from "@kubernetes/client-node";

export interface LeaderElectionOptions {
  namespace: string;
  name: string;
  identity: string;
  /** How long a lease is valid without renewal (s). */
  leaseDurationSeconds?: number;
  /** The leader gives up if it could not renew for this long (ms); < lease duration. */
  renewDeadlineMs?: number;
  /** Interval between acquire/renew attempts (ms). */
  retryPeriodMs?: number;
  log?: (msg: string) => void;
}

/** Kubernetes MicroTime: RFC 3339 with exactly six fractional digits. */
export function microTime(d: Date): string {
  return d.toISOString().replace(/\.(\d{3})Z$/, ".$1000Z");
}

function statusOf(err: unknown): number | undefined {
  return (err as { code?: number })?.code;
}

/** The Lease calls the elector makes (CoordinationV1Api's). */
export type LeaseApi = Pick<
  CoordinationV1Api,
  "readNamespacedLease" | "createNamespacedLease" | "replaceNamespacedLease"
>;

export class LeaderElector {
  readonly #api: LeaseApi;
  readonly #o: Required<Omit<LeaderElectionOptions, "log">> & Pick<LeaderElectionOptions, "log">;
  #leading = false;
  #stopped = false;
  #timer: NodeJS.Timeout | undefined;
  #lastRenew = 0;
  #onLost: (() => void) | undefined;
  /** A renewal under way (release waits for it, so that it cannot write after). */
  #renewing: Promise<boolean> | null = null;

  /** `kc`, or the Lease calls themselves (tests). */
  constructor(kc: KubeConfig | LeaseApi, opts: LeaderElectionOptions) {
    this.#api = "makeApiClient" in kc ? kc.makeApiClient(CoordinationV1Api) : kc;
    this.#o = { leaseDurationSeconds: 15, renewDeadlineMs: 10_000, retryPeriodMs: 2_000, ...opts };
  }

  get isLeader(): boolean {
    return this.#leading;
  }

  /**
   * Resolves once this candidate holds the lease. `onLost` is called if it later fails to
   * renew within the renew deadline (the caller should stop working, typically exit).
   */
  async acquire(onLost: () => void): Promise<void> {
    this.#onLost = onLost;
    for (;;) {
      if (this.#stopped) throw new Error("leader election stopped");
      if (await this.#tryAcquireOrRenew()) break;
      await new Promise((r) => setTimeout(r, this.#o.retryPeriodMs));
    }
    this.#leading = true;
    this.#lastRenew = Date.now();
    this.#o.log?.(
      `became leader (lease ${this.#o.namespace}/${this.#o.name}, identity ${this.#o.identity})`,
    );
    this.#scheduleRenew();
  }

  #scheduleRenew(): void {
    this.#timer = setTimeout(async () => {
      if (this.#stopped) return;
      this.#renewing = this.#tryAcquireOrRenew().catch(() => false);
      const ok = await this.#renewing;
      this.#renewing = null;
      if (this.#stopped) return;
      if (ok) this.#lastRenew = Date.now();
      if (!ok && Date.now() - this.#lastRenew > this.#o.renewDeadlineMs) {
        this.#leading = false;
        this.#o.log?.("lost the lease: could not renew within the renew deadline");
        this.#onLost?.();
        return;
      }
      this.#scheduleRenew();
    }, this.#o.retryPeriodMs);
  }

  /** One attempt: create the lease, renew ours, or take over an expired one. */
  async #tryAcquireOrRenew(): Promise<boolean> {
    const { namespace, name, identity, leaseDurationSeconds } = this.#o;
    const now = new Date();
    let lease: V1Lease;
    try {
      lease = await this.#api.readNamespacedLease({ name, namespace });
    } catch (err) {
      if (statusOf(err) !== 404 || this.#stopped) return false;
      try {
        await this.#api.createNamespacedLease({
          namespace,
          body: {
            metadata: { name, namespace },
            spec: {
              holderIdentity: identity,
              leaseDurationSeconds,
              acquireTime: microTime(now) as never,
              renewTime: microTime(now) as never,
              leaseTransitions: 0,
            },
          },
        });
        return true;
      } catch {
        return false;
      }
    }
    // Released meanwhile: writing now would take the lease back, or make release fail.
    if (this.#stopped) return false;
    const spec = lease.spec ?? {};
    const holder = spec.holderIdentity ?? "";
    const renewed = spec.renewTime ? new Date(spec.renewTime as unknown as string).getTime() : 0;
    const duration = (spec.leaseDurationSeconds ?? leaseDurationSeconds) * 1000;
    const expired = renewed + duration < now.getTime();
    if (holder !== identity && holder !== "" && !expired) return false;
    const takeover = holder !== identity;
    lease.spec = {
      ...spec,
      holderIdentity: identity,
      leaseDurationSeconds,
      renewTime: microTime(now) as never,
      ...(takeover
        ? {
            acquireTime: microTime(now) as never,
            leaseTransitions: (spec.leaseTransitions ?? 0) + 1,
          }
        : {}),
    };
    try {
      await this.#api.replaceNamespacedLease({ name, namespace, body: lease });
      return true;
    } catch {
      return false; // 409: someone else wrote first
    }
  }

  /** Stops renewing; a leader hands the lease back so a successor need not wait. */
  async release(): Promise<void> {
    this.#stopped = true;
    clearTimeout(this.#timer);
    await this.#renewing;
    if (!this.#leading) return;
    this.#leading = false;
    const { namespace, name, identity } = this.#o;
    try {
      const lease = await this.#api.readNamespacedLease({ name, namespace });
      if (lease.spec?.holderIdentity !== identity) return;
      lease.spec = {
        ...lease.spec,
        holderIdentity: "",
        leaseDurationSeconds: 1,
        renewTime: microTime(new Date()) as never,
      };
      await this.#api.replaceNamespacedLease({ name, namespace, body: lease });
      this.#o.log?.("released the lease");
    } catch {
      // The lease expires on its own.
    }
  }
}
