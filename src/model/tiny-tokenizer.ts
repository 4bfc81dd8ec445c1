// The tokenizer files of the tiny checkpoints: a small byte-level BPE in the Hugging Face
// `tokenizer.json` format (the 256 byte tokens, a few dozen merges of common English
// pairs, the DeepSeek special tokens) and a `tokenizer_config.json` with DeepSeek's chat
// template. Pure data builders; tiny.ts writes them.
import { byteToUnicode } from "./tokenizer.ts";

/** DeepSeek's special tokens (fullwidth bars U+FF5C, lower blocks U+2581), ids 0..4. */
export const SPECIAL_TOKENS = {
  bos: "<｜begin▁of▁sentence｜>",
  eos: "<｜end▁of▁sentence｜>",
  pad: "<｜▁pad▁｜>",
  user: "<｜User｜>",
  assistant: "<｜Assistant｜>",
} as const;

const SPECIALS: readonly { content: string; special: boolean }[] = [
  { content: SPECIAL_TOKENS.bos, special: true },
  { content: SPECIAL_TOKENS.eos, special: true },
  { content: SPECIAL_TOKENS.pad, special: true },
  // DeepSeek-V3 marks the role tokens as added but not special: decoding keeps them.
  { content: SPECIAL_TOKENS.user, special: false },
  { content: SPECIAL_TOKENS.assistant, special: false },
];

/**
 * Merges in priority order, written with GPT-2's byte-to-unicode mapping (Ġ is a space).
 * Each one joins two tokens that exist by then.
 */
// biome-ignore format: a table, ten merges a row
const MERGES: readonly string[] = [
  "Ġ t", "h e", "i n", "e r", "Ġ a", "o n", "r e", "Ġt he", "a n", "o u",
  "Ġ s", "Ġ w", "e n", "a t", "Ġ o", "Ġ c", "i s", "e s", "o r", "i t",
  "Ġ b", "Ġ f", "in g", "Ġ p", "e d", "a l", "Ġ m", "a r", "Ġ d", "Ġ h",
  "l l", "Ġ i", "Ġo f", "Ġa n", "Ġan d", "Ġt o", "Ġ in", "Ġ l", "Ġ n", "Ġ e",
  "o m", "l e", "Ġ is", "Ġ T", "T h", "Ġ I", "Ġ re", "Ġ y", "Ġy ou", "o w",
  "Ġ he", "l o", "Ġ g", "Ġ it", "Ġw h", "e l", "Ġw it", "Ġwit h",
];

/** Number of tokens of the tiny tokenizer (specials, bytes, merges). */
export function tinyTokenizerSize(): number {
  return SPECIALS.length + 256 + MERGES.length;
}

/** The tiny `tokenizer.json` object. */
export function tinyTokenizerJson(): Record<string, unknown> {
  const vocab: Record<string, number> = {};
  let id = 0;
  for (const s of SPECIALS) vocab[s.content] = id++;
  for (const ch of byteToUnicode()) vocab[ch] = id++;
  for (const m of MERGES) {
    const [a, b] = m.split(" ") as [string, string];
    if (!(a in vocab) || !(b in vocab))
      throw new Error(`tiny tokenizer: merge ${m} uses unknown parts`);
    vocab[a + b] = id++;
  }
  const byteLevel = {
    type: "ByteLevel",
    add_prefix_space: false,
    trim_offsets: true,
    use_regex: true,
  };
  return {
    version: "1.0",
    truncation: null,
    padding: null,
    added_tokens: SPECIALS.map((s, i) => ({
      id: i,
      content: s.content,
      single_word: false,
      lstrip: false,
      rstrip: false,
      normalized: false,
      special: s.special,
    })),
    normalizer: null,
    pre_tokenizer: byteLevel,
    post_processor: { ...byteLevel, trim_offsets: false },
    decoder: byteLevel,
    model: {
      type: "BPE",
      dropout: null,
      unk_token: null,
      continuing_subword_prefix: null,
      end_of_word_suffix: null,
      fuse_unk: false,
      byte_fallback: false,
      ignore_merges: false,
      vocab,
      merges: [...MERGES],
    },
  };
}

/**
 * DeepSeek's chat template (V3 style, without tool calls): BOS, the system prompts joined
 * by blank lines, then `<｜User｜>text` and `<｜Assistant｜>text<｜end▁of▁sentence｜>` turns,
 * and `<｜Assistant｜>` when a generation prompt is asked for.
 */
export const DEEPSEEK_CHAT_TEMPLATE =
  "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}" +
  "{% set ns = namespace(system_prompt='') %}" +
  "{%- for message in messages %}{%- if message['role'] == 'system' %}" +
  "{%- if ns.system_prompt %}{% set ns.system_prompt = ns.system_prompt + '\\n\\n' + message['content'] %}" +
  "{%- else %}{% set ns.system_prompt = message['content'] %}{%- endif %}" +
  "{%- endif %}{%- endfor %}" +
  "{{ bos_token }}{{ ns.system_prompt }}" +
  "{%- for message in messages %}" +
  "{%- if message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}" +
  "{%- elif message['role'] == 'assistant' %}{{ '<｜Assistant｜>' + message['content'] + '<｜end▁of▁sentence｜>' }}" +
  "{%- endif %}{%- endfor %}" +
  "{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}";

/** The tiny `tokenizer_config.json` object; `maxLength` is the model's context length. */
export function tinyTokenizerConfigJson(maxLength: number): Record<string, unknown> {
  const added = (content: string) => ({
    __type: "AddedToken",
    content,
    lstrip: false,
    normalized: true,
    rstrip: false,
    single_word: false,
  });
  return {
    add_bos_token: true,
    add_eos_token: false,
    bos_token: added(SPECIAL_TOKENS.bos),
    eos_token: added(SPECIAL_TOKENS.eos),
    pad_token: added(SPECIAL_TOKENS.pad),
    unk_token: null,
    clean_up_tokenization_spaces: false,
    legacy: true,
    model_max_length: maxLength,
    sp_model_kwargs: {},
    tokenizer_class: "LlamaTokenizerFast",
    chat_template: DEEPSEEK_CHAT_TEMPLATE,
  };
}
