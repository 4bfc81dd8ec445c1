// A model's checkpoint from the Hugging Face Hub, for `expertmesh up` of a manifest whose
// spec.model.source is huggingFace (in a cluster, an init container runs `hf download`).
// Only what the engine reads is fetched: the top-level *.json (config, generation config,
// tokenizer, safetensors index), *.safetensors and *.jinja files, not the repository's code,
// figures or docs. Snapshots are kept as the Hub's own cache keeps them:
//   <root>/<org>--<name>/snapshots/<commit>/<files>
//   <root>/<org>--<name>/refs/<revision>       (the commit the revision named)
// so `main` is looked up on the Hub each time and a snapshot once complete is never fetched
// again; offline, the revision's last snapshot is used. A file is written as
// <file>.incomplete and renamed when whole; a transfer cut short resumes with a Range request.
// $HF_ENDPOINT (a mirror) and $HF_TOKEN (gated or private repositories) are honoured, as by
// the Hub's own clients.
import {
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
import { Readable, Transform } from "node:stream";
import { pipeline } from "node:stream/promises";
import { ExpertMeshError } from "../util/errors.ts";

export const HUB_ENDPOINT = "https://huggingface.co";
const COMPLETE = ".expertmesh-complete";
const FETCHING = ".expertmesh-fetching";
/** Files fetched at once. */
const WORKERS = 4;

export interface HubSource {
  /** `org/name`. */
  repo: string;
  /** Branch, tag or commit. */
  revision: string;
}

export interface HubFetchOptions extends HubSource {
  endpoint?: string;
  token?: string;
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
async function listRevision(
  endpoint: string,
  o: HubSource,
  auth: Record<string, string>,
): Promise<Listing> {
  const listing = `${endpoint}/api/models/${o.repo}/revision/${encodeURIComponent(o.revision)}?blobs=true`;
  const res = await fetch(listing, { headers: auth, signal: AbortSignal.timeout(30_000) });
  const body = await res.text().catch(() => "");
  if (res.status === 401 || res.status === 403) {
    fail(
      `${endpoint} refused to list ${o.repo} (HTTP ${res.status}): the repository is gated or private (set HF_TOKEN to a token that may read it, and accept its terms on the Hub), or does not exist`,
    );
  }
  if (res.status === 404) {
    fail(`${endpoint} has no revision '${o.revision}' of ${o.repo} (HTTP 404)`);
  }
  if (!res.ok) {
    fail(`${endpoint} answered HTTP ${res.status} listing ${o.repo}: ${body.slice(0, 300)}`);
  }
  let info: {
    sha?: unknown;
    siblings?: { rfilename?: unknown; size?: unknown; lfs?: { size?: unknown } }[];
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
      return { name: s.rfilename as string, size: typeof size === "number" ? size : undefined };
    });
  if (!files.some((f) => f.name === "config.json")) {
    fail(`${o.repo}@${o.revision} has no config.json: not a checkpoint in the Hugging Face layout`);
  }
  return { commit, files };
}

const endpointOf = (o: HubFetchOptions) => (o.endpoint ?? HUB_ENDPOINT).replace(/\/+$/, "");
const authOf = (o: HubFetchOptions): Record<string, string> =>
  o.token ? { authorization: `Bearer ${o.token}` } : {};

/** The snapshot of `repo` at `revision`: fetched unless complete; see the file's comment. */
export async function hubSnapshot(o: HubOptions): Promise<HubSnapshot> {
  const endpoint = endpointOf(o);
  const repoDir = join(o.root, o.repo.replace("/", "--"));
  // A revision may hold slashes (refs/pr/1): one file name per revision.
  const ref = join(repoDir, "refs", encodeURIComponent(o.revision));
  let listing: Listing;
  try {
    listing = await listRevision(endpoint, o, authOf(o));
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
  const fetched = existsSync(join(dir, COMPLETE)) ? 0 : await fetchFiles(o, dir, listing);
  writeFileSync(ref, commit);
  return { dir, commit, fetched };
}

/**
 * The files of `repo` at `revision` straight into `dir` (`expertmesh fetch --dir`: a volume
 * that a manifest's source.pvc.path names), with a marker naming the commit they are of: a
 * folder complete for that commit is left alone, one of another commit is fetched again.
 */
export async function hubDownload(o: HubFetchOptions & { dir: string }): Promise<HubSnapshot> {
  const endpoint = endpointOf(o);
  let listing: Listing;
  try {
    listing = await listRevision(endpoint, o, authOf(o));
  } catch (err) {
    if (err instanceof ExpertMeshError) throw err;
    return fail(`cannot reach ${endpoint} to fetch ${o.repo}: ${why(err)}`, err);
  }
  const marker = join(o.dir, COMPLETE);
  const done = existsSync(marker) ? readFileSync(marker, "utf8").split("\n")[0] : "";
  if (done === listing.commit) return { dir: o.dir, commit: listing.commit, fetched: 0 };
  // Another commit's files are fetched again (fetchFiles keeps only its own run's).
  if (existsSync(marker)) rmSync(marker);
  const fetched = await fetchFiles(o, o.dir, listing);
  return { dir: o.dir, commit: listing.commit, fetched };
}

/**
 * Fetches the files of `listing` missing from `dir` (resuming the .incomplete ones), then
 * writes the COMPLETE marker (the commit, then the time). Returns the bytes fetched.
 */
async function fetchFiles(o: HubFetchOptions, dir: string, listing: Listing): Promise<number> {
  const endpoint = endpointOf(o);
  const auth = authOf(o);
  const { commit, files } = listing;
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
  const settled = await Promise.allSettled(
    Array.from({ length: Math.min(WORKERS, pending.length) }, async () => {
      try {
        while (next < pending.length && !stop.signal.aborted) await fetchFile(pending[next++]!);
      } catch (err) {
        stop.abort();
        throw err;
      }
    }),
  );
  const failed = settled.find((r) => r.status === "rejected");
  if (failed) throw failed.reason;

  async function fetchFile(f: HubFile): Promise<void> {
    if (f.size !== undefined && f.size === sizeOf(join(dir, `${f.name}.incomplete`))) {
      // Whole already (a run stopped between the last byte and the rename).
      renameSync(join(dir, `${f.name}.incomplete`), join(dir, f.name));
      return;
    }
    const part = join(dir, `${f.name}.incomplete`);
    let have = sizeOf(part);
    if (f.size !== undefined && have > f.size) {
      // Longer than the file: not a part of it.
      progress(-have);
      rmSync(part);
      have = 0;
    }
    const url = `${endpoint}/${o.repo}/resolve/${commit}/${encodeURIComponent(f.name)}`;
    let res: Response;
    try {
      // Redirects (to the Hub's CDN) are followed; fetch drops the Authorization header on a
      // redirect to another origin.
      res = await fetch(url, {
        headers: { ...auth, ...(have > 0 ? { range: `bytes=${have}-` } : {}) },
        signal: stop.signal,
      });
    } catch (err) {
      return fail(`cannot fetch ${o.repo}/${f.name}: ${why(err)} (run it again to resume)`, err);
    }
    if (res.status === 416 && f.size !== undefined && have === f.size) {
      await res.body?.cancel();
      renameSync(part, join(dir, f.name));
      return;
    }
    if (!res.ok || !res.body) {
      return fail(`fetching ${o.repo}/${f.name} answered HTTP ${res.status}`);
    }
    // 206: the rest after what we have; 200: the whole file (a server that ignores Range).
    const append = res.status === 206 && have > 0;
    if (!append && have > 0) progress(-have);
    const count = new Transform({
      transform(chunk: Buffer, _enc, cb) {
        progress(chunk.length);
        cb(null, chunk);
      },
    });
    try {
      await pipeline(
        Readable.fromWeb(res.body as import("node:stream/web").ReadableStream),
        count,
        createWriteStream(part, { flags: append ? "a" : "w" }),
      );
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
    renameSync(part, join(dir, f.name));
  }

  writeFileSync(join(dir, COMPLETE), `${commit}\n${new Date().toISOString()}\n`);
  rmSync(fetching);
  return fetched;
}
