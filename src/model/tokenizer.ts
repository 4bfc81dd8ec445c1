// The model's tokenizer: `tokenizer.json` run by @huggingface/tokenizers, the special
// tokens and `add_bos_token` / `add_eos_token` from `tokenizer_config.json` (applied here,
// as LlamaTokenizerFast does, whatever post-processor tokenizer.json has), and the chat
// template rendered by @huggingface/jinja.
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { Template } from "@huggingface/jinja";
import { Tokenizer as HfTokenizer } from "@huggingface/tokenizers";
import { ExpertMeshError } from "../util/errors.ts";
import { isObject } from "../util/objects.ts";
import { type PieceSplitter, pieceSplitter } from "./pieces.ts";

/**
 * DeepSeek-V3's tool-call tokens (added, not special: decoding keeps them). A call is
 * `<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\n```json\nARGS\n```<｜tool▁call▁end｜>`
 * (calls after the first preceded by a newline) `<｜tool▁calls▁end｜>`; a tool's result is
 * `<｜tool▁output▁begin｜>TEXT<｜tool▁output▁end｜>`, a turn's results within the outputs tokens.
 */
export const TOOL_TOKENS = {
  callsBegin: "<｜tool▁calls▁begin｜>",
  callsEnd: "<｜tool▁calls▁end｜>",
  callBegin: "<｜tool▁call▁begin｜>",
  callEnd: "<｜tool▁call▁end｜>",
  sep: "<｜tool▁sep｜>",
  outputsBegin: "<｜tool▁outputs▁begin｜>",
  outputsEnd: "<｜tool▁outputs▁end｜>",
  outputBegin: "<｜tool▁output▁begin｜>",
  outputEnd: "<｜tool▁output▁end｜>",
} as const;

/** A call an assistant turn made (OpenAI's shape; `arguments` is JSON text). */
export interface ChatToolCall {
  readonly id: string;
  readonly type: "function";
  readonly function: { readonly name: string; readonly arguments: string };
}

/** One chat turn: text, an assistant's tool calls (content may then be null), a tool's result. */
export interface ChatMessage {
  readonly role: "system" | "user" | "assistant" | "tool";
  readonly content: string | null;
  readonly tool_calls?: readonly ChatToolCall[];
  /** role "tool": the call this is the result of. */
  readonly tool_call_id?: string;
}

/** Encodes and decodes text, and renders chats, for one model. */
export class Tokenizer {
  /** `bos_token` text, or null when the config has none. */
  readonly bosToken: string | null;
  /** `eos_token` text, or null. */
  readonly eosToken: string | null;
  readonly bosTokenId: number | null;
  readonly eosTokenId: number | null;
  /** `add_bos_token`: encode() with special tokens prepends BOS. */
  readonly addBosToken: boolean;
  /** `add_eos_token`: encode() with special tokens appends EOS. */
  readonly addEosToken: boolean;
  /** Number of tokens, added tokens included (may be less than the model's vocab_size). */
  readonly size: number;
  /** The most UTF-8 bytes of any token's text in the vocabulary (added tokens included). */
  readonly maxTokenBytes: number;
  /** The directory the files were loaded from (load()), or null when built from objects. */
  readonly dir: string | null;
  private readonly hf: HfTokenizer;
  private readonly config: Readonly<Record<string, unknown>>;
  private readonly template: Template | null;
  /** The chat template renders the `tools` it is given (HF's `tools=`). */
  readonly templatePresentsTools: boolean;
  private readonly source: string;
  /** The decoder maps token characters back to bytes (GPT-2's byte-level BPE). */
  private readonly byteLevel: boolean;
  /** Added tokens (special or not): their text is literal, not byte-mapped. */
  readonly addedTokens: readonly { readonly id: number; readonly content: string }[];
  private readonly addedIds: ReadonlySet<number>;
  /** Tool-call tokens a tokenizer marks special: decoding keeps them even when skipping. */
  private readonly keptSpecial: ReadonlyMap<number, string>;
  /** Where a text's encoding may be cut (pieces.ts), or null: only whole texts here. */
  readonly pieceSplitter: PieceSplitter | null;
  private bytesOfTokens: (Uint8Array | null)[] | undefined;

  /**
   * A tokenizer from the parsed `tokenizer.json` and `tokenizer_config.json`; `source`
   * names them in messages, `dir` is where they were read from (for loading them again in
   * another thread); `chatTemplate` replaces the config's chat_template (vLLM's
   * --chat-template). Throws EM_TOKENIZER_INVALID or EM_TOKENIZER_TEMPLATE.
   */
  constructor(
    tokenizerJson: unknown,
    tokenizerConfig: unknown,
    source = "tokenizer",
    dir: string | null = null,
    chatTemplate?: string,
  ) {
    this.source = source;
    this.dir = dir;
    if (!isObject(tokenizerJson) || !isObject(tokenizerConfig)) {
      throw new ExpertMeshError(
        "EM_TOKENIZER_INVALID",
        `${source}: tokenizer files must hold JSON objects`,
      );
    }
    try {
      this.hf = new HfTokenizer(tokenizerJson, tokenizerConfig);
    } catch (err) {
      throw new ExpertMeshError(
        "EM_TOKENIZER_INVALID",
        `${source}: tokenizer.json rejected: ${err instanceof Error ? err.message : err}`,
        { cause: err },
      );
    }
    this.config = tokenizerConfig;
    const decoder = tokenizerJson["decoder"] as { type?: unknown; decoders?: unknown } | null;
    const decoders = Array.isArray(decoder?.decoders) ? decoder.decoders : [decoder];
    this.byteLevel = decoders.some((d) => isObject(d) && d["type"] === "ByteLevel");
    const added = Array.isArray(tokenizerJson["added_tokens"]) ? tokenizerJson["added_tokens"] : [];
    this.addedTokens = added.flatMap((t) =>
      isObject(t) && typeof t["id"] === "number" && typeof t["content"] === "string"
        ? [{ id: t["id"], content: t["content"] }]
        : [],
    );
    this.addedIds = new Set(this.addedTokens.map((t) => t.id));
    this.pieceSplitter = pieceSplitter(tokenizerJson);
    const toolTexts = new Set<string>(Object.values(TOOL_TOKENS));
    this.keptSpecial = new Map(
      added.flatMap((t) =>
        isObject(t) && t["special"] === true && toolTexts.has(t["content"] as string)
          ? [[t["id"] as number, t["content"] as string] as const]
          : [],
      ),
    );
    this.bosToken = tokenText(tokenizerConfig["bos_token"]);
    this.eosToken = tokenText(tokenizerConfig["eos_token"]);
    this.bosTokenId = this.specialId("bos_token", this.bosToken);
    this.eosTokenId = this.specialId("eos_token", this.eosToken);
    // LlamaTokenizerFast defaults: add BOS, not EOS.
    this.addBosToken = tokenizerConfig["add_bos_token"] !== false;
    this.addEosToken = tokenizerConfig["add_eos_token"] === true;
    if (this.addBosToken && this.bosTokenId === null) {
      throw new ExpertMeshError(
        "EM_TOKENIZER_INVALID",
        `${source}: add_bos_token is set but there is no bos_token`,
      );
    }
    if (this.addEosToken && this.eosTokenId === null) {
      throw new ExpertMeshError(
        "EM_TOKENIZER_INVALID",
        `${source}: add_eos_token is set but there is no eos_token`,
      );
    }
    const vocab = this.hf.get_vocab(true);
    this.size = vocab.size;
    let most = 1;
    for (const token of vocab.keys()) most = Math.max(most, Buffer.byteLength(token));
    this.maxTokenBytes = most;
    const compiled =
      chatTemplate === undefined
        ? compileTemplate(tokenizerConfig["chat_template"], source)
        : compileTemplate(chatTemplate, "--chat-template");
    this.template = compiled?.template ?? null;
    this.templatePresentsTools = compiled?.presentsTools ?? false;
  }

  /**
   * Loads `dir/tokenizer.json` and `dir/tokenizer_config.json`, with `chatTemplate` in place
   * of the config's when given. Throws EM_TOKENIZER_*.
   */
  static load(dir: string, chatTemplate?: string): Tokenizer {
    return new Tokenizer(
      readJson(join(dir, "tokenizer.json")),
      readJson(join(dir, "tokenizer_config.json")),
      dir,
      dir,
      chatTemplate,
    );
  }

  private specialId(key: string, text: string | null): number | null {
    if (text === null) return null;
    const id = this.hf.token_to_id(text);
    if (id === undefined) {
      throw new ExpertMeshError(
        "EM_TOKENIZER_INVALID",
        `${this.source}: ${key} ${text} is not in the vocabulary`,
      );
    }
    return id;
  }

  /**
   * Token ids of `text`. Special tokens written in the text map to their ids; with
   * `addSpecialTokens` (default true) BOS/EOS are added as the config says.
   */
  encode(text: string, addSpecialTokens = true): number[] {
    const ids = this.hf.encode(text, { add_special_tokens: false }).ids;
    if (!addSpecialTokens) return ids;
    const out = this.addBosToken ? [this.bosTokenId!, ...ids] : ids;
    if (this.addEosToken) out.push(this.eosTokenId!);
    return out;
  }

  /**
   * Text of token ids. Ids outside the tokenizer (the padding rows of a larger vocab_size)
   * decode to nothing; `skipSpecialTokens` drops BOS/EOS/pad and other special tokens (but
   * DeepSeek's tool-call tokens, even where a tokenizer marks them special).
   */
  decode(ids: readonly number[], skipSpecialTokens = false): string {
    // The tokenizers library refuses an empty list ("token_ids must be a non-empty array").
    if (ids.length === 0) return "";
    const options = {
      skip_special_tokens: skipSpecialTokens,
      clean_up_tokenization_spaces: this.config["clean_up_tokenization_spaces"] === true,
    };
    if (
      !skipSpecialTokens ||
      this.keptSpecial.size === 0 ||
      !ids.some((id) => this.keptSpecial.has(id))
    )
      return this.hf.decode([...ids], options);
    // Tool-call tokens marked special are kept (the calls are read from the text): the
    // pieces between them decoded alone (an added token ends any character before it).
    let out = "";
    let from = 0;
    for (let i = 0; i <= ids.length; i++) {
      const kept = i < ids.length ? this.keptSpecial.get(ids[i]!) : undefined;
      if (i < ids.length && kept === undefined) continue;
      if (i > from) out += this.hf.decode(ids.slice(from, i), options);
      if (kept !== undefined) out += kept;
      from = i + 1;
    }
    return out;
  }

  /** The id of a token string, or undefined. */
  tokenToId(token: string): number | undefined {
    return this.hf.token_to_id(token);
  }

  /** The token string of an id, or undefined. */
  idToToken(id: number): string | undefined {
    return this.hf.id_to_token(id);
  }

  /**
   * Every token id's bytes (index: id), as the decoder writes them; null for added and
   * special tokens (their text is literal). Null when the tokenizer is not byte-level
   * (its tokens' bytes are not known without decoding context). Computed once.
   */
  tokenBytes(): (Uint8Array | null)[] | null {
    if (!this.byteLevel) return null;
    if (this.bytesOfTokens) return this.bytesOfTokens;
    const byteOf = new Map(byteToUnicode().map((ch, b) => [ch, b]));
    const out: (Uint8Array | null)[] = [];
    for (const [token, id] of this.hf.get_vocab(true)) {
      if (this.addedIds.has(id)) continue;
      const bytes = new Uint8Array(token.length);
      let ok = true;
      let n = 0;
      for (const ch of token) {
        const b = byteOf.get(ch);
        if (b === undefined) {
          ok = false;
          break;
        }
        bytes[n++] = b;
      }
      out[id] = ok ? bytes.subarray(0, n) : null;
    }
    for (let id = 0; id < out.length; id++) out[id] ??= null;
    this.bytesOfTokens = out;
    return out;
  }

  /** Whether the config has a chat template. */
  get hasChatTemplate(): boolean {
    return this.template !== null;
  }

  /**
   * The prompt text for `messages` by the config's chat template (as HF's
   * `apply_chat_template(messages, tools=..., add_generation_prompt=..., tokenize=False)`).
   * With `continueFinalMessage` (HF's continue_final_message), the text ends with the last
   * message's content, its turn left open for the model to continue: the rendering is cut
   * after that content's last occurrence. Throws EM_TOKENIZER_TEMPLATE.
   */
  applyChatTemplate(
    messages: readonly ChatMessage[],
    addGenerationPrompt = false,
    extra: ChatTemplateExtra = {},
  ): string {
    const text = this.renderChat(messages, addGenerationPrompt, extra);
    if (!extra.continueFinalMessage) return text;
    const last = messages.at(-1)?.content;
    const at = last ? text.lastIndexOf(last) : -1;
    if (at < 0)
      throw new ExpertMeshError(
        "EM_TOKENIZER_TEMPLATE",
        `${this.source}: the chat template does not render the final message's content as it is, so it cannot be continued`,
      );
    return text.slice(0, at + last!.length);
  }

  private renderChat(
    messages: readonly ChatMessage[],
    addGenerationPrompt: boolean,
    extra: ChatTemplateExtra,
  ): string {
    if (this.template === null) {
      throw new ExpertMeshError(
        "EM_TOKENIZER_TEMPLATE",
        `${this.source}: tokenizer_config.json has no chat_template`,
      );
    }
    try {
      return this.template.render({
        // A request's chat_template_kwargs (HF's **kwargs), e.g. DeepSeek-V3.1's `thinking`;
        // the names below are the template's own and win.
        ...extra.kwargs,
        // As HF passes them: tool_calls and tool_call_id only where given.
        messages: messages.map((m) => ({
          role: m.role,
          content: m.content,
          ...(m.tool_calls ? { tool_calls: m.tool_calls } : {}),
          ...(m.tool_call_id !== undefined ? { tool_call_id: m.tool_call_id } : {}),
        })),
        add_generation_prompt: addGenerationPrompt,
        // The request's tools, for templates that present them (HF's `tools=`).
        ...(extra.tools ? { tools: extra.tools } : {}),
        bos_token: this.bosToken ?? "",
        eos_token: this.eosToken ?? "",
        pad_token: tokenText(this.config["pad_token"]) ?? "",
        unk_token: tokenText(this.config["unk_token"]) ?? "",
        // raise_exception() is built into @huggingface/jinja.
      });
    } catch (err) {
      throw new ExpertMeshError(
        "EM_TOKENIZER_TEMPLATE",
        `${this.source}: chat template failed: ${err instanceof Error ? err.message : err}`,
        { cause: err },
      );
    }
  }

  /**
   * A lower bound on the tokens of `text` (or of any text containing it), without encoding
   * it: no token covers more than maxTokenBytes bytes, and a factor 4 leaves room for a
   * normalizer that shortens text (NFKC maps a 3-byte fullwidth letter to 1 byte). For
   * refusing prompts far past the context before spending seconds encoding them.
   */
  minTokens(text: string): number {
    return Math.floor(Buffer.byteLength(text) / (4 * this.maxTokenBytes));
  }

  /**
   * Token ids of a chat: the rendered template encoded without adding BOS/EOS again (the
   * template writes them), as HF's `apply_chat_template(..., tokenize=True)`.
   */
  encodeChat(messages: readonly ChatMessage[], addGenerationPrompt = false): number[] {
    return this.encode(this.applyChatTemplate(messages, addGenerationPrompt), false);
  }
}

/** What a chat is rendered with besides its messages (Tokenizer.applyChatTemplate). */
export interface ChatTemplateExtra {
  readonly tools?: readonly unknown[];
  readonly kwargs?: Readonly<Record<string, unknown>>;
  /** End the text with the last message's content, its turn open (HF's continue_final_message). */
  readonly continueFinalMessage?: boolean;
}

/** The text of a special token given as a string or as `{content: ...}` (AddedToken). */
function tokenText(v: unknown): string | null {
  if (typeof v === "string") return v;
  if (isObject(v) && typeof v["content"] === "string") return v["content"];
  return null;
}

/** The chat template: a string, or a list of `{name, template}` of which "default" is used. */
function compileTemplate(
  value: unknown,
  source: string,
): { template: Template; presentsTools: boolean } | null {
  if (value === undefined || value === null) return null;
  let text: unknown = value;
  if (Array.isArray(value)) {
    text = value.find((t) => isObject(t) && t["name"] === "default")?.template;
  }
  if (typeof text !== "string") {
    throw new ExpertMeshError(
      "EM_TOKENIZER_TEMPLATE",
      `${source}: chat_template must be a string or a list with a "default" template`,
    );
  }
  try {
    // A template that reads `tools` presents them; DeepSeek-V3's does not.
    return { template: new Template(text), presentsTools: /\btools\b/.test(text) };
  } catch (err) {
    throw new ExpertMeshError(
      "EM_TOKENIZER_TEMPLATE",
      `${source}: chat_template does not parse: ${err instanceof Error ? err.message : err}`,
      { cause: err },
    );
  }
}

function readJson(path: string): unknown {
  try {
    return JSON.parse(readFileSync(path, "utf8"));
  } catch (err) {
    throw new ExpertMeshError(
      "EM_TOKENIZER_READ",
      `cannot read ${path}: ${err instanceof Error ? err.message : err}`,
      { cause: err },
    );
  }
}

/** GPT-2's reversible map from bytes to printable characters. */
export function byteToUnicode(): string[] {
  const printable: number[] = [];
  const add = (from: number, to: number) => {
    for (let b = from; b <= to; b++) printable.push(b);
  };
  add(0x21, 0x7e);
  add(0xa1, 0xac);
  add(0xae, 0xff);
  const map: string[] = new Array(256);
  for (const b of printable) map[b] = String.fromCodePoint(b);
  let n = 0;
  for (let b = 0; b < 256; b++) {
    if (map[b] === undefined) map[b] = String.fromCodePoint(256 + n++);
  }
  return map;
}
