/* BPE of one pre-token: start from one symbol per byte and repeatedly apply the lowest-ranked
 * merge (leftmost on ties), with a word cache in front. */
#include "tok_internal.h"

#include <stdlib.h>
#include <string.h>

/* Words up to this many bytes merge in a flat array (a linear scan for the best pair beats a
 * heap on short words); longer words use a heap over a linked list. */
#define TOK_BPE_FLAT_MAX 48

static int bpe_flat(const epd_tok_t *tok, const uint8_t *w, size_t n, epd_tok_ids_t *out)
{
    int32_t sym[TOK_BPE_FLAT_MAX];
    uint32_t rank[TOK_BPE_FLAT_MAX]; /* rank[i]: merge rank of (sym[i], sym[i+1]) */
    int32_t merged[TOK_BPE_FLAT_MAX];
    for (size_t i = 0; i < n; i++)
        sym[i] = tok->byte_id[w[i]];
    for (size_t i = 0; i + 1 < n; i++) {
        const tok_pair_slot_t *s = tok_pairmap_get(&tok->merges, sym[i], sym[i + 1]);
        rank[i] = s ? s->rank : UINT32_MAX;
        merged[i] = s ? s->merged : -1;
    }
    while (n > 1) {
        size_t best = 0;
        for (size_t i = 1; i + 1 < n; i++)
            if (rank[i] < rank[best]) best = i;
        if (rank[best] == UINT32_MAX) break;
        sym[best] = merged[best];
        memmove(&sym[best + 1], &sym[best + 2], (n - best - 2) * sizeof(sym[0]));
        memmove(&rank[best], &rank[best + 1], (n - best - 2) * sizeof(rank[0]));
        memmove(&merged[best], &merged[best + 1], (n - best - 2) * sizeof(merged[0]));
        n--;
        for (size_t i = best ? best - 1 : 0; i <= best && i + 1 < n; i++) {
            const tok_pair_slot_t *s = tok_pairmap_get(&tok->merges, sym[i], sym[i + 1]);
            rank[i] = s ? s->rank : UINT32_MAX;
            merged[i] = s ? s->merged : -1;
        }
    }
    for (size_t i = 0; i < n; i++)
        if (tok_ids_push(out, sym[i]) < 0) return -ENOMEM;
    return 0;
}

/* Heap entry: ordered by (rank, position) so equal ranks merge left to right. */
typedef struct bpe_cand {
    uint64_t key; /* rank << 32 | pos */
    int32_t left, right;
} bpe_cand_t;

static void heap_push(bpe_cand_t *h, size_t *n, bpe_cand_t c)
{
    size_t i = (*n)++;
    while (i > 0) {
        size_t parent = (i - 1) / 2;
        if (h[parent].key <= c.key) break;
        h[i] = h[parent];
        i = parent;
    }
    h[i] = c;
}

static bpe_cand_t heap_pop(bpe_cand_t *h, size_t *n)
{
    bpe_cand_t top = h[0], last = h[--(*n)];
    size_t i = 0;
    for (;;) {
        size_t l = 2 * i + 1, m = i;
        if (l >= *n) break;
        m = (l + 1 < *n && h[l + 1].key < h[l].key) ? l + 1 : l;
        if (last.key <= h[m].key) break;
        h[i] = h[m];
        i = m;
    }
    if (*n) h[i] = last;
    return top;
}

static int bpe_heap(const epd_tok_t *tok, const uint8_t *w, size_t n, epd_tok_ids_t *out)
{
    /* sym/prev/next: [n] linked symbols, indexed by the position of their first byte */
    int32_t *sym = malloc(n * sizeof(*sym));
    int32_t *prev = malloc(n * sizeof(*prev));
    int32_t *next = malloc(n * sizeof(*next));
    /* each merge pushes at most two candidates, the initial pass n - 1 */
    bpe_cand_t *heap = malloc(3 * n * sizeof(*heap));
    size_t hn = 0;
    int st = -ENOMEM;
    if (!sym || !prev || !next || !heap) goto out;
    for (size_t i = 0; i < n; i++) {
        sym[i] = tok->byte_id[w[i]];
        prev[i] = (int32_t)i - 1;
        next[i] = i + 1 < n ? (int32_t)i + 1 : -1;
    }
    for (size_t i = 0; i + 1 < n; i++) {
        const tok_pair_slot_t *s = tok_pairmap_get(&tok->merges, sym[i], sym[i + 1]);
        if (s) heap_push(heap, &hn, (bpe_cand_t){(uint64_t)s->rank << 32 | i, sym[i], sym[i + 1]});
    }
    while (hn) {
        bpe_cand_t c = heap_pop(heap, &hn);
        int32_t pos = (int32_t)(uint32_t)c.key;
        int32_t nx = next[pos];
        /* stale: the symbol was absorbed (sym -1) or one side has changed since the push */
        if (sym[pos] != c.left || nx < 0 || sym[nx] != c.right) continue;
        const tok_pair_slot_t *s = tok_pairmap_get(&tok->merges, c.left, c.right);
        sym[pos] = s->merged;
        sym[nx] = -1;
        next[pos] = next[nx];
        if (next[pos] >= 0) prev[next[pos]] = pos;
        if (prev[pos] >= 0) {
            int32_t pv = prev[pos];
            const tok_pair_slot_t *t = tok_pairmap_get(&tok->merges, sym[pv], sym[pos]);
            if (t)
                heap_push(heap, &hn,
                          (bpe_cand_t){(uint64_t)t->rank << 32 | (uint32_t)pv, sym[pv], sym[pos]});
        }
        if (next[pos] >= 0) {
            int32_t nn = next[pos];
            const tok_pair_slot_t *t = tok_pairmap_get(&tok->merges, sym[pos], sym[nn]);
            if (t)
                heap_push(heap, &hn,
                          (bpe_cand_t){(uint64_t)t->rank << 32 | (uint32_t)pos, sym[pos], sym[nn]});
        }
    }
    st = 0;
    for (int32_t i = 0; i >= 0; i = next[i]) {
        if (tok_ids_push(out, sym[i]) < 0) {
            st = -ENOMEM;
            break;
        }
    }
out:
    free(heap);
    free(next);
    free(prev);
    free(sym);
    return st;
}

static int bpe_uncached(const epd_tok_t *tok, const uint8_t *w, size_t n, epd_tok_ids_t *out)
{
    if (tok->ignore_merges) {
        int32_t id = tok_strmap_get(&tok->vocab, &tok->pool, w, n);
        if (id >= 0) return tok_ids_push(out, id) < 0 ? -ENOMEM : 0;
    }
    if (n == 1) return tok_ids_push(out, tok->byte_id[w[0]]) < 0 ? -ENOMEM : 0;
    if (n <= TOK_BPE_FLAT_MAX) return bpe_flat(tok, w, n, out);
    return bpe_heap(tok, w, n, out);
}

void tok_cache_clear(epd_tok_t *tok)
{
    if (!tok->cache) return;
    for (size_t i = 0; i < TOK_CACHE_SLOTS; i++) {
        free(tok->cache[i].blob);
        tok->cache[i] = (tok_cache_entry_t){0};
    }
}

static size_t blob_ids_off(size_t klen)
{
    return (klen + 3) & ~(size_t)3;
}

int tok_bpe_word(const epd_tok_t *ctok, const uint8_t *w, size_t n, epd_tok_ids_t *out)
{
    if (n == 0) return 0;
    if (n == 1) return tok_ids_push(out, ctok->byte_id[w[0]]) < 0 ? -ENOMEM : 0;
    if (n > TOK_CACHE_MAX_WORD || !ctok->cache) return bpe_uncached(ctok, w, n, out);

    /* The cache is the only mutable state of a loaded tokenizer; it is behind cache_mu. */
    epd_tok_t *tok = (epd_tok_t *)ctok;
    uint32_t h = tok_hash_bytes(w, n);
    tok_cache_entry_t *e = &tok->cache[h & (TOK_CACHE_SLOTS - 1)];
    pthread_mutex_lock(&tok->cache_mu);
    if (e->blob && e->hash == h && e->klen == n && memcmp(e->blob, w, n) == 0) {
        const int32_t *ids = (const int32_t *)(e->blob + blob_ids_off(n));
        int st = 0;
        for (uint32_t i = 0; i < e->nids && !st; i++)
            if (tok_ids_push(out, ids[i]) < 0) st = -ENOMEM;
        pthread_mutex_unlock(&tok->cache_mu);
        return st;
    }
    pthread_mutex_unlock(&tok->cache_mu);

    size_t before = out->len;
    int st = bpe_uncached(tok, w, n, out);
    if (st) return st;
    size_t nids = out->len - before;
    size_t off = blob_ids_off(n);
    uint8_t *blob = malloc(off + nids * sizeof(int32_t));
    if (!blob) return 0; /* the cache is an optimisation; the ids are already out */
    memcpy(blob, w, n);
    memcpy(blob + off, out->ids + before, nids * sizeof(int32_t));
    pthread_mutex_lock(&tok->cache_mu);
    free(e->blob);
    *e = (tok_cache_entry_t){.hash = h, .klen = (uint32_t)n, .nids = (uint32_t)nids, .blob = blob};
    pthread_mutex_unlock(&tok->cache_mu);
    return 0;
}
