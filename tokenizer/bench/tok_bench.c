/* tok-bench: single-thread encoding throughput (MB/s) of epd_tokenizer on a large mixed corpus
 * built from a JSON list of texts; can write that corpus out so other tokenizers run on the
 * very same documents. */
#include "epd_tok.h"

#include <cjson/cJSON.h>
#include <stdint.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static uint64_t rng_next(uint64_t *s)
{
    /* splitmix64: a fixed seed gives the same corpus on every run */
    uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

typedef struct docs {
    char **text;
    size_t *len;
    size_t n, cap;
    size_t bytes;
} docs_t;

static int docs_push(docs_t *d, char *t, size_t len)
{
    if (d->n == d->cap) {
        size_t cap = d->cap ? d->cap * 2 : 1024;
        char **nt = realloc(d->text, cap * sizeof(*nt));
        if (!nt) return -1;
        d->text = nt;
        size_t *nl = realloc(d->len, cap * sizeof(*nl));
        if (!nl) return -1;
        d->len = nl;
        d->cap = cap;
    }
    d->text[d->n] = t;
    d->len[d->n++] = len;
    d->bytes += len;
    return 0;
}

static char *read_all(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    char *buf = NULL;
    if (fseek(f, 0, SEEK_END) == 0) {
        long n = ftell(f);
        if (n >= 0 && fseek(f, 0, SEEK_SET) == 0 && (buf = malloc((size_t)n + 1))) {
            if (fread(buf, 1, (size_t)n, f) == (size_t)n) {
                buf[n] = 0;
                *len = (size_t)n;
            } else {
                free(buf);
                buf = NULL;
            }
        }
    }
    fclose(f);
    return buf;
}

/* Documents of 1..8 corpus texts joined by a separator, with now and then a fresh number so that
 * not every word is a cache hit, until target bytes. */
static int build_docs(cJSON *corpus, size_t target, docs_t *d)
{
    size_t n = (size_t)cJSON_GetArraySize(corpus);
    static const char *const seps[] = {" ", "\n", ". ", "\n\n", "\t", ", "};
    uint64_t rng = 12345;
    char num[32];
    while (d->bytes < target) {
        size_t parts = 1 + rng_next(&rng) % 8, len = 0, cap = 256;
        char *t = malloc(cap);
        if (!t) return -1;
        for (size_t k = 0; k < parts; k++) {
            const char *s = cJSON_GetArrayItem(corpus, (int)(rng_next(&rng) % n))->valuestring;
            const char *sep = k ? seps[rng_next(&rng) % 6] : "";
            int nn = 0;
            if (rng_next(&rng) % 4 == 0)
                nn = snprintf(num, sizeof(num), " %llu ",
                              (unsigned long long)(rng_next(&rng) % 1000003));
            size_t need = strlen(s) + strlen(sep) + (size_t)nn + 1;
            if (len + need > cap) {
                while (len + need > cap)
                    cap *= 2;
                char *nt = realloc(t, cap);
                if (!nt) {
                    free(t);
                    return -1;
                }
                t = nt;
            }
            len += (size_t)sprintf(t + len, "%s%s%s", sep, nn ? num : "", s);
        }
        if (docs_push(d, t, len) < 0) {
            free(t);
            return -1;
        }
    }
    return 0;
}

static int usage(const char *argv0)
{
    fprintf(stderr,
            "usage: %s --model DIR --corpus texts.json [--mb N] [--passes N] "
            "[--write-docs out.json]\n"
            "  Encodes a corpus of about N MB (default 10) built from texts.json, one document\n"
            "  at a time, on one thread; prints MB/s for the first (cold cache) pass and the\n"
            "  best of the passes (default 3).\n",
            argv0);
    return 2;
}

int main(int argc, char **argv)
{
    const char *model = NULL, *corpus_path = NULL, *write_docs = NULL;
    double mb = 10;
    int passes = 3;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--model") && i + 1 < argc)
            model = argv[++i];
        else if (!strcmp(argv[i], "--corpus") && i + 1 < argc)
            corpus_path = argv[++i];
        else if (!strcmp(argv[i], "--mb") && i + 1 < argc)
            mb = atof(argv[++i]);
        else if (!strcmp(argv[i], "--passes") && i + 1 < argc)
            passes = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--write-docs") && i + 1 < argc)
            write_docs = argv[++i];
        else
            return usage(argv[0]);
    }
    if (!model || !corpus_path || mb <= 0 || passes < 1) return usage(argv[0]);

    int rc = 1;
    epd_err_t err = {0};
    epd_tok_t *tok = NULL;
    cJSON *corpus = NULL;
    docs_t d = {0};
    epd_tok_ids_t ids = {0};
    size_t clen = 0;
    char *ctext = read_all(corpus_path, &clen);
    if (!ctext) {
        fprintf(stderr, "tok-bench: %s: cannot read\n", corpus_path);
        goto out;
    }
    corpus = cJSON_Parse(ctext);
    free(ctext);
    if (!cJSON_IsArray(corpus) || cJSON_GetArraySize(corpus) == 0) {
        fprintf(stderr, "tok-bench: %s: expected a non-empty JSON array of strings\n", corpus_path);
        goto out;
    }
    const cJSON *it;
    cJSON_ArrayForEach(it, corpus)
    {
        if (!cJSON_IsString(it)) {
            fprintf(stderr, "tok-bench: %s: every element must be a string\n", corpus_path);
            goto out;
        }
    }
    if (build_docs(corpus, (size_t)(mb * 1e6), &d) < 0) {
        fprintf(stderr, "tok-bench: out of memory building the corpus\n");
        goto out;
    }
    if (write_docs) {
        FILE *f = fopen(write_docs, "wb");
        cJSON *arr = cJSON_CreateArray();
        for (size_t i = 0; arr && i < d.n; i++)
            cJSON_AddItemToArray(arr, cJSON_CreateString(d.text[i]));
        char *s = arr ? cJSON_PrintUnformatted(arr) : NULL;
        if (!f || !s || fputs(s, f) < 0) {
            fprintf(stderr, "tok-bench: %s: cannot write\n", write_docs);
            if (f) fclose(f);
            free(s);
            cJSON_Delete(arr);
            goto out;
        }
        fclose(f);
        free(s);
        cJSON_Delete(arr);
    }

    double t0 = now_s();
    if (epd_tok_load_dir(model, &tok, &err) != 0) {
        fprintf(stderr, "tok-bench: %s\n", err.msg);
        goto out;
    }
    double load_s = now_s() - t0;
    double best = 1e30, first = 0;
    size_t total_ids = 0;
    uint32_t sum = 0; /* the same checksum as tok_bench_ref.js, to check both agree */
    for (int p = 0; p < passes; p++) {
        total_ids = 0;
        sum = 0;
        double t = now_s();
        for (size_t i = 0; i < d.n; i++) {
            ids.len = 0;
            if (epd_tok_encode(tok, d.text[i], d.len[i], 0, &ids, &err) != 0) {
                fprintf(stderr, "tok-bench: document %zu: %s\n", i, err.msg);
                goto out;
            }
            total_ids += ids.len;
            for (size_t k = 0; k < ids.len; k++)
                sum = sum * 31u + (uint32_t)ids.ids[k];
        }
        t = now_s() - t;
        if (p == 0) first = t;
        if (t < best) best = t;
    }
    printf("tok-bench: %zu documents, %.2f MB, %zu ids, checksum %u; load %.3f s\n", d.n,
           (double)d.bytes / 1e6, total_ids, sum, load_s);
    printf("tok-bench: encode first pass %.2f MB/s (%.3f s), best of %d %.2f MB/s (%.3f s)\n",
           (double)d.bytes / 1e6 / first, first, passes, (double)d.bytes / 1e6 / best, best);
    rc = 0;
out:
    epd_tok_ids_fini(&ids);
    epd_tok_destroy(tok);
    for (size_t i = 0; i < d.n; i++)
        free(d.text[i]);
    free(d.text);
    free(d.len);
    cJSON_Delete(corpus);
    return rc;
}
