/* epctl's cluster commands: `up CLUSTER.json` (bring-up progress with a deadline), the rank
 * table and peer health for `status`, `drain` and `down`. Everything goes over each node's
 * HTTP API (/readyz, /v1/cluster, /v1/admin/...), every request bounded by a timeout. */
#include "epctl_cluster.h"
#include "epd_clock.h"
#include "epctl_common.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "httpclient.h"

enum { EXIT_OK = 0, EXIT_RUNTIME = 1, EXIT_USAGE = 2, EXIT_NOT_READY = 3 };

#define UP_MAX_NODES 256
#define CLUSTER_FILE_MAX (4u << 20)

/* GET/POST node+path; 0 with *status and *doc (may be NULL when the body is not JSON), or -1
 * with err filled. */
static int request_h(const char *node, const char *method, const char *path, const char *headers,
                     int timeout_ms, int *status, cJSON **doc, char *err, size_t errlen)
{
    char host[256];
    int port;
    epd_http_response_t resp;
    *doc = NULL;
    if (epd_http_parse_hostport(node, host, sizeof host, &port) != 0) {
        snprintf(err, errlen, "'%s' is not HOST:PORT", node);
        return -1;
    }
    if (epd_http_request_h(host, port, method, path, headers, NULL, 0, timeout_ms, &resp, err,
                           errlen) != 0)
        return -1;
    *status = resp.status;
    *doc = cJSON_ParseWithLength(resp.body, resp.body_len);
    epd_http_response_free(&resp);
    return 0;
}

static int request(const char *node, const char *method, const char *path, int timeout_ms,
                   int *status, cJSON **doc, char *err, size_t errlen)
{
    return request_h(node, method, path, epctl_auth_header(), timeout_ms, status, doc, err, errlen);
}

static double jnum(const cJSON *o, const char *k, double dflt)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, k);
    return cJSON_IsNumber(v) ? v->valuedouble : dflt;
}

/* ---- status: rank table and peers ---- */

int epctl_cluster_print(const char *node, int timeout_ms, FILE *out)
{
    int status = 0;
    cJSON *doc = NULL;
    char err[512];
    if (request(node, "GET", "/v1/cluster", timeout_ms, &status, &doc, err, sizeof err) != 0) {
        fprintf(stderr, "epctl: %s/v1/cluster: %s\n", node, err);
        return EXIT_RUNTIME;
    }
    if (status != 200 || !doc) {
        fprintf(stderr, "epctl: %s/v1/cluster answered %d%s\n", node, status,
                doc ? "" : " without JSON");
        cJSON_Delete(doc);
        return EXIT_RUNTIME;
    }
    const cJSON *t = cJSON_GetObjectItemCaseSensitive(doc, "rank_table");
    fprintf(out, "\n%-12s %.0f%s\n", "epoch", jnum(doc, "epoch", 0),
            cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(doc, "formed")) ? " (formed)"
                                                                          : " (not formed)");
    fprintf(out, "%-12s %.0f\n", "coordinator", jnum(doc, "coordinator", -1));
    const char *reason = epctl_jstr(doc, "reason", "");
    if (*reason) fprintf(out, "%-12s %s\n", "reason", reason);
    if (cJSON_IsObject(t)) {
        fprintf(out, "\nRANK TABLE epoch %.0f, %.0f ranks%s\n", jnum(t, "epoch", 0),
                jnum(t, "nranks", 0),
                cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(t, "complete")) ? ""
                                                                              : " (incomplete)");
        fprintf(out, "%-6s %-10s %-20s %-22s %s\n", "NODE", "RANKS", "HOST", "HTTP", "GPUS");
        const cJSON *n;
        cJSON_ArrayForEach(n, cJSON_GetObjectItemCaseSensitive(t, "nodes"))
        {
            char ranks[32], gpus[256] = "";
            int first = (int)jnum(n, "first_rank", 0), cnt = (int)jnum(n, "ranks", 0);
            snprintf(ranks, sizeof ranks, cnt > 1 ? "%d-%d" : "%d", first, first + cnt - 1);
            const cJSON *g;
            size_t gl = 0;
            cJSON_ArrayForEach(g, cJSON_GetObjectItemCaseSensitive(n, "gpus"))
            {
                const char *pci = epctl_jstr(g, "pci_bus_id", "");
                if (gl < sizeof gpus)
                    gl += (size_t)snprintf(gpus + gl, sizeof gpus - gl, "%s%.0f%s%s%s",
                                           gl ? "," : "", jnum(g, "ordinal", -1), *pci ? "(" : "",
                                           pci, *pci ? ")" : "");
            }
            fprintf(out, "%-6.0f %-10s %-20.20s %-22.22s %s\n", jnum(n, "node_id", -1), ranks,
                    epctl_jstr(n, "hostname", epctl_jstr(n, "name", "-")),
                    epctl_jstr(n, "http", "-"), *gpus ? gpus : "-");
        }
    } else {
        fprintf(out, "\nRANK TABLE none yet\n");
    }
    const cJSON *peers = cJSON_GetObjectItemCaseSensitive(doc, "peers"), *p;
    if (cJSON_GetArraySize(peers) > 0) {
        fprintf(out, "\n%-6s %-22s %-8s %-10s %-10s %s\n", "PEER", "ADDRESS", "STATE", "LAST HB",
                "RTT", "REASON");
        cJSON_ArrayForEach(p, peers)
        {
            char hb[32] = "-", rtt[32] = "-";
            const cJSON *v = cJSON_GetObjectItemCaseSensitive(p, "last_heartbeat_ms_ago");
            if (cJSON_IsNumber(v)) snprintf(hb, sizeof hb, "%.0f ms", v->valuedouble);
            v = cJSON_GetObjectItemCaseSensitive(p, "rtt_ms");
            if (cJSON_IsNumber(v)) snprintf(rtt, sizeof rtt, "%.3f ms", v->valuedouble);
            fprintf(out, "%-6.0f %-22.22s %-8s %-10s %-10s %s\n", jnum(p, "node_id", -1),
                    epctl_jstr(p, "address", "-"), epctl_jstr(p, "state", "-"), hb, rtt,
                    epctl_jstr(p, "reason", ""));
        }
    }
    cJSON_Delete(doc);
    return EXIT_OK;
}

/* ---- drain / undrain / down ---- */

static int admin(const char *what, int argc, char **argv)
{
    static const struct option opts[] = {{"node", required_argument, NULL, 'n'},
                                         {"timeout", required_argument, NULL, 't'},
                                         {"token-file", required_argument, NULL, 'k'},
                                         {"help", no_argument, NULL, 'h'},
                                         {NULL, 0, NULL, 0}};
    const char *node = "127.0.0.1:8080", *token_file = NULL;
    int timeout = 5000, opt;
    optind = 1;
    while ((opt = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        switch (opt) {
        case 'n':
            node = optarg;
            break;
        case 't':
            if (epctl_opt_int(what, "timeout", optarg, 1, 3600000, "ms", &timeout)) {
                return EXIT_USAGE;
            }
            break;
        case 'k':
            token_file = optarg;
            break;
        case 'h':
            printf("Usage: epctl %s [--node HOST:PORT] [--timeout MS] [--token-file FILE]\n\n"
                   "%s\n\n--token-file: the node's http.admin_token_file (or a copy), sent as\n"
                   "'Authorization: Bearer'; default $EPD_TOKEN_FILE.\n",
                   what,
                   strcmp(what, "drain") == 0
                       ? "Asks the node to drain: it stays up, finishes its in-flight requests,\n"
                         "answers new completions with 503 \"draining\" and reports not ready\n"
                         "(POST /v1/admin/drain). `epctl undrain` reverses it."
                   : strcmp(what, "undrain") == 0
                       ? "Ends a drain: the node takes new work again and is ready once its\n"
                         "components are (POST /v1/admin/undrain)."
                       : "Stops the node gracefully: it tells its peers it leaves, finishes\n"
                         "in-flight requests and exits (POST /v1/admin/down).");
            return EXIT_OK;
        default:
            return EXIT_USAGE;
        }
    }
    if (optind != argc) {
        fprintf(stderr, "epctl %s: unexpected argument '%s'\n", what, argv[optind]);
        return EXIT_USAGE;
    }
    char path[64], err[512];
    int status = 0;
    cJSON *doc = NULL;
    snprintf(path, sizeof path, "/v1/admin/%s", what);
    if (token_file && epctl_token_init(what, token_file) != 0) return EXIT_USAGE;
    if (request(node, "POST", path, timeout, &status, &doc, err, sizeof err) != 0) {
        fprintf(stderr, "epctl %s: %s: %s\n", what, node, err);
        return EXIT_RUNTIME;
    }
    int ok = status >= 200 && status < 300;
    printf("%s: %s\n", node, ok ? epctl_jstr(doc, "state", "ok") : "refused");
    if (!ok) {
        const cJSON *e = cJSON_GetObjectItemCaseSensitive(doc, "error");
        const cJSON *m = cJSON_IsObject(e) ? cJSON_GetObjectItemCaseSensitive(e, "message") : e;
        fprintf(stderr, "epctl %s: %s%s answered %d%s%s\n", what, node, path, status,
                cJSON_IsString(m) ? ": " : "", cJSON_IsString(m) ? m->valuestring : "");
    }
    cJSON_Delete(doc);
    return ok ? EXIT_OK : EXIT_RUNTIME;
}

int epctl_cmd_drain(int argc, char **argv)
{
    return admin("drain", argc, argv);
}

int epctl_cmd_undrain(int argc, char **argv)
{
    return admin("undrain", argc, argv);
}

int epctl_cmd_down(int argc, char **argv)
{
    return admin("down", argc, argv);
}

/* ---- up ---- */

typedef struct up_node {
    int id;
    char http[300];
    char name[64];
    int reachable, joined, ready;
    int first_rank, ranks;
    unsigned long long epoch;
    char why[512];
    char last_line[1200];
} up_node_t;

static char *read_file(const char *path, size_t *len, char *err, size_t errlen)
{
    FILE *f = fopen(path, "rb");
    char *buf = NULL;
    size_t n = 0;
    if (!f) {
        snprintf(err, errlen, "%s: %s", path, strerror(errno));
        return NULL;
    }
    buf = malloc(CLUSTER_FILE_MAX + 1);
    if (buf) n = fread(buf, 1, CLUSTER_FILE_MAX + 1, f);
    fclose(f);
    if (!buf) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    if (n > CLUSTER_FILE_MAX) {
        snprintf(err, errlen, "%s: larger than %u bytes", path, CLUSTER_FILE_MAX);
        free(buf);
        return NULL;
    }
    buf[n] = 0;
    *len = n;
    return buf;
}

/* {"nodes": [{"id": 0, "http": "HOST:PORT", "name": "a"}, ...]}; errors name the JSON path. */
static int load_cluster_file(const char *path, up_node_t **out, int *count, char *err,
                             size_t errlen)
{
    size_t len = 0;
    char *text = read_file(path, &len, err, errlen);
    if (!text) return -1;
    cJSON *doc = cJSON_ParseWithLength(text, len);
    up_node_t *nodes = NULL;
    int n = 0, rc = -1;
    if (!doc) {
        const char *at = cJSON_GetErrorPtr();
        snprintf(err, errlen, "%s: not valid JSON (near byte %ld)", path,
                 at && at >= text ? (long)(at - text) : 0L);
        goto out;
    }
    const cJSON *arr = cJSON_GetObjectItemCaseSensitive(doc, "nodes");
    if (!cJSON_IsArray(arr) || cJSON_GetArraySize(arr) == 0) {
        snprintf(err, errlen, "%s: nodes: expected a non-empty array of {id, http}", path);
        goto out;
    }
    n = cJSON_GetArraySize(arr);
    if (n > UP_MAX_NODES) {
        snprintf(err, errlen, "%s: nodes: %d entries, at most %d", path, n, UP_MAX_NODES);
        goto out;
    }
    nodes = calloc((size_t)n, sizeof *nodes);
    if (!nodes) {
        snprintf(err, errlen, "out of memory");
        goto out;
    }
    for (int i = 0; i < n; i++) {
        const cJSON *e = cJSON_GetArrayItem(arr, i);
        const cJSON *id = cJSON_GetObjectItemCaseSensitive(e, "id");
        const cJSON *http = cJSON_GetObjectItemCaseSensitive(e, "http");
        char host[256];
        int port;
        if (!cJSON_IsObject(e)) {
            snprintf(err, errlen, "%s: nodes[%d]: expected an object", path, i);
            goto out;
        }
        if (!cJSON_IsNumber(id) || id->valuedouble < 0 || id->valuedouble > 65535 ||
            id->valuedouble != (double)id->valueint) {
            snprintf(err, errlen, "%s: nodes[%d].id: expected an integer 0..65535", path, i);
            goto out;
        }
        if (!cJSON_IsString(http) ||
            epd_http_parse_hostport(http->valuestring, host, sizeof host, &port) != 0) {
            snprintf(err, errlen, "%s: nodes[%d].http: expected \"HOST:PORT\"", path, i);
            goto out;
        }
        for (int j = 0; j < i; j++)
            if (nodes[j].id == id->valueint) {
                snprintf(err, errlen, "%s: nodes[%d].id: %d is also nodes[%d].id", path, i,
                         id->valueint, j);
                goto out;
            }
        nodes[i].id = id->valueint;
        snprintf(nodes[i].http, sizeof nodes[i].http, "%s", http->valuestring);
        snprintf(nodes[i].name, sizeof nodes[i].name, "%s", epctl_jstr(e, "name", ""));
        nodes[i].first_rank = -1;
    }
    rc = 0;
out:
    cJSON_Delete(doc);
    free(text);
    if (rc == 0) {
        *out = nodes;
        *count = n;
    } else {
        free(nodes);
    }
    return rc;
}

static void probe(up_node_t *n, int timeout_ms)
{
    int status = 0;
    cJSON *doc = NULL;
    char err[512];
    n->reachable = n->joined = n->ready = 0;
    n->first_rank = -1;
    if (request(n->http, "GET", "/readyz", timeout_ms, &status, &doc, err, sizeof err) != 0) {
        snprintf(n->why, sizeof n->why, "unreachable: %.480s", err);
        return;
    }
    n->reachable = 1;
    n->ready = status == 200 && cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(doc, "ready"));
    n->why[0] = 0;
    if (!n->ready) {
        const cJSON *r;
        size_t l = 0;
        cJSON_ArrayForEach(r, cJSON_GetObjectItemCaseSensitive(doc, "reasons"))
        {
            if (cJSON_IsString(r) && l < sizeof n->why)
                l += (size_t)snprintf(n->why + l, sizeof n->why - l, "%s%s", l ? "; " : "",
                                      r->valuestring);
        }
        if (!l) snprintf(n->why, sizeof n->why, "/readyz answered %d", status);
    }
    cJSON_Delete(doc);
    if (request(n->http, "GET", "/v1/cluster", timeout_ms, &status, &doc, err, sizeof err) != 0 ||
        status != 200 || !doc) {
        cJSON_Delete(doc);
        return;
    }
    const cJSON *id = cJSON_GetObjectItemCaseSensitive(doc, "node_id");
    if (cJSON_IsNumber(id) && id->valueint != n->id) {
        snprintf(n->why, sizeof n->why, "%s is node %d, not node %d as the cluster file says",
                 n->http, id->valueint, n->id);
        n->ready = 0;
        cJSON_Delete(doc);
        return;
    }
    n->epoch = (unsigned long long)jnum(doc, "epoch", 0);
    n->joined = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(doc, "formed")) &&
                jnum(doc, "first_rank", -1) >= 0;
    n->first_rank = (int)jnum(doc, "first_rank", -1);
    n->ranks = (int)jnum(doc, "local_ranks", 0);
    cJSON_Delete(doc);
}

static void print_progress(up_node_t *n, long long t0)
{
    char line[1200], rank[32] = "-";
    if (n->first_rank >= 0)
        snprintf(rank, sizeof rank, n->ranks > 1 ? "%d-%d" : "%d", n->first_rank,
                 n->first_rank + n->ranks - 1);
    snprintf(line, sizeof line, "node %d (%s): reachable %s, joined %s, rank %s, ready %s%s%s",
             n->id, n->http, n->reachable ? "yes" : "no", n->joined ? "yes" : "no", rank,
             n->ready ? "yes" : "no", n->why[0] ? ": " : "", n->why);
    if (strcmp(line, n->last_line) == 0) return;
    snprintf(n->last_line, sizeof n->last_line, "%s", line);
    printf("[%6.1fs] %s\n", (double)(epd_now_ms() - t0) / 1000.0, line);
    fflush(stdout);
}

int epctl_cmd_up(int argc, char **argv)
{
    static const struct option opts[] = {{"deadline", required_argument, NULL, 'd'},
                                         {"timeout", required_argument, NULL, 't'},
                                         {"interval", required_argument, NULL, 'i'},
                                         {"help", no_argument, NULL, 'h'},
                                         {NULL, 0, NULL, 0}};
    int deadline_s = 120, timeout = 2000, interval = 500, opt;
    optind = 1;
    while ((opt = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        switch (opt) {
        case 'd':
            if (epctl_opt_int("up", "deadline", optarg, 1, 86400, "seconds", &deadline_s)) {
                return EXIT_USAGE;
            }
            break;
        case 't':
            if (epctl_opt_int("up", "timeout", optarg, 1, 600000, "ms", &timeout)) {
                return EXIT_USAGE;
            }
            break;
        case 'i':
            if (epctl_opt_int("up", "interval", optarg, 10, 60000, "ms", &interval)) {
                return EXIT_USAGE;
            }
            break;
        case 'h':
            printf("Usage: epctl up CLUSTER.json [--deadline SECONDS] [--timeout MS] "
                   "[--interval MS]\n"
                   "\n"
                   "Waits until every node listed in CLUSTER.json is reachable, has joined the\n"
                   "cluster (formed rank table) and is ready, printing each node's progress as\n"
                   "it changes. CLUSTER.json: {\"nodes\": [{\"id\": 0, \"http\": \"HOST:PORT\"}, "
                   "...]}.\n"
                   "  --deadline SECONDS  give up after this long (default 120)\n"
                   "  --timeout MS        bound on each request (default 2000)\n"
                   "  --interval MS       time between polls (default 500)\n"
                   "\n"
                   "Exit status: 0 all nodes ready; 1 a node unreachable at the deadline;\n"
                   "2 usage error or bad cluster file; 3 nodes reachable but not all ready.\n");
            return EXIT_OK;
        default:
            return EXIT_USAGE;
        }
    }
    if (argc - optind != 1) {
        fprintf(stderr, "epctl up: expected exactly one CLUSTER.json\n");
        return EXIT_USAGE;
    }
    up_node_t *nodes = NULL;
    int n = 0;
    char err[600];
    if (load_cluster_file(argv[optind], &nodes, &n, err, sizeof err) != 0) {
        fprintf(stderr, "epctl up: %s\n", err);
        return EXIT_USAGE;
    }
    long long t0 = epd_now_ms(), deadline = t0 + (long long)deadline_s * 1000;
    int all_ready = 0;
    for (;;) {
        all_ready = 1;
        for (int i = 0; i < n; i++) {
            probe(&nodes[i], timeout);
            print_progress(&nodes[i], t0);
            all_ready &= nodes[i].ready && nodes[i].joined;
        }
        if (all_ready) {
            /* One epoch across the cluster, or a membership change raced the polls. */
            for (int i = 1; i < n; i++)
                if (nodes[i].epoch != nodes[0].epoch) all_ready = 0;
        }
        if (all_ready || epd_now_ms() >= deadline) break;
        usleep((useconds_t)interval * 1000);
    }
    int rc = EXIT_OK;
    if (all_ready) {
        printf("cluster up: %d node(s) ready at epoch %llu\n", n, nodes[0].epoch);
    } else {
        int unreachable = 0;
        fprintf(stderr, "epctl up: not every node was ready within %d s:\n", deadline_s);
        for (int i = 0; i < n; i++) {
            if (nodes[i].ready && nodes[i].joined) continue;
            unreachable |= !nodes[i].reachable;
            fprintf(stderr, "  node %d (%s): %s\n", nodes[i].id, nodes[i].http,
                    nodes[i].why[0] ? nodes[i].why
                                    : (nodes[i].joined ? "not ready" : "not joined"));
        }
        rc = unreachable ? EXIT_RUNTIME : EXIT_NOT_READY;
    }
    free(nodes);
    return rc;
}
