/* epd tokenizer: byte-level BPE from a checkpoint's tokenizer.json, its special tokens and
 * chat template (public C API).
 *
 * Conventions
 *  - Text is UTF-8 bytes with an explicit length; encode refuses ill-formed UTF-8 and names the
 *    byte offset. Token ids are int32_t.
 *  - A loaded epd_tok_t is immutable except for its internal word cache, which is guarded, so
 *    one tokenizer may be shared by any number of threads.
 *  - Errors follow epd's one contract (common/include/epd_err.h): a call returns 0 or a negative
 *    errno value (-EINVAL malformed file or bad input, -ENOTSUP a tokenizer.json or template
 *    feature not implemented, -ENOMEM, or the errno of a file that cannot be read), and fills
 *    err (NULL allowed) with a message that names the file, JSON path, byte offset or message
 *    index at fault.
 */
#ifndef EPD_TOK_H
#define EPD_TOK_H

#include "epd_err.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct epd_tok epd_tok_t;

/* Loads <model_dir>/tokenizer.json (required), <model_dir>/tokenizer_config.json,
 * <model_dir>/chat_template.jinja and <model_dir>/generation_config.json (all three optional: a
 * missing file is not an error, a malformed one is). The chat template is chat_template.jinja's
 * text when that file exists (how transformers 5 saves it; it wins over the config, as in
 * transformers), else tokenizer_config.json's chat_template: a string, or a list of
 * {"name", "template"} of which the one named "default" applies. */
int epd_tok_load_dir(const char *model_dir, epd_tok_t **out, epd_err_t *err);

/* The same with explicit paths; all but tokenizer_json may be NULL. */
int epd_tok_load_files(const char *tokenizer_json, const char *tokenizer_config_json,
                       const char *chat_template_jinja, const char *generation_config_json,
                       epd_tok_t **out, epd_err_t *err);

void epd_tok_destroy(epd_tok_t *tok);

/* Size of the id space: the model vocabulary plus added tokens (max id + 1). */
size_t epd_tok_vocab_size(const epd_tok_t *tok);

/* ---- encoding ------------------------------------------------------------------------------ */

/* A growable id buffer owned by the caller: zero-initialise, reuse across calls, then fini. */
typedef struct epd_tok_ids {
    int32_t *ids;
    size_t len;
    size_t cap;
} epd_tok_ids_t;

void epd_tok_ids_fini(epd_tok_ids_t *v);

enum epd_tok_encode_flags {
    /* Treat special added tokens (special: true) written in the text as plain text, the way
     * transformers' split_special_tokens=True does; non-special added tokens still match.
     * Use this for untrusted user text that must not be able to inject <|im_start|>. */
    EPD_TOK_ENCODE_SPLIT_SPECIAL = 1u << 0,
    /* transformers' add_special_tokens=True: bos_token before the text when
     * tokenizer_config.json's add_bos_token is true (DeepSeek-V3), eos_token after it when
     * add_eos_token is; nothing for a tokenizer with neither (Qwen3). epd_tok_encode only: a
     * chat rendering carries the template's own BOS. */
    EPD_TOK_ENCODE_ADD_SPECIAL = 1u << 1,
};

/* Appends the ids of text[0..len) to out (out->len grows; existing ids are kept). */
int epd_tok_encode(const epd_tok_t *tok, const char *text, size_t len, unsigned flags,
                   epd_tok_ids_t *out, epd_err_t *err);

/* ---- decoding ------------------------------------------------------------------------------ */

enum epd_tok_decode_flags {
    EPD_TOK_DECODE_SKIP_SPECIAL = 1u << 0, /* drop added tokens flagged special */
};

/* Decodes ids into a NUL-terminated malloc'd UTF-8 string (*out, *out_len without the NUL).
 * Byte sequences that are not UTF-8 become U+FFFD, one per maximal ill-formed subpart (the
 * `errors: "replace"` behaviour of Python and of Rust's from_utf8_lossy). An id outside the
 * vocabulary is an error naming its index. */
int epd_tok_decode(const epd_tok_t *tok, const int32_t *ids, size_t n, unsigned flags, char **out,
                   size_t *out_len, epd_err_t *err);

/* The raw bytes a single id stands for (no UTF-8 repair); NULL for an unknown id. */
const uint8_t *epd_tok_id_bytes(const epd_tok_t *tok, int32_t id, size_t *len);

/* Streaming decoder for generation: feed ids one at a time, get text that never ends inside a
 * UTF-8 character. Bytes that may still complete a character are held back; bytes that can
 * never become valid are emitted as U+FFFD at once. The concatenation of all pushes and the
 * final flush equals epd_tok_decode of the whole id sequence. */
typedef struct epd_tok_stream epd_tok_stream_t;

int epd_tok_stream_create(const epd_tok_t *tok, unsigned decode_flags, epd_tok_stream_t **out);
void epd_tok_stream_destroy(epd_tok_stream_t *s);

/* Decodes one id. *text points into the stream's own buffer and stays valid until the next call
 * on the stream; *text_len may be 0 (all bytes held back, or a skipped special token). */
int epd_tok_stream_push(epd_tok_stream_t *s, int32_t id, const char **text, size_t *text_len,
                        epd_err_t *err);

/* Ends the sequence: held-back bytes of an unfinished character become one U+FFFD. The stream
 * is then empty and may be reused. */
int epd_tok_stream_flush(epd_tok_stream_t *s, const char **text, size_t *text_len);

/* ---- special tokens ------------------------------------------------------------------------ */

/* The id of a token given by its content (added or model token); -1 when absent. */
int32_t epd_tok_token_id(const epd_tok_t *tok, const char *content);
bool epd_tok_is_special(const epd_tok_t *tok, int32_t id);

/* Ids that end generation: generation_config.json's eos_token_id (an int or a list) when that
 * file gives one, else the id of tokenizer_config.json's eos_token. May be 0 ids. */
const int32_t *epd_tok_eos_ids(const epd_tok_t *tok, size_t *n);
/* -1 when the configs name none. */
int32_t epd_tok_bos_id(const epd_tok_t *tok);
int32_t epd_tok_pad_id(const epd_tok_t *tok);

/* ---- chat templates ------------------------------------------------------------------------ */

typedef enum epd_tok_chat_kind {
    EPD_TOK_CHAT_NONE = 0,  /* no chat_template.jinja, no chat_template in the config */
    EPD_TOK_CHAT_QWEN3 = 1, /* Qwen3's ChatML template with thinking (recognised by its text) */
    /* DeepSeek-V3's: {{ bos_token }}, the system prompts joined, <｜User｜>/<｜Assistant｜> turns,
     * <｜end▁of▁sentence｜> after each assistant turn, its tool-call and tool-output blocks */
    EPD_TOK_CHAT_DEEPSEEK_V3 = 2,
} epd_tok_chat_kind_t;

/* "none", "qwen3", "deepseek_v3" */
const char *epd_tok_chat_kind_name(epd_tok_chat_kind_t kind);

/* The template found in chat_template.jinja or tokenizer_config.json. A template that is present
 * but not recognised fails the load (it is never silently replaced by another one). */
epd_tok_chat_kind_t epd_tok_chat_kind(const epd_tok_t *tok);

typedef struct epd_tok_tool_call {
    const char *name;
    const char *arguments; /* emitted verbatim: a JSON object as text (OpenAI's form) */
} epd_tok_tool_call_t;

typedef struct epd_tok_chat_msg {
    const char *role;    /* "system", "user", "assistant" or "tool" */
    const char *content; /* required (the template fails on null content) */
    /* assistant only: NULL means "not given" (thinking is then split out of content at
     * </think>, as the template does); "" means "given, empty". */
    const char *reasoning_content;
    const epd_tok_tool_call_t *tool_calls; /* assistant only */
    size_t n_tool_calls;
    /* The byte lengths of content and reasoning_content, which may hold NUL bytes; 0: up to
     * their NUL terminator. */
    size_t content_len, reasoning_content_len;
} epd_tok_chat_msg_t;

typedef struct epd_tok_chat_opts {
    bool add_generation_prompt;
    /* Qwen3's enable_thinking=false: the generation prompt gets an empty <think></think> block.
     * Zero (the default) renders like enable_thinking left out or true. */
    bool disable_thinking;
} epd_tok_chat_opts_t;

/* Renders messages with the checkpoint's template into a NUL-terminated malloc'd string; opts
 * may be NULL. Tool definitions (the template's `tools` variable) are not implemented and have
 * no parameter. A message the template cannot render (no messages, an unknown role, null
 * content) is refused with its index. */
int epd_tok_chat_render(const epd_tok_t *tok, const epd_tok_chat_msg_t *msgs, size_t n_msgs,
                        const epd_tok_chat_opts_t *opts, char **out, size_t *out_len,
                        epd_err_t *err);

/* Renders messages as epd_tok_chat_render does and appends the ids of the rendering to ids.
 * flags as epd_tok_encode's, except EPD_TOK_ENCODE_SPLIT_SPECIAL, which here applies to the
 * messages' own text only (content, reasoning_content, tool-call names and arguments): a
 * special token spelled there (`<|im_start|>system`) is encoded as the plain text it is, while
 * the template's markers stay control tokens. Text between matched control tokens is encoded in
 * one piece, so a chat whose messages spell no special token gets exactly the ids of
 * epd_tok_encode(epd_tok_chat_render(...)). Without the flag that is what it is. */
int epd_tok_chat_encode(const epd_tok_t *tok, const epd_tok_chat_msg_t *msgs, size_t n_msgs,
                        const epd_tok_chat_opts_t *opts, unsigned flags, epd_tok_ids_t *ids,
                        epd_err_t *err);

#ifdef __cplusplus
}
#endif

#endif /* EPD_TOK_H */
