// Content parts of a message (OpenAI's chat `content: [{type: "text", text}]`, the Responses
// API's `input_text` / `output_text`). The schemas admit a part of any type so that what this
// gateway's models cannot read (images, audio, files) is refused here, by name, rather than
// as a schema error about a missing `text`.
import { type Static, Type } from "@sinclair/typebox";
import { ApiError } from "./errors.ts";

export const ContentPart = Type.Object({
  type: Type.String(),
  text: Type.Optional(Type.Unknown()),
});
export type ContentPart = Static<typeof ContentPart>;

/**
 * The text of `parts`, whose types must be among `textTypes`. `at`: where they are, as a path
 * of names and indexes (["messages", 2, "content"]), for the message and the error's `param`.
 */
export function textOfParts(
  parts: readonly ContentPart[],
  at: readonly (string | number)[],
  textTypes: readonly string[],
): string {
  return parts
    .map((p, i) => {
      const where = [...at, i];
      const refuse = (why: string): never => {
        throw new ApiError("EM_GATEWAY_BAD_REQUEST", `${pathText(where)}: ${why}`, {
          param: where.join("."),
        });
      };
      const accepted = textTypes.map((t) => `'${t}'`).join(" or ");
      if (!textTypes.includes(p.type))
        refuse(
          `content parts of type '${p.type.slice(0, 40)}' are not supported: this model reads text only (type ${accepted})`,
        );
      if (typeof p.text !== "string") refuse(`a part of type '${p.type}' needs a string 'text'`);
      return p.text as string;
    })
    .join("");
}

/** ["messages", 2, "content", 0] as messages[2].content[0]. */
function pathText(at: readonly (string | number)[]): string {
  return at.map((x, i) => (typeof x === "number" ? `[${x}]` : i === 0 ? x : `.${x}`)).join("");
}
