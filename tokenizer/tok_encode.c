/* Encoding: added tokens matched whole (raw text first, then normalized text), NFC, the
 * pre-tokenizer's Split regex run by PCRE2, then BPE of every piece. */
#include "tok_internal.h"

#include <string.h>

typedef struct enc {
    const epd_tok_t *tok;
    unsigned flags;
    epd_tok_ids_t *out;
    pcre2_match_data *md[TOK_MAX_SPLITS]; /* one per Split regex */
    tok_buf_t norm;                       /* NFC output of the current segment */
    const tok_range_t *plain;             /* [n_plain] sorted: no special token may overlap these */
    size_t n_plain;
    epd_err_t *err;
} enc_t;

/* Pre-tokenizes p[0..n) with Split regex `level` (Isolated: matches and the gaps between them
 * are both pieces), hands every piece to the next regex, and runs BPE on the pieces of the last
 * one (HF's Sequence pre-tokenizer: each Split splits the pieces of the one before). */
static int split_level(enc_t *e, const uint8_t *p, size_t n, size_t base_off, size_t level)
{
    const epd_tok_t *tok = e->tok;
    if (level == tok->n_re) return tok_bpe_word(tok, p, n, e->out);
    size_t pos = 0, next = level + 1;
    int st;
    while (pos < n) {
        int rc = pcre2_match(tok->re[level], p, n, pos, PCRE2_NO_UTF_CHECK, e->md[level], NULL);
        if (rc == PCRE2_ERROR_NOMATCH) break;
        if (rc < 0) {
            PCRE2_UCHAR msg[256];
            pcre2_get_error_message(rc, msg, sizeof(msg));
            return epd_err_set(e->err, -EINVAL,
                               "pre-tokenizer regex %zu failed at byte offset %zu: %s", level,
                               base_off + pos, (const char *)msg);
        }
        PCRE2_SIZE *ov = pcre2_get_ovector_pointer(e->md[level]);
        size_t s = ov[0], end = ov[1];
        if (end == s) {
            /* An empty match splits nothing; step over one character so matching moves on. */
            uint32_t cp;
            end = s + tok_utf8_decode(p + s, &cp);
            if ((st = split_level(e, p + pos, end - pos, base_off + pos, next))) return st;
            pos = end;
            continue;
        }
        if (s > pos && (st = split_level(e, p + pos, s - pos, base_off + pos, next))) return st;
        if ((st = split_level(e, p + s, end - s, base_off + s, next))) return st;
        pos = end;
    }
    if (pos < n) return split_level(e, p + pos, n - pos, base_off + pos, next);
    return 0;
}

static int split_and_bpe(enc_t *e, const uint8_t *p, size_t n, size_t base_off)
{
    return split_level(e, p, n, base_off, 0);
}

/* Whether text bytes [off, off + len) overlap one of e->plain. */
static bool in_plain(const enc_t *e, size_t off, size_t len)
{
    size_t lo = 0, hi = e->n_plain;
    while (lo < hi) { /* the first range that ends after off */
        size_t mid = lo + (hi - lo) / 2;
        if (e->plain[mid].off + e->plain[mid].len <= off)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo < e->n_plain && e->plain[lo].off < off + len;
}

/* The longest added token of the given kind (bit 1: raw, 2: normalized) at p[0..n), or NULL.
 * off: p's byte offset in the caller's text. For the normalized kind under NFC, offsets into the
 * NFC copy do not map back, so with plain ranges a special normalized token matches only in a
 * segment that overlaps none of them (seg_plain false). */
static const tok_added_t *added_at(const enc_t *e, const uint8_t *p, size_t n, unsigned kind,
                                   size_t off, bool seg_plain)
{
    const epd_tok_t *tok = e->tok;
    for (size_t i = 0; i < tok->n_added; i++) {
        const tok_added_t *a = &tok->added[i];
        if ((a->normalized ? 2u : 1u) != kind) continue;
        if (a->special && (e->flags & EPD_TOK_ENCODE_SPLIT_SPECIAL)) continue;
        /* offsets into an NFC copy do not map back; without NFC they are the text's own */
        if ((a->special || (e->flags & TOK_ENCODE_MASK_ADDED)) && e->n_plain &&
            (kind == 2 && tok->nfc ? seg_plain : in_plain(e, off, a->len)))
            continue;
        if (a->len <= n && memcmp(tok->pool.p + a->off, p, a->len) == 0) return a;
    }
    return NULL;
}

/* Splits p[0..n) at added tokens of one kind (leftmost, then longest) and hands the text between
 * them to `then`. */
static int split_added(enc_t *e, const uint8_t *p, size_t n, size_t base_off, unsigned kind,
                       int (*then)(enc_t *, const uint8_t *, size_t, size_t))
{
    const epd_tok_t *tok = e->tok;
    size_t seg = 0;
    int st;
    bool seg_plain = kind == 2 && e->n_plain && in_plain(e, base_off, n);
    for (size_t i = 0; i < n;) {
        if (tok->added_first[p[i]] & kind) {
            const tok_added_t *a = added_at(e, p + i, n - i, kind, base_off + i, seg_plain);
            if (a) {
                if (i > seg && (st = then(e, p + seg, i - seg, base_off + seg))) return st;
                if (tok_ids_push(e->out, a->id) < 0) return -ENOMEM;
                i += a->len;
                seg = i;
                continue;
            }
        }
        i++;
    }
    if (n > seg) return then(e, p + seg, n - seg, base_off + seg);
    return 0;
}

static int normalized_segment(enc_t *e, const uint8_t *p, size_t n, size_t base_off)
{
    const epd_tok_t *tok = e->tok;
    if (tok->nfc) {
        int st = tok_nfc(tok, p, n, &e->norm, e->err);
        if (st) return st;
        /* e->norm is free to hold the copy: nothing below normalizes again. */
        if (e->norm.len) return split_added(e, e->norm.p, e->norm.len, base_off, 2, split_and_bpe);
    }
    return split_added(e, p, n, base_off, 2, split_and_bpe);
}

int epd_tok_encode(const epd_tok_t *tok, const char *text, size_t len, unsigned flags,
                   epd_tok_ids_t *out, epd_err_t *err)
{
    if (!(flags & EPD_TOK_ENCODE_ADD_SPECIAL))
        return tok_encode_masked(tok, text, len, flags, NULL, 0, out, err);
    if (!tok || !out) return epd_err_set(err, -EINVAL, "epd_tok_encode: NULL argument");
    size_t before = out->len;
    if (tok->add_bos && tok_ids_push(out, tok->bos) < 0) goto nomem;
    int st = tok_encode_masked(tok, text, len, flags, NULL, 0, out, err);
    if (st) {
        out->len = before;
        return st;
    }
    if (tok->add_eos && tok_ids_push(out, tok->cfg_eos) < 0) goto nomem;
    return 0;
nomem:
    out->len = before;
    return epd_err_set(err, -ENOMEM, "epd_tok_encode: out of memory");
}

int tok_encode_masked(const epd_tok_t *tok, const char *text, size_t len, unsigned flags,
                      const tok_range_t *plain, size_t n_plain, epd_tok_ids_t *out, epd_err_t *err)
{
    if (!tok || !out || (!text && len))
        return epd_err_set(err, -EINVAL, "epd_tok_encode: NULL argument");
    const uint8_t *p = (const uint8_t *)text;
    size_t bad = tok_utf8_validate(p, len);
    if (bad < len)
        return epd_err_set(err, -EINVAL,
                           "text is not valid UTF-8: ill-formed byte 0x%02x at byte offset %zu",
                           p[bad], bad);
    if (len == 0) return 0;
    enc_t e = {
        .tok = tok, .flags = flags, .out = out, .err = err, .plain = plain, .n_plain = n_plain};
    int st = 0;
    size_t before = out->len;
    for (size_t i = 0; i < tok->n_re && !st; i++) {
        e.md[i] = pcre2_match_data_create_from_pattern(tok->re[i], NULL);
        if (!e.md[i]) st = -ENOMEM;
    }
    if (!st) st = split_added(&e, p, len, 0, 1, normalized_segment);
    if (st == -ENOMEM) epd_err_set(err, st, "epd_tok_encode: out of memory");
    if (st) out->len = before;
    tok_buf_fini(&e.norm);
    for (size_t i = 0; i < tok->n_re; i++)
        pcre2_match_data_free(e.md[i]);
    return st;
}
