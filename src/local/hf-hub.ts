// A model's checkpoint from the Hugging Face Hub, for `expertmesh up` of a manifest whose
// spec.model.source is huggingFace, and for `expertmesh fetch` (in a cluster, each pod's init
// container; into one claim all pods share, one of them fetches and the others wait).
// Only what the engine reads is fetched: the top-level *.json (config, generation config,
// tokenizer, safetensors index), *.safetensors and *.jinja files, not the repository's code,
// figures or docs. Snapshots are kept as the Hub's own cache keeps them:
//   <root>/<org>--<name>/snapshots/<commit>/<files>
//   <root>/<org>--<name>/refs/<revision>       (the commit the revision named)
// so `main` is looked up on the Hub each time and a snapshot once complete is never fetched
// again; offline, the revision's last snapshot is used. A file is written as
// <file>.incomplete and renamed when whole; a transfer cut short resumes with a Range request.
// A file the Hub keeps in LFS (the weights) is checked against the SHA-256 its listing gives,
// hashed as it arrives: a corrupted transfer is thrown away, not loaded.
// $HF_ENDPOINT (a mirror) and $HF_TOKEN (gated or private repositories) are honoured, as by
// the Hub's own clients, and so are $HTTPS_PROXY / $HTTP_PROXY / $NO_PROXY (Node's own fetch
// ignores them unless NODE_USE_ENV_PROXY is set: undici's EnvHttpProxyAgent reads them).
// Transfers are undici's `request` (Node streams: about half the CPU a byte of fetch's web
// streams), redirects followed here so that the token never leaves the Hub's origin.
import { createHash, type Hash } from "node:crypto";
import {
  createReadStream,
  createWriteStream,
  existsSync,
  mkdirSync,
  readFileSync,
  renameSync,
  rmSync,
  statSync,
  writeFileSync,
} from "node:fs";
import { join } from "node:path";
import { Transform } from "node:stream";
import { pipeline } from "node:stream/promises";
import { setTimeout as sleep } from "node:timers/promises";
import { type Dispatcher, EnvHttpProxyAgent, request } from "undici";
import { ExpertMeshError } from "../util/errors.ts";
import { Leases, readLease } from "../util/leases.ts";

export const HUB_ENDPOINT = "https://huggingface.co";
const COMPLETE = ".expertmesh-complete";
const FETCHING = ".expertmesh-fetching";
/** Files fetched at once. */
const WORKERS = 4;
/** Redirects followed from one URL (the Hub: one, to its CDN; a renamed repository: two). */
const MAX_REDIRECTS = 5;

export interface HubSource {
  /** `org/name`. */
  repo: string;
  /** Branch, tag or commit. */
  revision: string;
}

export interface HubFetchOptions extends HubSource {
  endpoint?: string;
  token?: string;
  /**
   * Whether LFS files are checked against the SHA-256 the Hub lists (default true; false
   * trusts sizes alone: the bench's peer, and `fetch --no-verify` where the network is faster
   * than one core hashes).
   */
  verify?: boolean;
  /** Bytes fetched so far of `total` (both counting what an earlier run left). */
  onProgress?: (done: number, total: number) => void;
  log?: (line: string) => void;
}

export interface HubOptions extends HubFetchOptions {
  /** Where snapshots are kept (up: <models-dir>/hf). */
  root: string;
}

export interface HubSnapshot {
  /** The checkpoint folder. */
  dir: string;
  /** The commit it is of. */
  commit: string;
  /** Bytes fetched by this call (0: the snapshot was complete). */
  fetched: number;
}

interface HubFile {
  name: string;
  size: number | undefined;
  /** The content's SHA-256 (hex), listed for files kept in LFS. */
  sha256?: string;
}

/** Whether the engine reads `name` (a path in the repository). */
export function wantedFile(name: string): boolean {
  return !name.includes("/") && /\.(json|safetensors|jinja)$/.test(name);
}

const fail = (message: string, cause?: unknown): never => {
  throw new ExpertMeshError("EM_HF_DOWNLOAD", message, cause ? { cause } : undefined);
};

const why = (err: unknown) => {
  const e = err as { message?: string; cause?: { message?: string } };
  return e?.cause?.message ?? e?.message ?? String(err);
};

interface Listing {
  commit: string;
  files: HubFile[];
}

/**
 * What the Hub lists for `repo` at `revision`: its commit and the files the engine reads.
 * Throws EM_HF_DOWNLOAD for a refusal, a missing revision or a repository that is no
 * checkpoint; a network failure is thrown as it came (the caller may have a snapshot).
 */
async function listRevision(endpoint: string, o: HubSource, net: Net): Promise<Listing> {
  const listing = `${endpoint}/api/models/${o.repo}/revision/${encodeURIComponent(o.revision)}?blobs=true`;
  const res = await get(listing, net, {}, AbortSignal.timeout(30_000));
  const body = await res.body.text().catch(() => "");
  const status = res.statusCode;
  if (status === 401 || status === 403) {
    fail(
      `${endpoint} refused to list ${o.repo} (HTTP ${status}): the repository is gated or private (set HF_TOKEN to a token that may read it, and accept its terms on the Hub), or does not exist`,
    );
  }
  if (status === 404) {
    fail(`${endpoint} has no revision '${o.revision}' of ${o.repo} (HTTP 404)`);
  }
  if (status < 200 || status > 299) {
    fail(`${endpoint} answered HTTP ${status} listing ${o.repo}: ${body.slice(0, 300)}`);
  }
  let info: {
    sha?: unknown;
    siblings?: {
      rfilename?: unknown;
      size?: unknown;
      lfs?: { size?: unknown; sha256?: unknown };
    }[];
  };
  try {
    info = JSON.parse(body);
  } catch {
    return fail(`${endpoint}'s listing of ${o.repo} is not JSON`);
  }
  const commit = typeof info.sha === "string" && /^[0-9a-f]{40}$/.test(info.sha) ? info.sha : "";
  if (!commit) fail(`${endpoint}'s listing of ${o.repo} names no commit (sha)`);
  const files: HubFile[] = (info.siblings ?? [])
    .filter((s) => typeof s?.rfilename === "string" && wantedFile(s.rfilename))
    .map((s) => {
      const size = s.lfs?.size ?? s.size;
      const sha256 = s.lfs?.sha256;
      return {
        name: s.rfilename as string,
        size: typeof size === "number" ? size : undefined,
        ...(typeof sha256 === "string" && /^[0-9a-f]{64}$/.test(sha256) ? { sha256 } : {}),
      };
    });
  if (!files.some((f) => f.name === "config.json")) {
    fail(`${o.repo}@${o.revision} has no config.json: not a checkpoint in the Hugging Face layout`);
  }
  return { commit, files };
}

const endpointOf = (o: HubFetchOptions) => (o.endpoint ?? HUB_ENDPOINT).replace(/\/+$/, "");

/** How a call reaches the Hub: through the environment's proxy, the token for its origin. */
interface Net {
  dispatcher: Dispatcher;
  /** The Hub's origin: the only one the token is sent to. */
  origin: string;
  token: string | undefined;
}

/** `run` with a Net of its own, whose connections are closed after. */
async function withNet<T>(o: HubFetchOptions, run: (net: Net) => Promise<T>): Promise<T> {
  let origin = "";
  try {
    origin = new URL(endpointOf(o)).origin;
  } catch {}
  if (!/^https?:/.test(origin))
    fail(`the Hub's address '${endpointOf(o)}' ($HF_ENDPOINT) is no http(s) URL`);
  const net: Net = {
    // Read from the environment now: `up` sets spec.env's variables before it fetches.
    dispatcher: new EnvHttpProxyAgent(),
    origin,
    token: o.token,
  };
  try {
    return await run(net);
  } finally {
    await net.dispatcher.destroy().catch(() => {});
  }
}

/**
 * GET `url`, following redirects (the Hub's to its CDN); the token goes only to the Hub's
 * origin, as fetch drops it on a redirect elsewhere. Every other header goes on each hop.
 */
async function get(
  url: string,
  net: Net,
  headers: Record<string, string>,
  signal: AbortSignal,
): Promise<Dispatcher.ResponseData> {
  let at = new URL(url);
  for (let hop = 0; ; hop++) {
    const auth: Record<string, string> =
      net.token && at.origin === net.origin ? { authorization: `Bearer ${net.token}` } : {};
    const res = await request(at, {
      headers: { ...headers, ...auth },
      dispatcher: net.dispatcher,
      signal,
    });
    const location = res.headers["location"];
    if (![301, 302, 303, 307, 308].includes(res.statusCode) || typeof location !== "string") {
      return res;
    }
    await res.body.dump();
    if (hop === MAX_REDIRECTS) fail(`${url} redirected more than ${MAX_REDIRECTS} times`);
    at = new URL(location, at);
  }
}

/** The snapshot of `repo` at `revision`: fetched unless complete; see the file's comment. */
export async function hubSnapshot(o: HubOptions): Promise<HubSnapshot> {
  return withNet(o, (net) => snapshotWith(o, net));
}

async function snapshotWith(o: HubOptions, net: Net): Promise<HubSnapshot> {
  const endpoint = endpointOf(o);
  const repoDir = join(o.root, o.repo.replace("/", "--"));
  // A revision may hold slashes (refs/pr/1): one file name per revision.
  const ref = join(repoDir, "refs", encodeURIComponent(o.revision));
  let listing: Listing;
  try {
    listing = await listRevision(endpoint, o, net);
  } catch (err) {
    if (err instanceof ExpertMeshError) throw err;
    // Offline: the revision's last complete snapshot, if there is one.
    const known = existsSync(ref) ? readFileSync(ref, "utf8").trim() : "";
    const dir = join(repoDir, "snapshots", known);
    if (known && existsSync(join(dir, COMPLETE))) {
      o.log?.(
        `cannot reach ${endpoint} (${why(err)}): using ${o.repo}@${o.revision} as fetched before (commit ${known.slice(0, 12)})`,
      );
      return { dir, commit: known, fetched: 0 };
    }
    return fail(`cannot reach ${endpoint} to fetch ${o.repo}: ${why(err)}`, err);
  }
  const { commit } = listing;
  const dir = join(repoDir, "snapshots", commit);
  mkdirSync(join(repoDir, "refs"), { recursive: true });
  const fetched = await fetchOnce(o, net, dir, listing, () => existsSync(join(dir, COMPLETE)));
  writeFileSync(ref, commit);
  return { dir, commit, fetched };
}

/**
 * The files of `repo` at `revision` straight into `dir` (`expertmesh fetch --dir`: a volume
 * that a manifest's source.pvc.path names), with a marker naming the commit they are of: a
 * folder complete for that commit is left alone, one of another commit is fetched again.
 */
export async function hubDownload(o: HubFetchOptions & { dir: string }): Promise<HubSnapshot> {
  return withNet(o, (net) => downloadWith(o, net));
}

async function downloadWith(o: HubFetchOptions & { dir: string }, net: Net): Promise<HubSnapshot> {
  const endpoint = endpointOf(o);
  let listing: Listing;
  try {
    listing = await listRevision(endpoint, o, net);
  } catch (err) {
    if (err instanceof ExpertMeshError) throw err;
    return fail(`cannot reach ${endpoint} to fetch ${o.repo}: ${why(err)}`, err);
  }
  const marker = join(o.dir, COMPLETE);
  const complete = () =>
    (existsSync(marker) ? readFileSync(marker, "utf8").split("\n")[0] : "") === listing.commit;
  // Another commit's files are fetched again (fetchFiles keeps only its own run's).
  const fetched = await fetchOnce(o, net, o.dir, listing, complete, () => {
    if (existsSync(marker)) rmSync(marker);
  });
  return { dir: o.dir, commit: listing.commit, fetched };
}

/**
 * Fetches `listing` into `dir` unless `complete()` says it is there (0 bytes then). Several
 * fetchers of one folder (the pods of a model on one shared claim, ADR 0050; two `up` of one
 * repository) take a lease in it: one fetches; the others wait for `complete()`, showing the
 * folder's progress, and take over where it stopped if it dies. `begin` runs under the lease,
 * before the transfers.
 */
async function fetchOnce(
  o: HubFetchOptions,
  net: Net,
  dir: string,
  listing: Listing,
  complete: () => boolean,
  begin?: () => void,
): Promise<number> {
  if (complete()) return 0;
  mkdirSync(dir, { recursive: true });
  const leases = new Leases(FETCH_LEASE_MS);
  const lease = join(dir, FETCH_LEASE);
  try {
    let said = false;
    while (leases.take(lease) !== "taken") {
      if (!said) {
        const holder = readLease(lease);
        o.log?.(
          `another fetcher${holder ? ` (${holder.host}, pid ${holder.pid})` : ""} is fetching ${o.repo} into ${dir}: waiting for it`,
        );
        said = true;
      }
      o.onProgress?.(...bytesIn(dir, listing));
      await sleep(FETCH_WAIT_MS);
      if (complete()) return 0;
    }
    if (complete()) return 0; // (finished by another, between the look and the lease)
    begin?.();
    // Another fetcher took the folder over (this one was paused past the lease): stop
    // writing into its files at once.
    const lost = new AbortController();
    const renew = setInterval(() => {
      if (!leases.renew(lease)) lost.abort();
    }, FETCH_LEASE_MS / 6);
    renew.unref();
    try {
      return await fetchFiles(o, net, dir, listing, lost.signal);
    } catch (err) {
      if (!lost.signal.aborted) throw err;
      return fail(
        `another fetcher took ${dir} over (this one did not renew its lease for ${FETCH_LEASE_MS / 1000} s): run it again to wait for that one`,
        err,
      );
    } finally {
      clearInterval(renew);
      leases.release(lease);
    }
  } finally {
    leases.close();
  }
}

/** The lease file of a folder's fetcher (`expertmesh fetch --dir` into a shared claim). */
const FETCH_LEASE = ".expertmesh-fetch.lease";
/** A fetcher not heard from for this long is taken over (it renews every sixth of it). */
const FETCH_LEASE_MS = 60_000;
/** How often a waiting fetcher looks for the marker (and shows the other's progress). */
const FETCH_WAIT_MS = 2000;

/** What folder `dir` holds of `listing`'s files (whole, or in part), and their total. */
function bytesIn(dir: string, listing: Listing): [number, number] {
  const size = (path: string) => statSync(path, { throwIfNoEntry: false })?.size ?? 0;
  let done = 0;
  let total = 0;
  for (const f of listing.files) {
    total += f.size ?? 0;
    done += Math.max(size(join(dir, f.name)), size(join(dir, `${f.name}.incomplete`)));
  }
  return [done, total];
}

/**
 * Fetches the files of `listing` missing from `dir` (resuming the .incomplete ones), then
 * writes the COMPLETE marker (the commit, then the time). Returns the bytes fetched.
 */
async function fetchFiles(
  o: HubFetchOptions,
  net: Net,
  dir: string,
  listing: Listing,
  /** Aborted: the transfers stop (what they have stays), and the call throws. */
  signal?: AbortSignal,
): Promise<number> {
  const endpoint = endpointOf(o);
  const { commit } = listing;
  const files = o.verify === false ? listing.files.map(({ sha256: _, ...f }) => f) : listing.files;
  mkdirSync(dir, { recursive: true });
  // Which commit the files here are of: only those of an earlier run for this commit are
  // kept (whole, or parts to resume); anything else (another commit's, files copied in by
  // hand) is fetched again, since a file of the same size may differ.
  const fetching = join(dir, FETCHING);
  const ours = existsSync(fetching) && readFileSync(fetching, "utf8").trim() === commit;
  if (!ours) for (const f of files) rmSync(join(dir, `${f.name}.incomplete`), { force: true });
  writeFileSync(fetching, commit);
  const sizeOf = (path: string) => (existsSync(path) ? statSync(path).size : 0);
  const whole = (f: HubFile) =>
    ours &&
    existsSync(join(dir, f.name)) &&
    (f.size === undefined || sizeOf(join(dir, f.name)) === f.size);
  const total = files.reduce((n, f) => n + (f.size ?? 0), 0);
  let done = files.reduce(
    (n, f) => n + (whole(f) ? (f.size ?? 0) : sizeOf(join(dir, `${f.name}.incomplete`))),
    0,
  );
  let fetched = 0;
  const progress = (n: number) => {
    done += n;
    fetched += n;
    o.onProgress?.(done, total);
  };
  o.onProgress?.(done, total);

  const pending = files.filter((f) => !whole(f));
  let next = 0;
  // The first failure stops the other transfers (what they have stays, to resume from), and
  // is thrown once they have stopped writing.
  const stop = new AbortController();
  let first: { err: unknown } | undefined;
  const cut = () => {
    first ??= { err: signal?.reason };
    stop.abort();
  };
  signal?.addEventListener("abort", cut, { once: true });
  await Promise.allSettled(
    Array.from({ length: Math.min(WORKERS, pending.length) }, async () => {
      try {
        while (next < pending.length && !stop.signal.aborted) await fetchFile(pending[next++]!);
      } catch (err) {
        // The others' failures are the abort's: the first says what went wrong.
        first ??= { err };
        stop.abort();
      }
    }),
  );
  signal?.removeEventListener("abort", cut);
  if (first) throw first.err;

  /** Renames the whole `part` to `f`'s name once its content is what the Hub lists. */
  async function keep(f: HubFile, part: string, hash?: Hash): Promise<void> {
    if (f.sha256) {
      const digest = (hash ?? (await hashOf(part))).digest("hex");
      if (digest !== f.sha256) {
        progress(-sizeOf(part));
        rmSync(part);
        fail(
          `${o.repo}/${f.name} arrived corrupted: its SHA-256 is ${digest}, the Hub lists ${f.sha256} (it was thrown away; run it again to fetch it anew)`,
        );
      }
    }
    renameSync(part, join(dir, f.name));
  }

  async function fetchFile(f: HubFile): Promise<void> {
    const part = join(dir, `${f.name}.incomplete`);
    if (f.size !== undefined && f.size === sizeOf(part)) {
      // Whole already (a run stopped between the last byte and the rename).
      return keep(f, part);
    }
    let have = sizeOf(part);
    if (f.size !== undefined && have > f.size) {
      // Longer than the file: not a part of it.
      progress(-have);
      rmSync(part);
      have = 0;
    }
    const url = `${endpoint}/${o.repo}/resolve/${commit}/${encodeURIComponent(f.name)}`;
    let res: Dispatcher.ResponseData;
    try {
      res = await get(url, net, have > 0 ? { range: `bytes=${have}-` } : {}, stop.signal);
    } catch (err) {
      if (err instanceof ExpertMeshError) throw err;
      return fail(`cannot fetch ${o.repo}/${f.name}: ${why(err)} (run it again to resume)`, err);
    }
    const status = res.statusCode;
    if (status === 416 && f.size !== undefined && have === f.size) {
      await res.body.dump();
      return keep(f, part);
    }
    if (status !== 200 && status !== 206) {
      await res.body.dump().catch(() => {});
      return fail(`fetching ${o.repo}/${f.name} answered HTTP ${status}`);
    }
    // 206: the rest after what we have; 200: the whole file (a server that ignores Range).
    const append = status === 206 && have > 0;
    if (!append && have > 0) progress(-have);
    // The hash of what is kept: the part an earlier run left (read once), then each chunk.
    const hash = f.sha256 ? (append ? await hashOf(part) : createHash("sha256")) : undefined;
    const count = new Transform({
      transform(chunk: Buffer, _enc, cb) {
        progress(chunk.length);
        hash?.update(chunk);
        cb(null, chunk);
      },
    });
    try {
      await pipeline(res.body, count, createWriteStream(part, { flags: append ? "a" : "w" }));
    } catch (err) {
      return fail(
        `the transfer of ${o.repo}/${f.name} broke off after ${sizeOf(part)} bytes: ${why(err)} (run it again to resume)`,
        err,
      );
    }
    const got = sizeOf(part);
    if (f.size !== undefined && got !== f.size) {
      return fail(
        `${o.repo}/${f.name} arrived with ${got} bytes, the Hub lists ${f.size} (run it again to resume)`,
      );
    }
    await keep(f, part, hash);
  }

  writeFileSync(join(dir, COMPLETE), `${commit}\n${new Date().toISOString()}\n`);
  rmSync(fetching);
  return fetched;
}

/** A SHA-256 fed with the bytes of `path` (not yet digested: more may follow). */
async function hashOf(path: string): Promise<Hash> {
  const hash = createHash("sha256");
  for await (const chunk of createReadStream(path)) hash.update(chunk as Buffer);
  return hash;
}
