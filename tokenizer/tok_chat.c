/* Chat templates: recognising the template by its text (Qwen3's ChatML here, DeepSeek-V3's in
 * tok_chat_deepseek.c), rendering Qwen3's natively (system/user/assistant/tool messages, thinking
 * blocks, tool calls, generation prompt), and the render/encode entry points. */
#include "tok_chat.h"

#include <stdlib.h>
#include <string.h>

/* Fragments of Qwen3's template, as written in chat_template.jinja or (once JSON-decoded) in
 * tokenizer_config.json (\\n is the template's own escape). Each pins one piece of what the
 * renderer below emits; a template missing any of them renders something else and is refused. */
static const char *const qwen3_fragments[] = {
    "'<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n'",
    "message.content.startswith('<tool_response>') and "
    "message.content.endswith('</tool_response>')",
    "(message.role == \"user\") or (message.role == \"system\" and not loop.first)",
    "'<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n'",
    "message.content.split('</think>')[-1].lstrip('\\n')",
    "message.content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n')",
    "loop.index0 > ns.last_query_index",
    "loop.last or (not loop.last and reasoning_content)",
    "'<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + "
    "'\\n</think>\\n\\n' + content.lstrip('\\n')",
    "'<|im_start|>' + message.role + '\\n' + content",
    "(loop.first and content) or (not loop.first)",
    "'<tool_call>\\n{\"name\": \"'",
    "'\", \"arguments\": '",
    "'}\\n</tool_call>'",
    "'<|im_end|>\\n'",
    "'<|im_start|>user'",
    "'\\n<tool_response>\\n'",
    "'\\n</tool_response>'",
    "'<|im_start|>assistant\\n'",
    "enable_thinking is defined and enable_thinking is false",
    "'<think>\\n\\n</think>\\n\\n'",
};

/* Qwen3's template has this many output expressions; a variant that adds output elsewhere (a
 * default system prompt, say) has more and is refused. */
#define QWEN3_OUTPUT_EXPRS 26

size_t tok_count(const char *s, const char *needle)
{
    size_t n = 0, len = strlen(needle);
    for (const char *p = strstr(s, needle); p; p = strstr(p + len, needle))
        n++;
    return n;
}

int tok_chat_detect(const char *tmpl, const char *where, epd_tok_chat_kind_t *kind, epd_err_t *err)
{
    if (strstr(tmpl, "<｜User｜>")) {
        size_t n_exprs = 0;
        const char *lacks = tok_chat_deepseek_v3_mismatch(tmpl, &n_exprs);
        if (lacks && *lacks)
            return epd_err_set(
                err, -ENOTSUP,
                "%s: a DeepSeek template that is not DeepSeek-V3's (it lacks %.160s); "
                "refusing to render it as DeepSeek-V3's",
                where, lacks);
        if (lacks)
            return epd_err_set(err, -ENOTSUP,
                               "%s: DeepSeek-V3-like but with %zu output expressions instead of "
                               "DeepSeek-V3's; refusing to render it as DeepSeek-V3's",
                               where, n_exprs);
        *kind = EPD_TOK_CHAT_DEEPSEEK_V3;
        return 0;
    }
    if (!strstr(tmpl, "<|im_start|>") || !strstr(tmpl, "<|im_end|>"))
        return epd_err_set(
            err, -ENOTSUP,
            "%s: not recognised (neither ChatML's <|im_start|>/<|im_end|> markers nor "
            "DeepSeek's <｜User｜>; supported: Qwen3's ChatML "
            "template, DeepSeek-V3's template)",
            where);
    for (size_t i = 0; i < sizeof(qwen3_fragments) / sizeof(qwen3_fragments[0]); i++) {
        if (!strstr(tmpl, qwen3_fragments[i]))
            return epd_err_set(err, -ENOTSUP,
                               "%s: a ChatML template that is not Qwen3's (it lacks "
                               "%.120s); refusing to render it as Qwen3's",
                               where, qwen3_fragments[i]);
    }
    size_t n = tok_count(tmpl, "{{");
    if (n != QWEN3_OUTPUT_EXPRS)
        return epd_err_set(err, -ENOTSUP,
                           "%s: Qwen3-like but with %zu output expressions instead of "
                           "%d; refusing to render it as Qwen3's",
                           where, n, QWEN3_OUTPUT_EXPRS);
    *kind = EPD_TOK_CHAT_QWEN3;
    return 0;
}

/* ---- rendering ------------------------------------------------------------------------------ */

static span_t lstrip_nl(span_t s)
{
    while (s.n && s.p[0] == '\n') {
        s.p++;
        s.n--;
    }
    return s;
}

static span_t rstrip_nl(span_t s)
{
    while (s.n && s.p[s.n - 1] == '\n')
        s.n--;
    return s;
}

/* Python's s.split(sep)[-1] and s.split(sep)[0]. */
static span_t after_last(span_t s, const char *sep)
{
    size_t k = strlen(sep);
    for (size_t i = s.n >= k ? s.n - k + 1 : 0; i-- > 0;)
        if (memcmp(s.p + i, sep, k) == 0) return (span_t){s.p + i + k, s.n - i - k};
    return s;
}

static span_t before_first(span_t s, const char *sep)
{
    size_t k = strlen(sep);
    for (size_t i = 0; i + k <= s.n; i++)
        if (memcmp(s.p + i, sep, k) == 0) return (span_t){s.p, i};
    return s;
}

static bool has(span_t s, const char *needle)
{
    return before_first(s, needle).n != s.n;
}

static bool starts(span_t s, const char *pre)
{
    size_t k = strlen(pre);
    return s.n >= k && memcmp(s.p, pre, k) == 0;
}

static bool ends(span_t s, const char *suf)
{
    size_t k = strlen(suf);
    return s.n >= k && memcmp(s.p + s.n - k, suf, k) == 0;
}

void tok_chat_put(out_t *o, span_t s)
{
    if (!o->failed && tok_buf_append(&o->b, s.p, s.n) < 0) o->failed = true;
}

void tok_chat_put_user(out_t *o, span_t s)
{
    if (o->failed || s.n == 0) return;
    size_t off = o->b.len;
    tok_chat_put(o, s);
    if (o->failed) return;
    if (o->n_user && o->user[o->n_user - 1].off + o->user[o->n_user - 1].len == off) {
        o->user[o->n_user - 1].len += s.n; /* adjacent: one range */
        return;
    }
    if (o->n_user == o->cap_user) {
        size_t cap = o->cap_user ? o->cap_user * 2 : 16;
        tok_range_t *r = realloc(o->user, cap * sizeof(*r));
        if (!r) {
            o->failed = true;
            return;
        }
        o->user = r;
        o->cap_user = cap;
    }
    o->user[o->n_user++] = (tok_range_t){off, s.n};
}

static int check_messages(const epd_tok_chat_msg_t *msgs, size_t n, epd_err_t *err)
{
    static const char *const roles[] = {"system", "user", "assistant", "tool"};
    if (n == 0)
        return epd_err_set(err, -EINVAL,
                           "messages: empty (the template needs at least one message)");
    for (size_t i = 0; i < n; i++) {
        const epd_tok_chat_msg_t *m = &msgs[i];
        if (!m->role) return epd_err_set(err, -EINVAL, "messages[%zu].role: missing", i);
        bool known = false;
        for (size_t r = 0; r < 4; r++)
            known |= tok_chat_role_is(m, roles[r]);
        if (!known)
            return epd_err_set(err, -EINVAL,
                               "messages[%zu].role: unsupported \"%.40s\" (supported: \"system\", "
                               "\"user\", \"assistant\", \"tool\")",
                               i, m->role);
        /* null content: an assistant message that only calls tools (OpenAI's form) */
        if (!m->content && !(tok_chat_role_is(m, "assistant") && m->n_tool_calls))
            return epd_err_set(err, -EINVAL,
                               "messages[%zu].content: null is not supported (the template needs a "
                               "string; pass \"\"), except in an assistant message with tool calls",
                               i);
        if (m->n_tool_calls && !m->tool_calls)
            return epd_err_set(err, -EINVAL, "messages[%zu].tool_calls: NULL with %zu calls", i,
                               m->n_tool_calls);
        for (size_t k = 0; k < m->n_tool_calls; k++) {
            if (!m->tool_calls[k].name || !m->tool_calls[k].arguments)
                return epd_err_set(err, -EINVAL,
                                   "messages[%zu].tool_calls[%zu]: name and arguments are required",
                                   i, k);
        }
    }
    return 0;
}

static void render_assistant(out_t *o, const epd_tok_chat_msg_t *m, size_t i, size_t n,
                             size_t last_query)
{
    span_t content = sp_n(m->content, m->content_len);
    span_t reasoning = sp("");
    if (m->reasoning_content) {
        reasoning = sp_n(m->reasoning_content, m->reasoning_content_len);
    } else if (has(content, "</think>")) {
        reasoning = lstrip_nl(after_last(rstrip_nl(before_first(content, "</think>")), "<think>"));
        content = lstrip_nl(after_last(content, "</think>"));
    }
    tok_chat_puts(o, "<|im_start|>");
    tok_chat_puts(o, m->role);
    if (i > last_query && (i == n - 1 || reasoning.n)) {
        tok_chat_puts(o, "\n<think>\n");
        tok_chat_put_user(o, lstrip_nl(rstrip_nl(reasoning)));
        tok_chat_puts(o, "\n</think>\n\n");
        tok_chat_put_user(o, lstrip_nl(content));
    } else {
        tok_chat_puts(o, "\n");
        tok_chat_put_user(o, content);
    }
    for (size_t k = 0; k < m->n_tool_calls; k++) {
        if ((k == 0 && content.n) || k > 0) tok_chat_puts(o, "\n");
        tok_chat_puts(o, "<tool_call>\n{\"name\": \"");
        tok_chat_put_user(o, sp(m->tool_calls[k].name));
        tok_chat_puts(o, "\", \"arguments\": ");
        tok_chat_put_user(o, sp(m->tool_calls[k].arguments));
        tok_chat_puts(o, "}\n</tool_call>");
    }
    tok_chat_puts(o, "<|im_end|>\n");
}

static int render_qwen3(const epd_tok_chat_msg_t *msgs, size_t n, const epd_tok_chat_opts_t *opts,
                        out_t *o)
{
    if (tok_chat_role_is(&msgs[0], "system")) {
        tok_chat_puts(o, "<|im_start|>system\n");
        tok_chat_put_user(o, sp_n(msgs[0].content, msgs[0].content_len));
        tok_chat_puts(o, "<|im_end|>\n");
    }
    /* The last user message that is not a wrapped tool response; thinking is shown only for
     * assistant turns after it. Without one, the last message's index. */
    size_t last_query = n - 1;
    for (size_t k = n; k-- > 0;) {
        span_t c = sp_n(msgs[k].content, msgs[k].content_len);
        if (tok_chat_role_is(&msgs[k], "user") &&
            !(starts(c, "<tool_response>") && ends(c, "</tool_response>"))) {
            last_query = k;
            break;
        }
    }
    for (size_t i = 0; i < n; i++) {
        const epd_tok_chat_msg_t *m = &msgs[i];
        if (tok_chat_role_is(m, "user") || (tok_chat_role_is(m, "system") && i > 0)) {
            tok_chat_puts(o, "<|im_start|>");
            tok_chat_puts(o, m->role);
            tok_chat_puts(o, "\n");
            tok_chat_put_user(o, sp_n(m->content, m->content_len));
            tok_chat_puts(o, "<|im_end|>\n");
        } else if (tok_chat_role_is(m, "assistant")) {
            render_assistant(o, m, i, n, last_query);
        } else if (tok_chat_role_is(m, "tool")) {
            if (i == 0 || !tok_chat_role_is(&msgs[i - 1], "tool"))
                tok_chat_puts(o, "<|im_start|>user");
            tok_chat_puts(o, "\n<tool_response>\n");
            tok_chat_put_user(o, sp_n(m->content, m->content_len));
            tok_chat_puts(o, "\n</tool_response>");
            if (i == n - 1 || !tok_chat_role_is(&msgs[i + 1], "tool"))
                tok_chat_puts(o, "<|im_end|>\n");
        }
    }
    if (opts && opts->add_generation_prompt) {
        tok_chat_puts(o, "<|im_start|>assistant\n");
        if (opts->disable_thinking) tok_chat_puts(o, "<think>\n\n</think>\n\n");
    }
    return 0;
}

static int render(const epd_tok_t *tok, const epd_tok_chat_msg_t *msgs, size_t n_msgs,
                  const epd_tok_chat_opts_t *opts, out_t *o, epd_err_t *err)
{
    if (tok->chat == EPD_TOK_CHAT_NONE)
        return epd_err_set(err, -ENOTSUP,
                           "the checkpoint has no chat template (neither chat_template.jinja nor a "
                           "chat_template in tokenizer_config.json)");
    int st = check_messages(msgs, n_msgs, err);
    if (st) return st;
    if (tok->chat == EPD_TOK_CHAT_DEEPSEEK_V3)
        tok_chat_render_deepseek_v3(tok->bos_text, msgs, n_msgs, opts, o);
    else
        render_qwen3(msgs, n_msgs, opts, o);
    if (!o->failed && tok_buf_append(&o->b, "", 1) < 0) o->failed = true;
    if (o->failed) {
        tok_buf_fini(&o->b);
        free(o->user);
        return epd_err_set(err, -ENOMEM, "chat template: out of memory");
    }
    o->b.len--; /* the NUL stays after the text */
    return 0;
}

int epd_tok_chat_render(const epd_tok_t *tok, const epd_tok_chat_msg_t *msgs, size_t n_msgs,
                        const epd_tok_chat_opts_t *opts, char **out, size_t *out_len,
                        epd_err_t *err)
{
    *out = NULL;
    *out_len = 0;
    out_t o = {0};
    int st = render(tok, msgs, n_msgs, opts, &o, err);
    if (st) return st;
    free(o.user);
    *out = (char *)o.b.p;
    *out_len = o.b.len;
    return 0;
}

int epd_tok_chat_encode(const epd_tok_t *tok, const epd_tok_chat_msg_t *msgs, size_t n_msgs,
                        const epd_tok_chat_opts_t *opts, unsigned flags, epd_tok_ids_t *ids,
                        epd_err_t *err)
{
    out_t o = {0};
    int st = render(tok, msgs, n_msgs, opts, &o, err);
    if (st) return st;
    if (flags & EPD_TOK_ENCODE_SPLIT_SPECIAL)
        st = tok_encode_masked(
            tok, (const char *)o.b.p, o.b.len,
            (flags & ~(unsigned)EPD_TOK_ENCODE_SPLIT_SPECIAL) |
                (tok->chat == EPD_TOK_CHAT_DEEPSEEK_V3 ? TOK_ENCODE_MASK_ADDED : 0),
            o.user, o.n_user, ids, err);
    else
        st = epd_tok_encode(tok, (const char *)o.b.p, o.b.len, flags, ids, err);
    tok_buf_fini(&o.b);
    free(o.user);
    return st;
}
