/* Decoding: ids -> bytes through the inverse byte map, ill-formed UTF-8 -> U+FFFD, and the
 * streaming decoder that holds back unfinished characters. */
#include "tok_internal.h"

#include <stdlib.h>
#include <string.h>

const uint8_t *epd_tok_id_bytes(const epd_tok_t *tok, int32_t id, size_t *len)
{
    if (!tok || id < 0 || (size_t)id >= tok->n_ids || !(tok->id_flags[id] & TOK_ID_PRESENT))
        return NULL;
    *len = tok->id_len[id];
    return tok->pool.p + tok->id_off[id];
}

int epd_tok_decode(const epd_tok_t *tok, const int32_t *ids, size_t n, unsigned flags, char **out,
                   size_t *out_len, epd_err_t *err)
{
    tok_buf_t raw = {0}, txt = {0};
    int st = -ENOMEM;
    *out = NULL;
    for (size_t i = 0; i < n; i++) {
        size_t len;
        const uint8_t *b = epd_tok_id_bytes(tok, ids[i], &len);
        if (!b) {
            st = epd_err_set(err, -EINVAL, "ids[%zu]: id %d is not in the vocabulary (size %zu)", i,
                             ids[i], tok->n_ids);
            goto fail;
        }
        if ((flags & EPD_TOK_DECODE_SKIP_SPECIAL) && (tok->id_flags[ids[i]] & TOK_ID_SPECIAL))
            continue;
        if (tok_buf_append(&raw, b, len) < 0) goto fail_nomem;
    }
    if (tok_utf8_lossy(raw.p, raw.len, true, &txt) < 0 || tok_buf_append(&txt, "", 1) < 0)
        goto fail_nomem;
    tok_buf_fini(&raw);
    *out = (char *)txt.p;
    *out_len = txt.len - 1;
    return 0;
fail_nomem:
    st = epd_err_set(err, -ENOMEM, "epd_tok_decode: out of memory");
fail:
    tok_buf_fini(&txt);
    tok_buf_fini(&raw);
    return st;
}

struct epd_tok_stream {
    const epd_tok_t *tok;
    unsigned flags;
    uint8_t held[8]; /* an unfinished UTF-8 sequence (at most 3 bytes) */
    size_t n_held;
    tok_buf_t in;  /* held bytes + the new token's bytes */
    tok_buf_t out; /* text handed to the caller */
};

int epd_tok_stream_create(const epd_tok_t *tok, unsigned decode_flags, epd_tok_stream_t **out)
{
    epd_tok_stream_t *s = calloc(1, sizeof(*s));
    if (!s) return -ENOMEM;
    s->tok = tok;
    s->flags = decode_flags;
    *out = s;
    return 0;
}

void epd_tok_stream_destroy(epd_tok_stream_t *s)
{
    if (!s) return;
    tok_buf_fini(&s->in);
    tok_buf_fini(&s->out);
    free(s);
}

int epd_tok_stream_push(epd_tok_stream_t *s, int32_t id, const char **text, size_t *text_len,
                        epd_err_t *err)
{
    size_t len;
    const uint8_t *b = epd_tok_id_bytes(s->tok, id, &len);
    *text = "";
    *text_len = 0;
    if (!b)
        return epd_err_set(err, -EINVAL, "id %d is not in the vocabulary (size %zu)", id,
                           s->tok->n_ids);
    if ((s->flags & EPD_TOK_DECODE_SKIP_SPECIAL) && (s->tok->id_flags[id] & TOK_ID_SPECIAL))
        return 0;
    s->in.len = 0;
    s->out.len = 0;
    if (tok_buf_append(&s->in, s->held, s->n_held) < 0 || tok_buf_append(&s->in, b, len) < 0)
        return epd_err_set(err, -ENOMEM, "stream decoder: out of memory");
    ptrdiff_t used = tok_utf8_lossy(s->in.p, s->in.len, false, &s->out);
    if (used < 0) return epd_err_set(err, -ENOMEM, "stream decoder: out of memory");
    s->n_held = s->in.len - (size_t)used;
    memcpy(s->held, s->in.p + used, s->n_held);
    *text = s->out.p ? (const char *)s->out.p : "";
    *text_len = s->out.len;
    return 0;
}

int epd_tok_stream_flush(epd_tok_stream_t *s, const char **text, size_t *text_len)
{
    s->out.len = 0;
    *text = "";
    *text_len = 0;
    if (tok_utf8_lossy(s->held, s->n_held, true, &s->out) < 0) return -ENOMEM;
    s->n_held = 0;
    *text = s->out.p ? (const char *)s->out.p : "";
    *text_len = s->out.len;
    return 0;
}
