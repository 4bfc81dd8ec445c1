// Where a prompt's encoding may be cut: @huggingface/tokenizers splits a text at the added
// tokens it finds in it (longest first at each position, scanning left to right: its
// DictionarySplitter), then encodes each piece between them alone (normalizer,
// pre-tokenizer, model). So the encoding of a text is the encodings of its parts, joined,
// when the parts end where the library's scan matched an added token, and nothing in the
// tokenizer makes a piece depend on its neighbours: an added token that strips the
// whitespace beside it (lstrip, rstrip), or a Metaspace pre-tokenizer that prepends its
// space to the first piece only (prepend_scheme "first": the library passes each piece's
// index for that alone). A chat prompt has an added token at every turn (<｜User｜>,
// <｜Assistant｜>, ...), so a conversation sent again with a turn more has all its earlier
// parts in common with the last one: the gateway encodes only what is new (PromptEncoder).
import { isObject } from "../util/objects.ts";

/** A trie of added tokens' texts: `end` marks a whole token. */
interface Node {
  end?: string;
  next: Map<string, Node>;
}

/** Cuts texts where their encoding may be cut (splitPieces). */
export interface PieceSplitter {
  readonly root: Node;
  /** The characters added tokens start with, when few (the scan jumps between them). */
  readonly firsts: readonly string[] | null;
}

/** More distinct first characters than this: the scan steps through every character. */
const MAX_FIRSTS = 8;

/**
 * The splitter of a tokenizer.json's contents, or null when its pieces are not encoded
 * independently (above): then a text is only ever encoded whole.
 */
export function pieceSplitter(tokenizerJson: Record<string, unknown>): PieceSplitter | null {
  if (JSON.stringify(tokenizerJson["pre_tokenizer"] ?? null).includes('"Metaspace"')) return null;
  const normalizer = tokenizerJson["normalizer"] != null;
  const added = Array.isArray(tokenizerJson["added_tokens"]) ? tokenizerJson["added_tokens"] : [];
  const root: Node = { next: new Map() };
  for (const t of added) {
    if (!isObject(t) || typeof t["content"] !== "string" || t["content"] === "") return null;
    // (as the library: tokens normalized are matched later, inside a piece, after its
    // normalizer ran; the others on the raw text, which is what cuts pieces)
    const special = t["special"] === true;
    const normalized = typeof t["normalized"] === "boolean" ? t["normalized"] : !special;
    if (normalized && normalizer) continue;
    if (t["lstrip"] === true || t["rstrip"] === true) return null;
    let node = root;
    const content = t["content"];
    for (let i = 0; i < content.length; i++) {
      const ch = content[i]!; // (by UTF-16 unit, as the library's trie)
      let next = node.next.get(ch);
      if (!next) {
        next = { next: new Map() };
        node.next.set(ch, next);
      }
      node = next;
    }
    node.end = t["content"];
  }
  const firsts = [...root.next.keys()];
  return { root, firsts: firsts.length <= MAX_FIRSTS ? firsts : null };
}

/**
 * `text` cut after added tokens (as the library's scan finds them), into parts of at least
 * `minChars` characters each but the last (parts too short to be worth keeping apart are
 * joined: joining parts keeps the encoding's equality). The parts joined are `text`.
 */
export function splitPieces(s: PieceSplitter, text: string, minChars: number): string[] {
  const parts: string[] = [];
  let from = 0;
  let i = 0;
  while (i < text.length) {
    // (no token starts where no token's first character is: on to the next one that is)
    if (s.firsts) {
      let next = text.length;
      for (const c of s.firsts) {
        const at = text.indexOf(c, i);
        if (at >= 0 && at < next) next = at;
      }
      if (next === text.length) break;
      i = next;
    }
    // The longest added token starting at i, as DictionarySplitter finds it.
    let node: Node | undefined = s.root;
    let match = 0;
    for (let j = i; j < text.length; ) {
      node = node.next.get(text[j]!);
      if (!node) break;
      j++;
      if (node.end !== undefined) match = j - i;
    }
    if (match === 0) {
      i++;
      continue;
    }
    i += match;
    if (i - from >= minChars) {
      parts.push(text.slice(from, i));
      from = i;
    }
  }
  if (from < text.length || parts.length === 0) parts.push(text.slice(from));
  return parts;
}
