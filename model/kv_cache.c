/* Per-sequence KV cache: fp32 keys and values of every layer, grown on demand. */
#include "model_internal.h"

#include <errno.h>
#include <stdlib.h>

/* First allocation, in positions: small enough for many idle sequences. */
#define EPD_SEQ_MIN_CAP 64

int epd_seq_create(const epd_model_t *m, epd_seq_t **out, epd_err_t *err)
{
    *out = NULL;
    epd_seq_t *s = calloc(1, sizeof(*s));
    int L = m->cfg.num_hidden_layers;
    if (!s || !(s->k = calloc((size_t)L, sizeof(float *))) ||
        !(s->v = calloc((size_t)L, sizeof(float *)))) {
        if (s) free(s->k);
        free(s);
        return epd_err_set(err, -ENOMEM, "sequence: out of memory");
    }
    s->m = m;
    *out = s;
    return 0;
}

void epd_seq_destroy(epd_seq_t *s)
{
    if (!s) return;
    for (int l = 0; l < s->m->cfg.num_hidden_layers; l++) {
        free(s->k[l]);
        free(s->v[l]);
    }
    free(s->k);
    free(s->v);
    free(s);
}

int epd_seq_len(const epd_seq_t *s)
{
    return s->len;
}

void epd_seq_truncate(epd_seq_t *s, int len)
{
    if (len >= 0 && len < s->len) s->len = len;
}

size_t epd_seq_bytes(const epd_seq_t *s)
{
    const epd_hf_config_t *c = &s->m->cfg;
    return (size_t)s->cap * 2 * (size_t)c->num_hidden_layers * (size_t)c->num_key_value_heads *
           (size_t)c->head_dim * sizeof(float);
}

int epd_seq_reserve(epd_seq_t *s, int need, epd_err_t *err)
{
    const epd_model_t *m = s->m;
    if (need > m->max_seq_len)
        return epd_err_set(err, -ERANGE,
                           "sequence of %d tokens exceeds max_seq_len %d (the KV cache bound)",
                           need, m->max_seq_len);
    if (need <= s->cap) return 0;
    int cap = s->cap ? s->cap : EPD_SEQ_MIN_CAP;
    while (cap < need)
        cap = cap > m->max_seq_len / 2 ? m->max_seq_len : cap * 2;
    if (cap > m->max_seq_len) cap = m->max_seq_len;
    size_t row = (size_t)m->cfg.num_key_value_heads * (size_t)m->cfg.head_dim;
    for (int l = 0; l < m->cfg.num_hidden_layers; l++) {
        float *k = realloc(s->k[l], sizeof(float) * row * (size_t)cap);
        if (!k) return epd_err_set(err, -ENOMEM, "KV cache: out of memory for %d positions", cap);
        s->k[l] = k;
        float *v = realloc(s->v[l], sizeof(float) * row * (size_t)cap);
        if (!v) return epd_err_set(err, -ENOMEM, "KV cache: out of memory for %d positions", cap);
        s->v[l] = v;
    }
    s->cap = cap;
    return 0;
}
