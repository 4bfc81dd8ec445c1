// `expertmesh fetch REPO`: a checkpoint from the Hugging Face Hub, only the files the engine
// reads, resumable (src/local/hf-hub.ts). Into `expertmesh up`'s cache by default, or with
// --dir straight into a folder: the volume a manifest's source.pvc names, filled once by a
// Job (examples/fetch-weights-job.yaml) instead of by every pod.
import { join } from "node:path";
import { parseArgs } from "node:util";
import { hubDownload, hubSnapshot } from "../../local/hf-hub.ts";
import { formatBytes } from "../../local/progress.ts";
import { cacheDir } from "../../util/cache-dir.ts";
import { ExpertMeshError } from "../../util/errors.ts";
import { statusLine } from "../progress.ts";
import type { Command } from "../registry.ts";

const USAGE = `expertmesh fetch REPO [--revision REV] [--dir DIR | --models-dir DIR] [--no-verify]

  REPO              a Hugging Face repository, org/name (deepseek-ai/DeepSeek-V3)
  --revision REV    branch, tag or commit (default main)
  --dir DIR         the files straight into DIR, e.g. a volume whose path a manifest's
                    spec.model.source.pvc.path names; a folder complete for the revision's
                    commit is left alone, one of another commit is fetched again; several
                    fetches into one DIR at once (pods on one shared claim) fetch it once:
                    one holds a lease, the others wait for it and take over if it dies
  --models-dir DIR  without --dir: the cache expertmesh up reads (default
                    ~/.cache/expertmesh/models), as <DIR>/hf/<org>--<name>/snapshots/<commit>
  --no-verify       trust the sizes alone: skip the SHA-256 of each weights file (one core
                    hashes about 1 GB/s, so only a faster network waits for it)

Fetches the top-level *.json, *.safetensors and *.jinja files (not the repository's code or
figures), four at a time; a transfer cut short resumes where it stopped when run again. Each
weights file is checked against the SHA-256 the Hub lists; a corrupted one is thrown away.
$HF_TOKEN for a gated or private repository, $HF_ENDPOINT for a mirror, $HTTPS_PROXY /
$HTTP_PROXY / $NO_PROXY for a proxy. Prints the folder.`;

export const fetchCommand: Command = {
  name: "fetch",
  summary: "fetch a checkpoint from the Hugging Face Hub (resumable; into a folder or up's cache)",
  usage: USAGE,
  run: runFetch,
};

const REPO = /^[A-Za-z0-9][A-Za-z0-9._-]*\/[A-Za-z0-9][A-Za-z0-9._-]*$/;

/** Progress on stderr (statusLine: rewritten on a terminal, else every 10 s, a Job's log). */
function progressLine(label: string) {
  const status = statusLine();
  return {
    update: (done: number, total: number) =>
      status.update(() => {
        const pct = total > 0 ? ` (${((100 * done) / total).toFixed(1)} %)` : "";
        return `${label}: ${formatBytes(done)} of ${formatBytes(total)}${pct}, ${status.seconds().toFixed(0)} s`;
      }),
    end: () => status.end(),
  };
}

async function runFetch(argv: string[]): Promise<number> {
  const { values, positionals } = parseArgs({
    args: argv,
    options: {
      revision: { type: "string" },
      dir: { type: "string" },
      "models-dir": { type: "string" },
      "no-verify": { type: "boolean", default: false },
    },
    allowPositionals: true,
    strict: true,
  });
  const [repo, ...extra] = positionals;
  if (repo === undefined || extra.length > 0 || !REPO.test(repo)) {
    throw new ExpertMeshError(
      "EM_CLI_USAGE",
      `give one Hugging Face repository as org/name (deepseek-ai/DeepSeek-V3), got ${positionals.length ? `'${positionals.join(" ")}'` : "none"}`,
    );
  }
  if (values.dir !== undefined && values["models-dir"] !== undefined) {
    throw new ExpertMeshError("EM_CLI_USAGE", "--dir and --models-dir exclude each other");
  }
  const revision = values.revision ?? "main";
  const progress = progressLine(`${repo}@${revision}`);
  const common = {
    repo,
    revision,
    ...(process.env["HF_ENDPOINT"] ? { endpoint: process.env["HF_ENDPOINT"] } : {}),
    ...(process.env["HF_TOKEN"] ? { token: process.env["HF_TOKEN"] } : {}),
    verify: !values["no-verify"],
    onProgress: (done: number, total: number) => progress.update(done, total),
    log: (line: string) => process.stderr.write(`${line}\n`),
  };
  const got =
    values.dir !== undefined
      ? await hubDownload({ ...common, dir: values.dir }).finally(() => progress.end())
      : await hubSnapshot({
          ...common,
          root: join(values["models-dir"] ?? join(cacheDir(), "models"), "hf"),
        }).finally(() => progress.end());
  process.stderr.write(
    got.fetched > 0
      ? `${repo}@${revision}: fetched ${formatBytes(got.fetched)}, commit ${got.commit.slice(0, 12)}\n`
      : `${repo}@${revision}: commit ${got.commit.slice(0, 12)}, complete already\n`,
  );
  process.stdout.write(`${got.dir}\n`);
  return 0;
}
