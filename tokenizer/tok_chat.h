/* What the chat renderers share (tok_chat.c, tok_chat_deepseek.c): spans of text and the
 * output buffer that records where message text lies. */
#ifndef EPD_TOK_CHAT_H
#define EPD_TOK_CHAT_H

#include "tok_internal.h"

#include <string.h>

typedef struct span {
    const char *p;
    size_t n;
} span_t;

static inline span_t sp(const char *s)
{
    return (span_t){s, strlen(s)};
}

/* s[0..n), or up to its NUL when n is 0 (epd_tok_chat_msg_t's lengths); "" for NULL */
static inline span_t sp_n(const char *s, size_t n)
{
    return !s ? (span_t){"", 0} : n ? (span_t){s, n} : sp(s);
}

typedef struct out {
    tok_buf_t b;
    bool failed;
    /* where the messages' own text lies in b (content, reasoning, tool-call names and
     * arguments): sorted, disjoint, [n_user] of cap_user */
    tok_range_t *user;
    size_t n_user, cap_user;
} out_t;

/* Template text: the template's own markers. */
void tok_chat_put(out_t *o, span_t s);
/* Text a message supplied; its range is recorded so that encoding can keep special-token
 * spellings in it from becoming control tokens. */
void tok_chat_put_user(out_t *o, span_t s);

static inline void tok_chat_puts(out_t *o, const char *s)
{
    tok_chat_put(o, sp(s));
}

static inline bool tok_chat_role_is(const epd_tok_chat_msg_t *m, const char *r)
{
    return strcmp(m->role, r) == 0;
}

/* How many times needle occurs in s. */
size_t tok_count(const char *s, const char *needle);

/* DeepSeek-V3's template (tok_chat_deepseek.c): NULL when tmpl is it, else the fragment it lacks
 * ("" when it has them all but a different number of output expressions, *n_exprs), and the
 * rendering. bos: bos_token's content ({{ bos_token }}), NULL for none. */
const char *tok_chat_deepseek_v3_mismatch(const char *tmpl, size_t *n_exprs);
void tok_chat_render_deepseek_v3(const char *bos, const epd_tok_chat_msg_t *msgs, size_t n,
                                 const epd_tok_chat_opts_t *opts, out_t *o);

#endif /* EPD_TOK_CHAT_H */
