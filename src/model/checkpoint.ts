// A Hugging Face checkpoint directory: config.json plus either one `model.safetensors` or
// `model.safetensors.index.json` and its shards. Opening reads config.json and the
// safetensors headers only; `read` then fetches one tensor's bytes. Tensors of the
// multi-token-prediction layers (`model.layers.{num_hidden_layers + k}.*`) are skipped
// unless the opener asks for them (MTP speculative decoding, ADR 0012).
import { existsSync, readFileSync } from "node:fs";
import { basename, join } from "node:path";
import { ExpertMeshError } from "../util/errors.ts";
import { type ModelConfig, readModelConfig } from "./config.ts";
import {
  type ReadCounter,
  type ReadOptions,
  readSafetensorsHeader,
  readTensor,
  type Tensor,
  type TensorInfo,
} from "./safetensors.ts";
import { weightsDigest } from "./weights-digest.ts";

export const SINGLE_FILE = "model.safetensors";
export const INDEX_FILE = "model.safetensors.index.json";

/** The tensors of a checkpoint directory, readable one at a time. */
export class Checkpoint {
  readonly dir: string;
  readonly config: ModelConfig;
  /** Tensor locations by name (MTP tensors left out unless opened with them), sorted by name. */
  private readonly infos: ReadonlyMap<string, TensorInfo>;
  /** Bytes taken from disk so far: safetensors headers plus tensor data. */
  private readonly counter: ReadCounter;
  /** Whether the MTP layers' tensors were kept (opened with `mtp`). */
  readonly mtp: boolean;
  /** Every safetensors file of the checkpoint (MTP ones too), as named in `dir`. */
  private readonly files: readonly string[];
  #digest: Promise<string> | undefined;

  private constructor(
    dir: string,
    config: ModelConfig,
    infos: Map<string, TensorInfo>,
    headerBytes: number,
    mtp: boolean,
    files: readonly string[],
  ) {
    this.dir = dir;
    this.config = config;
    this.infos = infos;
    this.counter = { bytesRead: headerBytes };
    this.mtp = mtp;
    this.files = files;
  }

  /**
   * Opens the checkpoint in `dir`: parses config.json and the safetensors headers (the
   * index wins over a single file when both exist). `mtp` keeps the MTP layers' tensors.
   * Throws EM_CONFIG_* and EM_CKPT_*.
   */
  static async open(
    dir: string,
    opts: { mtp?: boolean; onFile?: (done: number, total: number) => void } = {},
  ): Promise<Checkpoint> {
    const mtp = opts.mtp ?? false;
    const config = readModelConfig(dir);
    const files = shardFiles(dir);
    const infos = new Map<string, TensorInfo>();
    let headerBytes = 0;
    let done = 0;
    opts.onFile?.(0, files.size);
    for (const [file, wanted] of files) {
      const header = await readSafetensorsHeader(join(dir, file));
      opts.onFile?.(++done, files.size);
      headerBytes += header.headerBytes;
      const names = wanted ?? [...header.tensors.keys()];
      for (const name of names) {
        const info = header.tensors.get(name);
        if (!info) {
          throw new ExpertMeshError(
            "EM_CKPT_BAD_INDEX",
            `${join(dir, INDEX_FILE)} maps ${name} to ${file}, which has no such tensor`,
          );
        }
        if (mtp || !isMtpTensor(name, config)) infos.set(name, info);
      }
    }
    const sorted = new Map([...infos].sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0)));
    return new Checkpoint(dir, config, sorted, headerBytes, mtp, [...files.keys()]);
  }

  /** Names of all tensors (MTP tensors left out), sorted. */
  names(): string[] {
    return [...this.infos.keys()];
  }

  /** Whether the checkpoint holds tensor `name` (false for MTP tensors). */
  has(name: string): boolean {
    return this.infos.has(name);
  }

  /** Where tensor `name` lives, its dtype and shape. Throws EM_CKPT_MISSING_TENSOR. */
  tensorInfo(name: string): TensorInfo {
    const info = this.infos.get(name);
    if (!info) {
      const why =
        isMtpTensor(name, this.config) && !this.mtp
          ? " (it belongs to a multi-token-prediction layer, which is skipped)"
          : "";
      throw new ExpertMeshError("EM_CKPT_MISSING_TENSOR", `${this.dir}: no tensor ${name}${why}`);
    }
    return info;
  }

  /**
   * Reads tensor `name`, checking its shape and dtype first when `opts` asks. Only that
   * tensor's bytes are read. Throws EM_CKPT_MISSING_TENSOR, EM_CKPT_SHAPE_MISMATCH,
   * EM_CKPT_UNSUPPORTED_DTYPE, EM_CKPT_TRUNCATED or EM_CKPT_READ.
   */
  async read(name: string, opts: ReadOptions = {}): Promise<Tensor> {
    return readTensor(this.tensorInfo(name), opts, this.counter);
  }

  /**
   * What tells these weights from others' (weights-digest.ts, ADR 0035): the same for every
   * copy of the same checkpoint, whoever opened it and with what options. Read once (a few
   * hundred KiB per file), then kept. Shards and gateways meet on NATS under it, and the prefix
   * cache's second tier keys its blocks by it (ADR 0019).
   */
  weightsDigest(): Promise<string> {
    this.#digest ??= weightsDigest(this.dir, this.files);
    return this.#digest;
  }

  /** Bytes taken from disk since opening (headers plus the tensors read). */
  get bytesRead(): number {
    return this.counter.bytesRead;
  }
}

/** MTP layers follow the last block: `model.layers.{n}` with n >= num_hidden_layers. */
function isMtpTensor(name: string, config: ModelConfig): boolean {
  const m = /^model\.layers\.(\d+)\./.exec(name);
  return m !== null && Number(m[1]) >= config.numHiddenLayers;
}

/** The safetensors files of `dir`, each with the tensor names the index maps to it (null: all). */
function shardFiles(dir: string): Map<string, string[] | null> {
  const indexPath = join(dir, INDEX_FILE);
  if (existsSync(indexPath)) return readIndex(indexPath);
  if (existsSync(join(dir, SINGLE_FILE))) return new Map([[SINGLE_FILE, null]]);
  throw new ExpertMeshError(
    "EM_CKPT_READ",
    `${dir}: neither ${SINGLE_FILE} nor ${INDEX_FILE} found`,
  );
}

function readIndex(path: string): Map<string, string[]> {
  function bad(msg: string): never {
    throw new ExpertMeshError("EM_CKPT_BAD_INDEX", `${path}: ${msg}`);
  }
  let json: unknown;
  try {
    json = JSON.parse(readFileSync(path, "utf8"));
  } catch (err) {
    bad(`not readable JSON (${err instanceof Error ? err.message : err})`);
  }
  const map = (json as { weight_map?: unknown } | null)?.weight_map;
  if (typeof map !== "object" || map === null || Array.isArray(map)) bad("no weight_map object");
  const files = new Map<string, string[]>();
  for (const [name, file] of Object.entries(map as Record<string, unknown>)) {
    if (
      typeof file !== "string" ||
      file === "" ||
      basename(file) !== file ||
      file === "." ||
      file === ".."
    ) {
      bad(
        `weight_map[${name}] must be a file name in the same directory, got ${JSON.stringify(file)}`,
      );
    }
    const names = files.get(file) ?? [];
    names.push(name);
    files.set(file, names);
  }
  if (files.size === 0) bad("weight_map is empty");
  const dir = join(path, "..");
  for (const file of files.keys()) {
    if (!existsSync(join(dir, file))) bad(`shard ${file} does not exist`);
  }
  return files;
}
