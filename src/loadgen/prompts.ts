// The prompts of a benchmark: random English words (a fixed list, drawn from a seed, so that
// two runs send the same prompts and no two requests share a cacheable prefix by chance), or
// the lines of a file.
import { readFileSync } from "node:fs";
import { Prng } from "../model/prng.ts";
import { ExpertMeshError } from "../util/errors.ts";

// Common short words: about one token each in DeepSeek's tokenizer.
const WORDS = (
  "the of and to in is it you that he was for on are with as his they be at one have this " +
  "from or had by word but what some we can out other were all there when up use your how " +
  "said an each she which do their time if will way about many then them write would like so " +
  "these her long make thing see him two has look more day could go come did number sound no " +
  "most people my over know water than call first who may down side been now find any new " +
  "work part take get place made live where after back little only round man year came show " +
  "every good me give our under name very through just form sentence great think say help low " +
  "line differ turn cause much mean before move right boy old too same tell does set three " +
  "want air well also play small end put home read hand port large spell add even land here " +
  "must big high such follow act why ask men change went light kind off need house picture try"
).split(" ");

/**
 * `count` prompts of `words` random words each, from `seed`; request i of a run gets prompt
 * i mod count. Each starts with its index, so that no two prompts share a first word.
 */
export function randomPrompts(count: number, words: number, seed: number): string[] {
  const prng = new Prng(seed, "prompts");
  return Array.from({ length: count }, (_, i) => {
    const out = [`${i}:`];
    for (let w = 1; w < words; w++) out.push(WORDS[prng.nextU32() % WORDS.length]!);
    return out.join(" ");
  });
}

/**
 * `words` random words from `seed` (another stream than the prompts'), the same for every
 * request: a system prompt the requests share, as a prefix cache sees it.
 */
export function sharedPrefix(words: number, seed: number): string {
  const prng = new Prng(seed, "shared prefix");
  return Array.from({ length: words }, () => WORDS[prng.nextU32() % WORDS.length]!).join(" ");
}

/**
 * The prompts in a file: JSON Lines whose lines are strings or objects with a string
 * `prompt` (vLLM's custom dataset), or else one prompt per non-empty line.
 */
export function readPrompts(path: string): string[] {
  let text: string;
  try {
    text = readFileSync(path, "utf8");
  } catch (err) {
    throw new ExpertMeshError(
      "EM_CLI_FILE",
      `cannot read the prompts file ${path}: ${(err as Error).message}`,
    );
  }
  const lines = text.split("\n").filter((l) => l.trim() !== "");
  if (lines.length === 0) {
    throw new ExpertMeshError("EM_CLI_FILE", `the prompts file ${path} has no prompt`);
  }
  const json = lines.every((l) => /^\s*[{"]/.test(l));
  if (!json) return lines;
  return lines.map((line, i) => {
    let v: unknown;
    try {
      v = JSON.parse(line);
    } catch {
      throw new ExpertMeshError("EM_CLI_FILE", `${path} line ${i + 1} is not JSON`);
    }
    const prompt = typeof v === "string" ? v : (v as { prompt?: unknown })?.prompt;
    if (typeof prompt !== "string" || prompt === "") {
      throw new ExpertMeshError(
        "EM_CLI_FILE",
        `${path} line ${i + 1}: a JSON line must be a string or an object with a non-empty string "prompt"`,
      );
    }
    return prompt;
  });
}

/**
 * The prompt tokens a request whose prompt is `text` runs on, as the server counts them (its
 * /tokenize, with the chat template and any shared prefix the request adds).
 */
export type TokenCounter = (text: string) => Promise<number>;

/** How many words a prompt tries at its end before the fillers. */
const FILL_TRIES = 32;

/** What fills a prompt's last tokens when no word does: a letter, punctuation. */
const FILLERS = [" a", " I", ".", ",", ";", "!", "?"];

/**
 * Prompt `i` of a run of prompts that each run on `target` tokens (bench --input-len, vLLM's
 * random input length): its index, then random words (a stream of its own from `seed`), as
 * many as fit by `count`, found by bisection (every word is at least one token). When the
 * next word would overshoot (a word of several tokens), other words are tried in its place
 * until the count is `target`, then a letter or punctuation, so it is exact unless none fits.
 * EM_CLI_USAGE when the index alone (with what the request adds) is over `target`.
 */
export async function fitPrompt(
  i: number,
  target: number,
  seed: number,
  count: TokenCounter,
): Promise<{ text: string; tokens: number }> {
  const prng = new Prng(seed, `input ${i}`);
  const word = () => WORDS[prng.nextU32() % WORDS.length]!;
  const words = [`${i}:`];
  const text = (k: number) => words.slice(0, k).join(" ");
  const countOf = async (k: number) => {
    while (words.length < k) words.push(word());
    return count(text(k));
  };
  let [lo, loTokens] = [1, await countOf(1)];
  if (loTokens > target)
    throw new ExpertMeshError(
      "EM_CLI_USAGE",
      `--input-len ${target} is less than the ${loTokens} tokens a request takes with a one-word prompt (its chat template and shared prefix): give more`,
    );
  // The first count over target: at most target words, doubled in case words merge.
  let hi = target + 1;
  for (let t = await countOf(hi); t <= target; t = await countOf(hi)) {
    if (hi > 16 * target)
      throw new ExpertMeshError(
        "EM_BENCH_REFUSED",
        `the server counts ${t} tokens for a prompt of ${hi} words: its /tokenize does not count prompts`,
      );
    [lo, loTokens, hi] = [hi, t, hi * 2];
  }
  while (hi - lo > 1) {
    const mid = (lo + hi) >> 1;
    const t = await countOf(mid);
    if (t <= target) [lo, loTokens] = [mid, t];
    else hi = mid;
  }
  let best = text(lo);
  for (let tries = 0; loTokens < target && tries < FILL_TRIES; tries++) {
    const candidate = `${best} ${word()}`;
    const t = await count(candidate);
    if (t <= target) [best, loTokens] = [candidate, t];
  }
  // Last, the smallest pieces there are (a tokenizer with few merges splits every word).
  for (let f = 0; loTokens < target && f < FILLERS.length; ) {
    const candidate = best + FILLERS[f];
    const t = await count(candidate);
    if (t > loTokens && t <= target) [best, loTokens] = [candidate, t];
    else f++;
  }
  return { text: best, tokens: loTokens };
}
