/* The metrics registry: families and their series, atomic updates, and rendering in the
 * Prometheus text exposition format 0.0.4. Creation and rendering take the registry lock;
 * updates are lock-free (doubles stored as bits in atomic 64-bit words). */
#include "metrics.h"

#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef enum { MT_COUNTER, MT_GAUGE, MT_HISTOGRAM } mtype_t;

enum { DROP_CAP, DROP_INVALID, DROP_CONFLICT, DROP_NREASONS };
static const char *const drop_reason[DROP_NREASONS] = {"cap", "invalid", "conflict"};

struct family;

struct epd_metric {
    struct family *fam;        /* NULL for the sink */
    char *labels;              /* label body without braces, "" for none */
    _Atomic uint64_t bits;     /* counters, gauges: the value; histograms: the sum */
    _Atomic uint64_t *buckets; /* histograms: [nbounds + 1] non-cumulative counts, last = +Inf */
    struct epd_metric *next;
};

struct family {
    char *name;
    char *help;
    mtype_t type;
    double *bounds;
    int nbounds;
    struct epd_metric *first, *last;
};

struct epd_metrics {
    pthread_mutex_t lock;
    struct family **fams;
    int nfams, capfams;
    int nseries, max_series;
    struct epd_metric sink;
    _Atomic uint64_t dropped[DROP_NREASONS];
};

static uint64_t d2b(double v)
{
    uint64_t b;
    memcpy(&b, &v, sizeof(b));
    return b;
}

static double b2d(uint64_t b)
{
    double v;
    memcpy(&v, &b, sizeof(v));
    return v;
}

epd_metrics_t *epd_metrics_create(void)
{
    epd_metrics_t *m = calloc(1, sizeof(*m));
    if (!m) return NULL;
    pthread_mutex_init(&m->lock, NULL);
    m->max_series = EPD_METRICS_DEFAULT_MAX_SERIES;
    m->sink.labels = "";
    return m;
}

static void family_free(struct family *f)
{
    struct epd_metric *s = f->first;
    while (s) {
        struct epd_metric *n = s->next;
        free(s->labels);
        free(s->buckets);
        free(s);
        s = n;
    }
    free(f->name);
    free(f->help);
    free(f->bounds);
    free(f);
}

void epd_metrics_destroy(epd_metrics_t *m)
{
    if (!m) return;
    for (int i = 0; i < m->nfams; i++)
        family_free(m->fams[i]);
    free(m->fams);
    pthread_mutex_destroy(&m->lock);
    free(m);
}

void epd_metrics_set_max_series(epd_metrics_t *m, int max_series)
{
    pthread_mutex_lock(&m->lock);
    m->max_series = max_series < 0 ? 0 : max_series;
    pthread_mutex_unlock(&m->lock);
}

static int valid_metric_name(const char *s)
{
    if (!s || !*s) return 0;
    for (const char *p = s; *p; p++) {
        int alpha = (*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || *p == '_' || *p == ':';
        int digit = *p >= '0' && *p <= '9';
        if (!alpha && !(digit && p != s)) return 0;
    }
    return 1;
}

/* Label body grammar: name="value"{,name="value"}[,] with name [a-zA-Z_][a-zA-Z0-9_]* and
 * value escapes \\ \" \n only. `forbid_le`: histograms own the le label. */
static int valid_label_body(const char *s, int forbid_le)
{
    const char *p = s;
    while (*p) {
        const char *name = p;
        if (!((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || *p == '_')) return 0;
        while ((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || *p == '_' ||
               (*p >= '0' && *p <= '9'))
            p++;
        if (forbid_le && p - name == 2 && name[0] == 'l' && name[1] == 'e') return 0;
        if (*p++ != '=') return 0;
        if (*p++ != '"') return 0;
        for (;;) {
            if (*p == '\0' || *p == '\n') return 0;
            if (*p == '"') break;
            if (*p == '\\') {
                p++;
                if (*p != '\\' && *p != '"' && *p != 'n') return 0;
            }
            p++;
        }
        p++; /* closing quote */
        if (*p == ',')
            p++;
        else if (*p != '\0')
            return 0;
    }
    return 1;
}

int epd_metrics_escape_label(const char *value, char *out, size_t cap)
{
    size_t n = 0;
    for (const char *p = value; *p; p++) {
        const char *rep = NULL;
        char one[2] = {*p, 0};
        if (*p == '\\')
            rep = "\\\\";
        else if (*p == '"')
            rep = "\\\"";
        else if (*p == '\n')
            rep = "\\n";
        else
            rep = one;
        size_t l = strlen(rep);
        if (n + l + 1 > cap) return -1;
        memcpy(out + n, rep, l);
        n += l;
    }
    if (n + 1 > cap) return -1;
    out[n] = '\0';
    return (int)n;
}

static epd_metric_t *drop(epd_metrics_t *m, int reason)
{
    atomic_fetch_add(&m->dropped[reason], 1);
    return &m->sink;
}

static epd_metric_t *get_series(epd_metrics_t *m, mtype_t type, const char *name, const char *help,
                                const char *labels, const double *bounds, int nbounds)
{
    if (!labels) labels = "";
    if (!valid_metric_name(name) || !valid_label_body(labels, type == MT_HISTOGRAM))
        return drop(m, DROP_INVALID);
    if (type == MT_HISTOGRAM) {
        if (nbounds < 0 || (nbounds > 0 && !bounds)) return drop(m, DROP_INVALID);
        for (int i = 0; i < nbounds; i++)
            if (!isfinite(bounds[i]) || (i > 0 && !(bounds[i] > bounds[i - 1])))
                return drop(m, DROP_INVALID);
    }
    epd_metric_t *res = NULL;
    pthread_mutex_lock(&m->lock);
    struct family *f = NULL;
    for (int i = 0; i < m->nfams; i++)
        if (strcmp(m->fams[i]->name, name) == 0) {
            f = m->fams[i];
            break;
        }
    if (f) {
        if (f->type != type) {
            res = drop(m, DROP_CONFLICT);
            goto out;
        }
        for (epd_metric_t *s = f->first; s; s = s->next)
            if (strcmp(s->labels, labels) == 0) {
                res = s;
                goto out;
            }
    }
    if (m->nseries >= m->max_series) {
        res = drop(m, DROP_CAP);
        goto out;
    }
    if (!f) {
        if (m->nfams == m->capfams) {
            int nc = m->capfams ? m->capfams * 2 : 16;
            struct family **nf = realloc(m->fams, (size_t)nc * sizeof(*nf));
            if (!nf) goto out;
            m->fams = nf;
            m->capfams = nc;
        }
        f = calloc(1, sizeof(*f));
        if (!f) goto out;
        f->name = strdup(name);
        f->help = strdup(help ? help : "");
        f->type = type;
        f->nbounds = type == MT_HISTOGRAM ? nbounds : 0;
        if (f->nbounds) {
            f->bounds = malloc((size_t)nbounds * sizeof(double));
            if (f->bounds) memcpy(f->bounds, bounds, (size_t)nbounds * sizeof(double));
        }
        if (!f->name || !f->help || (f->nbounds && !f->bounds)) {
            family_free(f);
            goto out;
        }
        m->fams[m->nfams++] = f;
    }
    epd_metric_t *s = calloc(1, sizeof(*s));
    if (!s) goto out;
    s->fam = f;
    s->labels = strdup(labels);
    if (type == MT_HISTOGRAM) s->buckets = calloc((size_t)f->nbounds + 1, sizeof(*s->buckets));
    if (!s->labels || (type == MT_HISTOGRAM && !s->buckets)) {
        free(s->labels);
        free(s->buckets);
        free(s);
        goto out;
    }
    atomic_store(&s->bits, d2b(0.0));
    if (f->last)
        f->last->next = s;
    else
        f->first = s;
    f->last = s;
    m->nseries++;
    res = s;
out:
    pthread_mutex_unlock(&m->lock);
    return res;
}

epd_metric_t *epd_metrics_counter(epd_metrics_t *m, const char *name, const char *help,
                                  const char *labels)
{
    return get_series(m, MT_COUNTER, name, help, labels, NULL, 0);
}

epd_metric_t *epd_metrics_gauge(epd_metrics_t *m, const char *name, const char *help,
                                const char *labels)
{
    return get_series(m, MT_GAUGE, name, help, labels, NULL, 0);
}

epd_metric_t *epd_metrics_histogram(epd_metrics_t *m, const char *name, const char *help,
                                    const char *labels, const double *bounds, int nbounds)
{
    return get_series(m, MT_HISTOGRAM, name, help, labels, bounds, nbounds);
}

static void atomic_add_double(_Atomic uint64_t *a, double v)
{
    uint64_t old = atomic_load_explicit(a, memory_order_relaxed);
    while (!atomic_compare_exchange_weak_explicit(a, &old, d2b(b2d(old) + v), memory_order_relaxed,
                                                  memory_order_relaxed))
        ;
}

void epd_metric_add(epd_metric_t *c, double v)
{
    if (!c || !c->fam || c->fam->type == MT_HISTOGRAM) return;
    /* counters only go up: a negative or NaN increment is a caller bug, not data */
    if (c->fam->type == MT_COUNTER && !(v >= 0)) return;
    atomic_add_double(&c->bits, v);
}

void epd_metric_set(epd_metric_t *g, double v)
{
    if (!g || !g->fam || g->fam->type != MT_GAUGE) return;
    atomic_store_explicit(&g->bits, d2b(v), memory_order_relaxed);
}

void epd_metric_observe(epd_metric_t *h, double v)
{
    if (!h || !h->fam || h->fam->type != MT_HISTOGRAM || isnan(v)) return;
    const struct family *f = h->fam;
    int i = 0;
    while (i < f->nbounds && v > f->bounds[i])
        i++;
    atomic_fetch_add_explicit(&h->buckets[i], 1, memory_order_relaxed);
    atomic_add_double(&h->bits, v);
}

double epd_metric_value(const epd_metric_t *c)
{
    if (!c || !c->fam) return 0.0;
    return b2d(atomic_load_explicit(&((epd_metric_t *)c)->bits, memory_order_relaxed));
}

/* ---- rendering ---- */

typedef struct sbuf {
    char *p;
    size_t len, cap;
    int failed;
} sbuf_t;

static void sb_put(sbuf_t *b, const char *s, size_t n)
{
    if (b->failed) return;
    if (b->len + n + 1 > b->cap) {
        size_t nc = b->cap ? b->cap : 4096;
        while (nc < b->len + n + 1)
            nc *= 2;
        char *np = realloc(b->p, nc);
        if (!np) {
            b->failed = 1;
            return;
        }
        b->p = np;
        b->cap = nc;
    }
    memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = '\0';
}

static void sb_puts(sbuf_t *b, const char *s)
{
    sb_put(b, s, strlen(s));
}

static void sb_printf(sbuf_t *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void sb_printf(sbuf_t *b, const char *fmt, ...)
{
    char tmp[256];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(tmp, sizeof(tmp), fmt, ap);
    va_end(ap);
    if (n < 0) return;
    sb_put(b, tmp, (size_t)n < sizeof(tmp) ? (size_t)n : sizeof(tmp) - 1);
}

/* Shortest text that reads back as the same double; the special values as Prometheus spells
 * them. */
static void fmt_double(char *out, size_t cap, double v)
{
    if (isnan(v)) {
        snprintf(out, cap, "NaN");
        return;
    }
    if (isinf(v)) {
        snprintf(out, cap, v > 0 ? "+Inf" : "-Inf");
        return;
    }
    if (v == floor(v) && fabs(v) < 1e15) {
        snprintf(out, cap, "%.0f", v);
        return;
    }
    for (int prec = 1; prec <= 17; prec++) {
        snprintf(out, cap, "%.*g", prec, v);
        if (strtod(out, NULL) == v) return;
    }
}

static void put_help(sbuf_t *b, const char *help)
{
    for (const char *p = help; *p; p++) {
        if (*p == '\\')
            sb_puts(b, "\\\\");
        else if (*p == '\n')
            sb_puts(b, "\\n");
        else
            sb_put(b, p, 1);
    }
}

static void put_sample(sbuf_t *b, const char *name, const char *suffix, const char *labels,
                       const char *extra_label, double v)
{
    char num[64];
    fmt_double(num, sizeof(num), v);
    sb_puts(b, name);
    sb_puts(b, suffix);
    int has = labels && *labels;
    if (has || extra_label) {
        sb_puts(b, "{");
        if (has) {
            size_t l = strlen(labels);
            sb_put(b, labels, labels[l - 1] == ',' ? l - 1 : l);
        }
        if (has && extra_label) sb_puts(b, ",");
        if (extra_label) sb_puts(b, extra_label);
        sb_puts(b, "}");
    }
    sb_puts(b, " ");
    sb_puts(b, num);
    sb_puts(b, "\n");
}

static const char *type_name(mtype_t t)
{
    return t == MT_COUNTER ? "counter" : t == MT_GAUGE ? "gauge" : "histogram";
}

int epd_metrics_render(epd_metrics_t *m, char **out, size_t *len)
{
    sbuf_t b = {0};
    pthread_mutex_lock(&m->lock);
    for (int i = 0; i < m->nfams; i++) {
        const struct family *f = m->fams[i];
        sb_printf(&b, "# HELP %s ", f->name);
        put_help(&b, f->help);
        sb_printf(&b, "\n# TYPE %s %s\n", f->name, type_name(f->type));
        for (epd_metric_t *s = f->first; s; s = s->next) {
            double v = b2d(atomic_load_explicit(&s->bits, memory_order_relaxed));
            if (f->type != MT_HISTOGRAM) {
                put_sample(&b, f->name, "", s->labels, NULL, v);
                continue;
            }
            /* _count is the +Inf bucket by construction, so the two always agree even while
             * other threads observe. */
            uint64_t cum = 0;
            char le[96], num[64];
            for (int k = 0; k <= f->nbounds; k++) {
                cum += atomic_load_explicit(&s->buckets[k], memory_order_relaxed);
                if (k < f->nbounds)
                    fmt_double(num, sizeof(num), f->bounds[k]);
                else
                    snprintf(num, sizeof(num), "+Inf");
                snprintf(le, sizeof(le), "le=\"%s\"", num);
                put_sample(&b, f->name, "_bucket", s->labels, le, (double)cum);
            }
            put_sample(&b, f->name, "_sum", s->labels, NULL, v);
            put_sample(&b, f->name, "_count", s->labels, NULL, (double)cum);
        }
    }
    pthread_mutex_unlock(&m->lock);
    sb_puts(&b, "# HELP epd_metrics_dropped_series_total Series not created: over the series cap, "
                "malformed name or labels, or a name reused with another type.\n"
                "# TYPE epd_metrics_dropped_series_total counter\n");
    for (int r = 0; r < DROP_NREASONS; r++) {
        char lab[48];
        snprintf(lab, sizeof(lab), "reason=\"%s\"", drop_reason[r]);
        put_sample(&b, "epd_metrics_dropped_series_total", "", lab, NULL,
                   (double)atomic_load(&m->dropped[r]));
    }
    if (b.failed) {
        free(b.p);
        return -1;
    }
    *out = b.p;
    if (len) *len = b.len;
    return 0;
}
