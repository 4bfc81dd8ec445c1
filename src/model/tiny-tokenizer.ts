// The tokenizer files of the tiny checkpoints: a small byte-level BPE in the Hugging Face
// `tokenizer.json` format (the 256 byte tokens, a few dozen merges of common English
// pairs, the DeepSeek special tokens) and a `tokenizer_config.json` with DeepSeek's chat
// template. Pure data builders; tiny.ts writes them.
import { byteToUnicode, TOOL_TOKENS } from "./tokenizer.ts";

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
];

/** After the merges (as in DeepSeek's, whose added tokens follow the BPE vocabulary). */
const TOOLS: readonly { content: string; special: boolean }[] = Object.values(TOOL_TOKENS).map(
  (content) => ({ content, special: false }),
);

/** Number of tokens of the tiny tokenizer (specials, bytes, merges, tool tokens): 320. */
export function tinyTokenizerSize(): number {
  return SPECIALS.length + 256 + MERGES.length + TOOLS.length;
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
  const toolIds = TOOLS.map((t) => {
    vocab[t.content] = id;
    return id++;
  });
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
    added_tokens: [
      ...SPECIALS.map((s, i) => [s, i] as const),
      ...TOOLS.map((t, i) => [t, toolIds[i]!] as const),
    ].map(([s, id]) => ({
      id,
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
 * DeepSeek's chat template (V3 style): BOS, the system prompts joined by blank lines, then
 * `<｜User｜>text` and `<｜Assistant｜>text<｜end▁of▁sentence｜>` turns, an assistant's
 * tool calls in the tool-call tokens (TOOL_TOKENS) after its text, tool results between
 * `<｜tool▁outputs▁begin｜>` and `<｜tool▁outputs▁end｜>` (the assistant's next turn follows
 * that directly, as in V3's), and `<｜Assistant｜>` when a generation prompt is asked for,
 * followed by `<think>` or `</think>` when the request sets V3.1's `thinking` (its hybrid
 * thinking switch, through chat_template_kwargs).
 * Unlike V3's it names the request's tools (`tools`) after the system prompt; the gateway
 * presents them in full to templates that do not (docs/gateway.md).
 */
export const DEEPSEEK_CHAT_TEMPLATE =
  "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}" +
  "{% set ns = namespace(system_prompt='', is_tool=false) %}" +
  "{%- for message in messages %}{%- if message['role'] == 'system' %}" +
  "{%- if ns.system_prompt %}{% set ns.system_prompt = ns.system_prompt + '\\n\\n' + message['content'] %}" +
  "{%- else %}{% set ns.system_prompt = message['content'] %}{%- endif %}" +
  "{%- endif %}{%- endfor %}" +
  // The request's functions by name only (V3's template leaves tools out; the gateway then
  // presents them in full, which a 256-token context could not hold).
  "{%- if tools %}{% set ns.system_prompt = (ns.system_prompt + '\\n\\n' if ns.system_prompt else '') + 'Tools: ' + (tools | map(attribute='function') | map(attribute='name') | join(', ')) %}{%- endif %}" +
  "{{ bos_token }}{{ ns.system_prompt }}" +
  "{%- for message in messages %}" +
  "{%- if message['role'] == 'tool' %}" +
  "{%- if ns.is_tool %}{{ '\\n<｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>' }}" +
  "{%- else %}{{ '<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>' }}{%- endif %}" +
  "{%- set ns.is_tool = true %}" +
  "{%- else %}" +
  "{%- if ns.is_tool %}{{ '<｜tool▁outputs▁end｜>' }}{%- endif %}" +
  "{%- if message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}" +
  "{%- elif message['role'] == 'assistant' %}" +
  "{%- if not ns.is_tool %}{{ '<｜Assistant｜>' }}{%- endif %}" +
  "{%- if message['content'] %}{{ message['content'] }}{%- endif %}" +
  "{%- if message['tool_calls'] %}{{ '<｜tool▁calls▁begin｜>' }}" +
  "{%- for call in message['tool_calls'] %}{%- if not loop.first %}{{ '\\n' }}{%- endif %}" +
  "{{ '<｜tool▁call▁begin｜>' + call['type'] + '<｜tool▁sep｜>' + call['function']['name'] + '\\n```json\\n' + call['function']['arguments'] + '\\n```<｜tool▁call▁end｜>' }}" +
  "{%- endfor %}{{ '<｜tool▁calls▁end｜>' }}{%- endif %}" +
  "{{ '<｜end▁of▁sentence｜>' }}" +
  "{%- endif %}" +
  "{%- set ns.is_tool = false %}" +
  "{%- endif %}{%- endfor %}" +
  "{% if ns.is_tool %}{{ '<｜tool▁outputs▁end｜>' }}{% elif add_generation_prompt %}{{ '<｜Assistant｜>' }}" +
  // DeepSeek-V3.1's switch, when a request gives it (chat_template_kwargs): think first, or not.
  "{% if thinking is defined %}{{ '<think>' if thinking else '</think>' }}{% endif %}{% endif %}";

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
