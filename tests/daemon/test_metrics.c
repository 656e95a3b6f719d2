/* Metrics registry: the rendered exposition text is parsed back here by an independent reader
 * of the 0.0.4 grammar and compared with values the test computes itself. */
#include <math.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "metrics.h"

/* One sample line: "name{labels} value". Returns 1 if `line` is a sample whose series key
 * (name + raw label text) equals `key`, storing the value. */
typedef struct sample {
    char key[512];
    char value[64];
} sample_t;

static int parse_samples(const char *text, sample_t *out, int max, int *nhelp, int *ntype)
{
    int n = 0;
    *nhelp = *ntype = 0;
    const char *p = text;
    while (*p) {
        const char *eol = strchr(p, '\n');
        assert_non_null(eol); /* every line ends in \n */
        size_t len = (size_t)(eol - p);
        char line[1024];
        assert_true(len < sizeof(line));
        memcpy(line, p, len);
        line[len] = '\0';
        p = eol + 1;
        if (strncmp(line, "# HELP ", 7) == 0) {
            (*nhelp)++;
            continue;
        }
        if (strncmp(line, "# TYPE ", 7) == 0) {
            (*ntype)++;
            char name[256], type[32];
            assert_int_equal(sscanf(line + 7, "%255s %31s", name, type), 2);
            assert_true(strcmp(type, "counter") == 0 || strcmp(type, "gauge") == 0 ||
                        strcmp(type, "histogram") == 0);
            continue;
        }
        assert_true(line[0] != '#' && line[0] != '\0');
        /* metric name */
        size_t i = 0;
        while ((line[i] >= 'a' && line[i] <= 'z') || (line[i] >= 'A' && line[i] <= 'Z') ||
               line[i] == '_' || line[i] == ':' || (i > 0 && line[i] >= '0' && line[i] <= '9'))
            i++;
        assert_true(i > 0);
        if (line[i] == '{') {
            i++;
            while (line[i] != '}') {
                while (line[i] != '=') {
                    assert_true(line[i] != '\0');
                    i++;
                }
                i++;
                assert_int_equal(line[i], '"');
                i++;
                while (line[i] != '"') {
                    assert_true(line[i] != '\0');
                    if (line[i] == '\\') {
                        i++;
                        assert_true(line[i] == '\\' || line[i] == '"' || line[i] == 'n');
                    }
                    i++;
                }
                i++;
                if (line[i] == ',') i++;
            }
            i++;
        }
        assert_int_equal(line[i], ' ');
        assert_true(n < max);
        memcpy(out[n].key, line, i);
        out[n].key[i] = '\0';
        snprintf(out[n].value, sizeof(out[n].value), "%s", line + i + 1);
        char *end;
        double v = strtod(out[n].value, &end);
        (void)v;
        assert_true(*end == '\0' || strcmp(out[n].value, "NaN") == 0);
        n++;
    }
    return n;
}

static const char *find(const sample_t *s, int n, const char *key)
{
    for (int i = 0; i < n; i++)
        if (strcmp(s[i].key, key) == 0) return s[i].value;
    return NULL;
}

static double findv(const sample_t *s, int n, const char *key)
{
    const char *v = find(s, n, key);
    if (!v) fail_msg("no sample %s", key);
    return strtod(v, NULL);
}

static void test_counters_gauges_labels(void **state)
{
    epd_metrics_t *m = epd_metrics_create();
    epd_metric_t *a = epd_metrics_counter(m, "t_requests_total", "Requests.", "path=\"/a\"");
    epd_metric_t *b = epd_metrics_counter(m, "t_requests_total", "Requests.", "path=\"/b\"");
    assert_ptr_equal(a, epd_metrics_counter(m, "t_requests_total", "Requests.", "path=\"/a\""));
    assert_ptr_not_equal(a, b);
    epd_metric_add(a, 3);
    epd_metric_add(a, 2);
    epd_metric_add(a, -7); /* counters never go down */
    epd_metric_add(b, 0.25);
    epd_metric_t *g = epd_metrics_gauge(m, "t_temp", "Line one\nback\\slash", NULL);
    epd_metric_set(g, -1.5);
    epd_metric_t *nan = epd_metrics_gauge(m, "t_nan", "x", "");
    epd_metric_set(nan, NAN);
    epd_metric_t *inf = epd_metrics_gauge(m, "t_inf", "x", "");
    epd_metric_set(inf, -INFINITY);
    char esc[64];
    assert_int_equal(epd_metrics_escape_label("a\"b\\c\nd", esc, sizeof(esc)), 10);
    assert_string_equal(esc, "a\\\"b\\\\c\\nd");
    char lab[96];
    snprintf(lab, sizeof(lab), "v=\"%s\"", esc);
    epd_metric_set(epd_metrics_gauge(m, "t_esc", "x", lab), 1e20);
    assert_int_equal(epd_metrics_escape_label("toolong", esc, 4), -1);

    char *text = NULL;
    size_t len = 0;
    assert_int_equal(epd_metrics_render(m, &text, &len), 0);
    assert_int_equal(len, strlen(text));
    assert_non_null(strstr(text, "# HELP t_temp Line one\\nback\\\\slash\n# TYPE t_temp gauge\n"));
    assert_non_null(strstr(text, "# TYPE t_requests_total counter\n"));
    sample_t s[64];
    int nh, nt;
    int n = parse_samples(text, s, 64, &nh, &nt);
    assert_int_equal(nh, nt);
    assert_string_equal(find(s, n, "t_requests_total{path=\"/a\"}"), "5");
    assert_string_equal(find(s, n, "t_requests_total{path=\"/b\"}"), "0.25");
    assert_string_equal(find(s, n, "t_temp"), "-1.5");
    assert_string_equal(find(s, n, "t_nan"), "NaN");
    assert_string_equal(find(s, n, "t_inf"), "-Inf");
    assert_float_equal(findv(s, n, "t_esc{v=\"a\\\"b\\\\c\\nd\"}"), 1e20, 0);
    assert_float_equal(epd_metric_value(a), 5.0, 0);
    free(text);
    epd_metrics_destroy(m);
}

static void test_histogram(void **state)
{
    epd_metrics_t *m = epd_metrics_create();
    const double bounds[] = {0.1, 1, 10};
    epd_metric_t *h = epd_metrics_histogram(m, "t_lat_seconds", "Latency.", "op=\"x\"", bounds, 3);
    const double obs[] = {0.05, 0.1, 0.5, 2, 20, 7, 0.09, 100};
    double sum = 0;
    int expect[4] = {0}; /* non-cumulative, computed here: value <= bound */
    for (size_t i = 0; i < sizeof(obs) / sizeof(obs[0]); i++) {
        epd_metric_observe(h, obs[i]);
        sum += obs[i];
        int k = 0;
        while (k < 3 && !(obs[i] <= bounds[k]))
            k++;
        expect[k]++;
    }
    char *text = NULL;
    size_t len;
    assert_int_equal(epd_metrics_render(m, &text, &len), 0);
    sample_t s[64];
    int nh, nt;
    int n = parse_samples(text, s, 64, &nh, &nt);
    const char *le[] = {"0.1", "1", "10", "+Inf"};
    int cum = 0;
    for (int k = 0; k < 4; k++) {
        char key[128];
        cum += expect[k];
        snprintf(key, sizeof(key), "t_lat_seconds_bucket{op=\"x\",le=\"%s\"}", le[k]);
        assert_float_equal(findv(s, n, key), cum, 0);
    }
    assert_float_equal(findv(s, n, "t_lat_seconds_count{op=\"x\"}"), 8, 0);
    assert_float_equal(findv(s, n, "t_lat_seconds_sum{op=\"x\"}"), sum, 1e-9);
    assert_non_null(strstr(text, "# TYPE t_lat_seconds histogram\n"));
    free(text);
    /* bounds must ascend; le is reserved */
    const double bad[] = {1, 1};
    epd_metric_t *sink = epd_metrics_histogram(m, "t_bad", "x", NULL, bad, 2);
    assert_non_null(sink);
    assert_ptr_equal(sink, epd_metrics_histogram(m, "t_lat_seconds", "x", "le=\"1\"", bounds, 3));
    epd_metrics_destroy(m);
}

static void test_cap_and_invalid(void **state)
{
    epd_metrics_t *m = epd_metrics_create();
    epd_metrics_set_max_series(m, 3);
    epd_metric_t *s[5];
    for (int i = 0; i < 5; i++) {
        char lab[32];
        snprintf(lab, sizeof(lab), "i=\"%d\"", i);
        s[i] = epd_metrics_counter(m, "t_c_total", "x", lab);
        assert_non_null(s[i]);
        epd_metric_add(s[i], 1);
    }
    assert_ptr_equal(s[3], s[4]); /* both the shared overflow series */
    /* malformed label bodies, names, and a type conflict */
    epd_metrics_counter(m, "t_c_total", "x", "i=unquoted");
    epd_metrics_counter(m, "t_c_total", "x", "i=\"open");
    epd_metrics_counter(m, "0bad", "x", NULL);
    epd_metrics_gauge(m, "t_c_total", "x", "i=\"0\"");
    char *text = NULL;
    size_t len;
    assert_int_equal(epd_metrics_render(m, &text, &len), 0);
    sample_t smp[64];
    int nh, nt;
    int n = parse_samples(text, smp, 64, &nh, &nt);
    int series = 0;
    for (int i = 0; i < n; i++)
        series += strncmp(smp[i].key, "t_c_total{", 10) == 0;
    assert_int_equal(series, 3);
    assert_float_equal(findv(smp, n, "epd_metrics_dropped_series_total{reason=\"cap\"}"), 2, 0);
    assert_float_equal(findv(smp, n, "epd_metrics_dropped_series_total{reason=\"invalid\"}"), 3, 0);
    assert_float_equal(findv(smp, n, "epd_metrics_dropped_series_total{reason=\"conflict\"}"), 1,
                       0);
    free(text);
    epd_metrics_destroy(m);
}

#define THREADS 4
#define ADDS 20000

static void *adder(void *arg)
{
    epd_metric_t **ms = arg;
    for (int i = 0; i < ADDS; i++) {
        epd_metric_add(ms[0], 1);
        epd_metric_observe(ms[1], (i % 3) ? 0.5 : 5);
    }
    return NULL;
}

static void test_concurrent_updates(void **state)
{
    epd_metrics_t *m = epd_metrics_create();
    const double bounds[] = {1};
    epd_metric_t *ms[2] = {epd_metrics_counter(m, "t_n_total", "x", NULL),
                           epd_metrics_histogram(m, "t_h", "x", NULL, bounds, 1)};
    pthread_t th[THREADS];
    for (int i = 0; i < THREADS; i++)
        pthread_create(&th[i], NULL, adder, ms);
    for (int k = 0; k < 50; k++) { /* render while updating */
        char *t;
        size_t l;
        assert_int_equal(epd_metrics_render(m, &t, &l), 0);
        free(t);
    }
    for (int i = 0; i < THREADS; i++)
        pthread_join(th[i], NULL);
    assert_float_equal(epd_metric_value(ms[0]), (double)THREADS * ADDS, 0);
    char *text;
    size_t len;
    epd_metrics_render(m, &text, &len);
    sample_t s[32];
    int nh, nt, n = parse_samples(text, s, 32, &nh, &nt);
    int big = 0;
    for (int i = 0; i < ADDS; i++)
        big += (i % 3) == 0;
    assert_float_equal(findv(s, n, "t_h_bucket{le=\"1\"}"), (double)THREADS * (ADDS - big), 0);
    assert_float_equal(findv(s, n, "t_h_count"), (double)THREADS * ADDS, 0);
    assert_float_equal(findv(s, n, "t_h_sum"), THREADS * ((ADDS - big) * 0.5 + big * 5.0), 1e-6);
    free(text);
    epd_metrics_destroy(m);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_counters_gauges_labels),
        cmocka_unit_test(test_histogram),
        cmocka_unit_test(test_cap_and_invalid),
        cmocka_unit_test(test_concurrent_updates),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
