/* epctl: the operator's tool. `config check` validates a config file with the daemon's own
 * validator; `status` and `ready` ask a running epd over HTTP (every wait bounded). */
#include <cjson/cJSON.h>
#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "epctl_cluster.h"
#include "epd_clock.h"
#include "epctl_common.h"
#include "epd_config.h"
#include "httpclient.h"

enum { EXIT_OK = 0, EXIT_RUNTIME = 1, EXIT_USAGE = 2, EXIT_NOT_READY = 3 };

#define DEFAULT_TIMEOUT_MS 5000

static const char exit_codes[] = "Exit status:\n"
                                 "  0  success (config valid; node ready)\n"
                                 "  1  runtime failure: node unreachable, timeout, bad response\n"
                                 "  2  usage error or invalid configuration\n"
                                 "  3  node reachable but not ready\n";

static void usage_main(FILE *out)
{
    fprintf(out,
            "Usage: epctl COMMAND [ARGS]\n"
            "\n"
            "Commands:\n"
            "  config check FILE [--print] [--offline]  validate a configuration file\n"
            "  status [--node HOST:PORT] [--timeout MS] [--json]\n"
            "                                           show a node's status\n"
            "  ready --node HOST:PORT [--wait SECONDS] [--timeout MS]\n"
            "                                           check (or wait for) readiness\n"
            "  up CLUSTER.json [--deadline SECONDS]     bring-up: wait until every node is ready\n"
            "  drain [--node HOST:PORT] [--token-file F] stop sending work to a node\n"
            "  undrain [--node HOST:PORT] [--token-file F] take work again after a drain\n"
            "  down [--node HOST:PORT] [--token-file F]  stop a node gracefully\n"
            "  version                                  print the version\n"
            "\n"
            "Run 'epctl COMMAND --help' for a command's options.\n\n%s",
            exit_codes);
}

static void usage_config_check(FILE *out)
{
    fprintf(out,
            "Usage: epctl config check FILE [--print] [--offline]\n"
            "\n"
            "Validates FILE with the same validator epd uses and prints every error, each\n"
            "naming its JSON path.\n"
            "  --print    on success, print the effective configuration (defaults filled in)\n"
            "  --offline  skip checks against this machine's file system (model.path,\n"
            "             cluster.secret_file): for a config meant for another node\n"
            "\n%s",
            exit_codes);
}

static void usage_status(FILE *out)
{
    fprintf(out,
            "Usage: epctl status [--node HOST:PORT] [--timeout MS] [--json] [--token-file F]\n"
            "\n"
            "Fetches GET /v1/status and GET /v1/cluster from the node's HTTP API and prints\n"
            "the node, its components, the rank table and the health of its peers.\n"
            "  --node HOST:PORT  the node's http.listen address ([V6]:PORT for IPv6;\n"
            "                    default 127.0.0.1:8080)\n"
            "  --timeout MS      bound on connect + request + response (default %d)\n"
            "  --json            print the raw JSON document instead of a table\n"
            "  --token-file F    send the token in F as 'Authorization: Bearer' (a node with\n"
            "                    http.api_key_file: its API key or admin token; default\n"
            "                    $EPD_TOKEN_FILE)\n"
            "\n%s",
            DEFAULT_TIMEOUT_MS, exit_codes);
}

static void usage_ready(FILE *out)
{
    fprintf(out,
            "Usage: epctl ready --node HOST:PORT [--wait SECONDS] [--timeout MS]\n"
            "\n"
            "Asks GET /readyz; prints the reasons when the node is not ready.\n"
            "  --wait SECONDS  poll until ready or SECONDS pass (default 0: ask once)\n"
            "  --timeout MS    bound on each request (default %d)\n"
            "\n%s",
            DEFAULT_TIMEOUT_MS, exit_codes);
}

/* ---- config check ---- */

static int cmd_config_check(int argc, char **argv)
{
    static const struct option opts[] = {{"print", no_argument, NULL, 'p'},
                                         {"offline", no_argument, NULL, 'o'},
                                         {"help", no_argument, NULL, 'h'},
                                         {NULL, 0, NULL, 0}};
    int print = 0, offline = 0, opt;
    optind = 1;
    while ((opt = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        switch (opt) {
        case 'p':
            print = 1;
            break;
        case 'o':
            offline = 1;
            break;
        case 'h':
            usage_config_check(stdout);
            return EXIT_OK;
        default:
            usage_config_check(stderr);
            return EXIT_USAGE;
        }
    }
    if (argc - optind != 1) {
        fprintf(stderr, "epctl config check: expected exactly one FILE\n");
        usage_config_check(stderr);
        return EXIT_USAGE;
    }
    const char *path = argv[optind];
    epd_config_t *cfg = malloc(sizeof(*cfg));
    epd_config_errors_t errs = {0};
    if (!cfg) {
        fprintf(stderr, "epctl: out of memory\n");
        return EXIT_RUNTIME;
    }
    int rc = epd_config_load_ex(path, offline ? EPD_CONFIG_SKIP_FS_CHECKS : 0, cfg, &errs);
    if (rc != 0) {
        epd_config_errors_print(&errs, stderr);
        fprintf(stderr, "%s: invalid (%d error(s))\n", path, errs.count + errs.dropped);
        epd_config_errors_free(&errs);
        free(cfg);
        return EXIT_USAGE;
    }
    epd_config_errors_free(&errs);
    if (print) {
        char *text = epd_config_dump_json(cfg);
        if (!text) {
            fprintf(stderr, "epctl: out of memory\n");
            free(cfg);
            return EXIT_RUNTIME;
        }
        fputs(text, stdout);
        if (text[0] && text[strlen(text) - 1] != '\n') fputc('\n', stdout);
        free(text);
    } else {
        printf("%s: valid\n", path);
    }
    free(cfg);
    return EXIT_OK;
}

static int cmd_config(int argc, char **argv)
{
    if (argc < 2 || strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0) {
        usage_config_check(argc < 2 ? stderr : stdout);
        return argc < 2 ? EXIT_USAGE : EXIT_OK;
    }
    if (strcmp(argv[1], "check") == 0) return cmd_config_check(argc - 1, argv + 1);
    fprintf(stderr, "epctl config: unknown subcommand '%s'\n", argv[1]);
    usage_config_check(stderr);
    return EXIT_USAGE;
}

/* ---- status / ready ---- */

static int fetch_json(const char *node, const char *path, int timeout_ms, int *status, cJSON **doc,
                      char **raw)
{
    char host[256], err[512];
    int port;
    if (epd_http_parse_hostport(node, host, sizeof(host), &port) != 0) {
        fprintf(stderr, "epctl: --node '%s' is not HOST:PORT\n", node);
        return EXIT_USAGE;
    }
    epd_http_response_t resp;
    int rc = epd_http_request_h(host, port, "GET", path, epctl_auth_header(), NULL, 0, timeout_ms,
                                &resp, err, sizeof(err));
    if (rc != 0) {
        fprintf(stderr, "epctl: %s\n", err);
        return EXIT_RUNTIME;
    }
    *status = resp.status;
    *doc = cJSON_ParseWithLength(resp.body, resp.body_len);
    if (!*doc) {
        fprintf(stderr, "epctl: %s%s answered %d with a body that is not JSON\n", node, path,
                resp.status);
        epd_http_response_free(&resp);
        return EXIT_RUNTIME;
    }
    if (raw)
        *raw = resp.body;
    else
        epd_http_response_free(&resp);
    return EXIT_OK;
}

static void print_reasons(const cJSON *reasons, FILE *out)
{
    const cJSON *r;
    cJSON_ArrayForEach(r, reasons)
    {
        if (cJSON_IsString(r)) fprintf(out, "  - %s\n", r->valuestring);
    }
}

static int cmd_status(int argc, char **argv)
{
    static const struct option opts[] = {
        {"node", required_argument, NULL, 'n'}, {"timeout", required_argument, NULL, 't'},
        {"json", no_argument, NULL, 'j'},       {"token-file", required_argument, NULL, 'k'},
        {"help", no_argument, NULL, 'h'},       {NULL, 0, NULL, 0}};
    const char *node = NULL;
    int timeout = DEFAULT_TIMEOUT_MS, json = 0, opt;
    optind = 1;
    while ((opt = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        switch (opt) {
        case 'n':
            node = optarg;
            break;
        case 't':
            if (epctl_opt_int("status", "timeout", optarg, 1, 3600000, "ms", &timeout)) {
                return EXIT_USAGE;
            }
            break;
        case 'j':
            json = 1;
            break;
        case 'k':
            if (epctl_token_init("status", optarg) != 0) return EXIT_USAGE;
            break;
        case 'h':
            usage_status(stdout);
            return EXIT_OK;
        default:
            usage_status(stderr);
            return EXIT_USAGE;
        }
    }
    if (!node) node = "127.0.0.1:8080"; /* http.listen's default */
    if (optind != argc) {
        fprintf(stderr, "epctl status: unexpected argument\n");
        usage_status(stderr);
        return EXIT_USAGE;
    }
    int status = 0;
    cJSON *doc = NULL;
    char *raw = NULL;
    int rc = fetch_json(node, "/v1/status", timeout, &status, &doc, &raw);
    if (rc != EXIT_OK) return rc;
    if (status != 200) {
        fprintf(stderr, "epctl: %s/v1/status answered %d\n", node, status);
        cJSON_Delete(doc);
        free(raw);
        return EXIT_RUNTIME;
    }
    int ready = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(doc, "ready"));
    if (json) {
        fputs(raw, stdout);
    } else {
        const cJSON *n = cJSON_GetObjectItemCaseSensitive(doc, "node");
        const cJSON *id = cJSON_GetObjectItemCaseSensitive(n, "id");
        const cJSON *up = cJSON_GetObjectItemCaseSensitive(doc, "uptime_seconds");
        printf("%-12s %s\n", "node", node);
        printf("%-12s %d\n", "id", cJSON_IsNumber(id) ? id->valueint : -1);
        printf("%-12s %s\n", "name", epctl_jstr(n, "name", "-"));
        printf("%-12s %s\n", "cluster", epctl_jstr(n, "cluster", "-"));
        printf("%-12s %s (%s)\n", "version", epctl_jstr(doc, "version", "-"),
               epctl_jstr(doc, "commit", "-"));
        printf("%-12s %.0f s\n", "uptime", cJSON_IsNumber(up) ? up->valuedouble : 0.0);
        printf("%-12s %s\n", "state", epctl_jstr(doc, "state", "-"));
        printf("%-12s %s\n", "ready", ready ? "yes" : "no");
        const cJSON *comps = cJSON_GetObjectItemCaseSensitive(doc, "components"), *c;
        if (cJSON_GetArraySize(comps) > 0) {
            printf("\n%-16s %-4s %s\n", "COMPONENT", "OK", "REASON");
            cJSON_ArrayForEach(c, comps)
            {
                printf("%-16s %-4s %s\n", epctl_jstr(c, "name", "-"),
                       cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(c, "ok")) ? "yes" : "no",
                       epctl_jstr(c, "reason", "-"));
            }
        }
        epctl_cluster_print(node, timeout, stdout);
    }
    cJSON_Delete(doc);
    free(raw);
    return ready ? EXIT_OK : EXIT_NOT_READY;
}

static int cmd_ready(int argc, char **argv)
{
    static const struct option opts[] = {{"node", required_argument, NULL, 'n'},
                                         {"wait", required_argument, NULL, 'w'},
                                         {"timeout", required_argument, NULL, 't'},
                                         {"help", no_argument, NULL, 'h'},
                                         {NULL, 0, NULL, 0}};
    const char *node = NULL;
    int timeout = DEFAULT_TIMEOUT_MS, wait_s = 0, opt;
    optind = 1;
    while ((opt = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        switch (opt) {
        case 'n':
            node = optarg;
            break;
        case 'w':
            if (epctl_opt_int("ready", "wait", optarg, 0, 86400, "seconds", &wait_s)) {
                return EXIT_USAGE;
            }
            break;
        case 't':
            if (epctl_opt_int("ready", "timeout", optarg, 1, 3600000, "ms", &timeout)) {
                return EXIT_USAGE;
            }
            break;
        case 'h':
            usage_ready(stdout);
            return EXIT_OK;
        default:
            usage_ready(stderr);
            return EXIT_USAGE;
        }
    }
    if (!node || optind != argc) {
        fprintf(stderr, "epctl ready: %s\n", node ? "unexpected argument" : "--node is required");
        usage_ready(stderr);
        return EXIT_USAGE;
    }
    long long deadline = epd_now_ms() + (long long)wait_s * 1000;
    for (;;) {
        int status = 0;
        cJSON *doc = NULL;
        int rc = fetch_json(node, "/readyz", timeout, &status, &doc, NULL);
        if (rc == EXIT_USAGE) return rc;
        int ready = rc == EXIT_OK && status == 200 &&
                    cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(doc, "ready"));
        if (ready) {
            printf("%s: ready\n", node);
            cJSON_Delete(doc);
            return EXIT_OK;
        }
        if (epd_now_ms() >= deadline) {
            if (rc == EXIT_OK) {
                printf("%s: not ready\n", node);
                print_reasons(cJSON_GetObjectItemCaseSensitive(doc, "reasons"), stdout);
            }
            cJSON_Delete(doc);
            return rc == EXIT_OK ? EXIT_NOT_READY : rc;
        }
        cJSON_Delete(doc);
        usleep(250 * 1000);
    }
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        usage_main(stderr);
        return EXIT_USAGE;
    }
    const char *cmd = argv[1];
    if (strcmp(cmd, "--help") == 0 || strcmp(cmd, "-h") == 0 || strcmp(cmd, "help") == 0) {
        usage_main(stdout);
        return EXIT_OK;
    }
    if (strcmp(cmd, "version") == 0 || strcmp(cmd, "--version") == 0) {
        printf("epctl %s (%s)\n", EPD_VERSION, EPD_COMMIT);
        return EXIT_OK;
    }
    if (strcmp(cmd, "config") == 0) return cmd_config(argc - 1, argv + 1);
    /* every command below talks to nodes: $EPD_TOKEN_FILE (--token-file overrides it) */
    if (epctl_token_init(cmd, NULL) != 0) return EXIT_USAGE;
    if (strcmp(cmd, "status") == 0) return cmd_status(argc - 1, argv + 1);
    if (strcmp(cmd, "ready") == 0) return cmd_ready(argc - 1, argv + 1);
    /* cluster commands: epctl_cluster.c */
    if (strcmp(cmd, "up") == 0) return epctl_cmd_up(argc - 1, argv + 1);
    if (strcmp(cmd, "drain") == 0) return epctl_cmd_drain(argc - 1, argv + 1);
    if (strcmp(cmd, "undrain") == 0) return epctl_cmd_undrain(argc - 1, argv + 1);
    if (strcmp(cmd, "down") == 0) return epctl_cmd_down(argc - 1, argv + 1);
    fprintf(stderr, "epctl: unknown command '%s'\n", cmd);
    usage_main(stderr);
    return EXIT_USAGE;
}
