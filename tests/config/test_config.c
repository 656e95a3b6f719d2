/* Tests of the config model: a table of bad configs with the exact messages and error counts
 * expected, file-system and file-loading checks, defaults, the examples, dump -> parse round
 * trips, the fingerprint (against a SHA-256 computed here) and diffs. */
#include <errno.h>
#include <fcntl.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>

#include <cjson/cJSON.h>
#include <openssl/evp.h>

#include "epd_config.h"

#define SKIP_FS EPD_CONFIG_SKIP_FS_CHECKS

/* ---- helpers ---- */

static int count_of(const epd_config_errors_t *e)
{
    return e->count + e->dropped;
}

static void dump_errors(const char *name, const epd_config_errors_t *e)
{
    fprintf(stderr, "case %s: %d error(s):\n", name, count_of(e));
    epd_config_errors_print(e, stderr);
}

static bool has_msg(const epd_config_errors_t *e, const char *want)
{
    for (int i = 0; i < e->count; i++)
        if (strstr(e->msgs[i], want)) return true;
    return false;
}

static char *read_all(const char *path)
{
    FILE *f = fopen(path, "rb");
    assert_non_null(f);
    char *buf = malloc(1 << 20);
    assert_non_null(buf);
    size_t n = fread(buf, 1, (1 << 20) - 1, f);
    buf[n] = '\0';
    fclose(f);
    return buf;
}

static void write_file(const char *path, const char *text, size_t len, mode_t mode)
{
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, mode);
    assert_true(fd >= 0);
    assert_int_equal(write(fd, text, len), (ssize_t)len);
    assert_int_equal(fchmod(fd, mode), 0);
    close(fd);
}

/* A scratch directory with a model directory and a proper secret; removed by rm_scratch. */
typedef struct scratch {
    char dir[256], model[300], secret[300];
} scratch_t;

static void make_scratch(scratch_t *s)
{
    snprintf(s->dir, sizeof(s->dir), "/tmp/epd-config-test-XXXXXX");
    assert_non_null(mkdtemp(s->dir));
    snprintf(s->model, sizeof(s->model), "%s/model", s->dir);
    snprintf(s->secret, sizeof(s->secret), "%s/cluster.secret", s->dir);
    assert_int_equal(mkdir(s->model, 0755), 0);
    write_file(s->secret, "0123456789abcdef0123456789abcdef", 32, 0600);
}

static void rm_scratch(const scratch_t *s)
{
    char cmd[600];
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", s->dir);
    assert_int_equal(system(cmd), 0);
}

/* Replaces every occurrence of `from` by `to` in text (malloc'd result). */
static char *replace(const char *text, const char *from, const char *to)
{
    size_t fl = strlen(from), tl = strlen(to), n = 0;
    for (const char *p = strstr(text, from); p; p = strstr(p + fl, from))
        n++;
    char *out = malloc(strlen(text) + n * tl + 1), *o = out;
    assert_non_null(out);
    const char *p = text, *q;
    while ((q = strstr(p, from))) {
        memcpy(o, p, (size_t)(q - p));
        o += q - p;
        memcpy(o, to, tl);
        o += tl;
        p = q + fl;
    }
    strcpy(o, p);
    return out;
}

/* ---- the table of bad configs ---- */

typedef struct bad_case {
    const char *name;
    const char *json;
    size_t len; /* 0: strlen(json) */
    unsigned flags;
    int count;             /* exact number of errors */
    const char *expect[8]; /* each a substring of some message */
    const char *absent;    /* a substring no message may contain */
} bad_case_t;

#define LONG64 "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
#define PEER(i, p) "{\"id\": " #i ", \"host\": \"10.0.0." #i "\", \"port\": " #p "}"
#define SECRET "\"secret_file\": \"/etc/epd/cluster.secret\""

static const bad_case_t bad_cases[] = {
    {"empty", "", 0, 0, 1, {"bad.json: file is empty"}},
    {"whitespace only", " \n\t\n ", 0, 0, 1, {"bad.json: file is empty"}},
    {"syntax: trailing comma",
     "{\n  \"node\": {\"id\": 1,}\n}",
     0,
     0,
     1,
     {"bad.json:2:21: invalid JSON at byte 22"}},
    {"syntax: garbage after the object",
     "{} x",
     0,
     0,
     1,
     {"bad.json:1:4: invalid JSON at byte 3, near \"{} x\""}},
    {"syntax: truncated",
     "{\"node\": ",
     0,
     0,
     1,
     {"bad.json:1:10: invalid JSON: unexpected end of input (byte 9)"}},
    {"syntax: third line",
     "{\n\"log\": {\n\"level\": info}\n}",
     0,
     0,
     1,
     {"bad.json:3:10: invalid JSON at byte 20"}},
    {"NUL byte", "{}\0{}", 5, 0, 1, {"bad.json:1:3: NUL byte at byte 2"}},
    {"top level array",
     "[1, 2]",
     0,
     0,
     1,
     {"bad.json: expected a JSON object at the top level, got an array"}},
    {"top level string",
     "\"x\"",
     0,
     0,
     1,
     {"bad.json: expected a JSON object at the top level, got \"x\""}},
    {"unknown key with suggestion",
     "{\"cluster\": {\"listn\": {}}}",
     0,
     0,
     1,
     {"bad.json: cluster.listn: unknown key; did you mean 'listen'?"}},
    {"unknown key transposed",
     "{\"http\": {\"listen\": {\"prot\": 80}}}",
     0,
     0,
     1,
     {"bad.json: http.listen.prot: unknown key; did you mean 'port'?"}},
    {"unknown key, nothing close",
     "{\"bogus\": 1}",
     0,
     0,
     1,
     {"bad.json: bogus: unknown key"},
     "did you mean"},
    {"dotted key",
     "{\"cluster.name\": \"x\"}",
     0,
     0,
     1,
     {"bad.json: cluster.name: unknown key (nest sections as objects"}},
    {"duplicate key",
     "{\"node\": {\"id\": 1, \"id\": 2}}",
     0,
     0,
     1,
     {"bad.json: node.id: duplicate key"}},
    {"duplicate section", "{\"log\": {}, \"log\": {}}", 0, 0, 1, {"bad.json: log: duplicate key"}},
    {"section not an object",
     "{\"cluster\": 5}",
     0,
     0,
     1,
     {"bad.json: cluster: expected an object, got 5"}},
    {"integer as string",
     "{\"node\": {\"id\": \"1\"}}",
     0,
     0,
     1,
     {"bad.json: node.id: expected an integer 0..65535, got \"1\""}},
    {"non-integer number",
     "{\"http\": {\"max_connections\": 1.5}}",
     0,
     0,
     1,
     {"bad.json: http.max_connections: expected an integer 1..65536, got 1.5"}},
    {"port out of range",
     "{\"cluster\": {\"listen\": {\"port\": 70000}}}",
     0,
     0,
     1,
     {"bad.json: cluster.listen.port: expected an integer 1..65535, got 70000"}},
    {"negative timeout",
     "{\"timeouts\": {\"connect_ms\": -5}}",
     0,
     0,
     1,
     {"bad.json: timeouts.connect_ms: expected an integer 10..3600000, got -5"}},
    {"huge number",
     "{\"model\": {\"max_seq_len\": 1e300}}",
     0,
     0,
     1,
     {"bad.json: model.max_seq_len: expected an integer 16..1048576, got 1e+300"}},
    {"empty request queue",
     "{\"model\": {\"max_queued_requests\": 0}}",
     0,
     0,
     1,
     {"bad.json: model.max_queued_requests: expected an integer 1..1048576, got 0"}},
    {"null and bool",
     "{\"node\": {\"id\": null}, \"compute\": {\"num_sms\": true}}",
     0,
     0,
     2,
     {"bad.json: node.id: expected an integer 0..65535, got null",
      "bad.json: compute.num_sms: expected an integer 1..256, got true"}},
    {"size too small",
     "{\"http\": {\"max_body_bytes\": 10}}",
     0,
     0,
     1,
     {"bad.json: http.max_body_bytes: expected an integer 1024..67108864, got 10"}},
    {"bad enum",
     "{\"compute\": {\"backend\": \"gpu\"}}",
     0,
     0,
     1,
     {"bad.json: compute.backend: expected one of \"cpu\", \"cuda\", got \"gpu\""},
     "did you mean"},
    {"enum in the wrong case",
     "{\"compute\": {\"backend\": \"CUDA\"}}",
     0,
     0,
     1,
     {"got \"CUDA\"; did you mean \"cuda\"?"}},
    {"enum not a string",
     "{\"log\": {\"level\": 3}}",
     0,
     0,
     1,
     {"bad.json: log.level: expected one of \"error\", \"warn\", \"info\", \"debug\", got 3"}},
    {"transport typo",
     "{\"compute\": {\"transport\": \"rmda\"}}",
     0,
     0,
     1,
     {"bad.json: compute.transport: expected one of \"tcp\", \"nvlink\", \"rdma\", got \"rmda\"; "
      "did you mean \"rdma\"?"}},
    {"string too long",
     "{\"node\": {\"name\": \"" LONG64 "\"}}",
     0,
     0,
     1,
     {"bad.json: node.name: string too long: 64 bytes, at most 63"}},
    {"string not a string",
     "{\"cluster\": {\"name\": 7}}",
     0,
     0,
     1,
     {"bad.json: cluster.name: expected a string, got 7"}},
    {"empty host",
     "{\"http\": {\"listen\": {\"host\": \"\"}}}",
     0,
     0,
     1,
     {"bad.json: http.listen.host: must not be empty"}},
    {"host with a space",
     "{\"cluster\": {\"listen\": {\"host\": \"local host\"}}}",
     0,
     0,
     1,
     {"bad.json: cluster.listen.host: invalid character ' ' at offset 5 of \"local host\""}},
    {"cluster name with a space",
     "{\"cluster\": {\"name\": \"my cluster\"}}",
     0,
     0,
     1,
     {"bad.json: cluster.name: invalid character ' ' at offset 2"}},
    {"control character in name",
     "{\"node\": {\"name\": \"a\\u0001b\"}}",
     0,
     0,
     1,
     {"bad.json: node.name: invalid character '\\x01' at offset 1"}},
    {"relative model path",
     "{\"model\": {\"path\": \"models/qwen\"}}",
     0,
     SKIP_FS,
     1,
     {"bad.json: model.path: expected an absolute path (the daemon runs from /), got "
      "\"models/qwen\""}},
    {"peers not an array",
     "{\"cluster\": {\"peers\": {}}}",
     0,
     0,
     1,
     {"bad.json: cluster.peers: expected an array of objects, got an object"}},
    {"peer not an object",
     "{\"cluster\": {\"peers\": [5], " SECRET "}}",
     0,
     SKIP_FS,
     1,
     {"bad.json: cluster.peers[0]: expected an object, got 5"}},
    {"peer missing fields",
     "{\"cluster\": {\"peers\": [{\"id\": 1}], " SECRET "}}",
     0,
     SKIP_FS,
     2,
     {"bad.json: cluster.peers[0].host: missing (required)",
      "bad.json: cluster.peers[0].port: missing (required)"}},
    {"peer port not an integer",
     "{\"cluster\": {\"peers\": [" PEER(1, 7420) ", " PEER(
         2, 7420) ", "
                  "{\"id\": 3, \"host\": \"10.0.0.3\", \"port\": \"x\"}], " SECRET "}}",
     0,
     SKIP_FS,
     1,
     {"bad.json: cluster.peers[2].port: expected an integer 1..65535, got \"x\""}},
    {"peer unknown key",
     "{\"cluster\": {\"peers\": [{\"id\": 1, \"host\": \"h\", \"port\": 1, "
     "\"prot\": 2}], " SECRET "}}",
     0,
     SKIP_FS,
     1,
     {"bad.json: cluster.peers[0].prot: unknown key; did you mean 'port'?"}},
    {"duplicate key in a peer",
     "{\"cluster\": {\"peers\": [{\"id\": 1, \"host\": \"10.0.0.9\", \"port\": 7420, "
     "\"port\": 7421}], " SECRET "}}",
     0,
     SKIP_FS,
     1,
     {"bad.json: cluster.peers[0].port: duplicate key"}},
    {"duplicate peer ids",
     "{\"cluster\": {\"peers\": [" PEER(1, 7420) ", {\"id\": 1, \"host\": \"10.0.0.9\", "
                                                 "\"port\": 7420}], " SECRET "}}",
     0,
     SKIP_FS,
     1,
     {"bad.json: cluster.peers[1].id: duplicate peer id 1 (also cluster.peers[0])"}},
    {"duplicate peer addresses",
     "{\"cluster\": {\"peers\": [" PEER(2, 7420) ", {\"id\": 3, \"host\": \"10.0.0.2\", "
                                                 "\"port\": 7420}], " SECRET "}}",
     0,
     SKIP_FS,
     1,
     {"bad.json: cluster.peers[1]: duplicate address 10.0.0.2:7420 (also cluster.peers[0])"}},
    {"peer is this node",
     "{\"node\": {\"id\": 4}, \"cluster\": {\"peers\": [" PEER(4, 7420) "], " SECRET "}}",
     0,
     SKIP_FS,
     1,
     {"bad.json: cluster.peers[0].id: 4 is this node's own node.id"}},
    {"peer at our own address",
     "{\"cluster\": {\"listen\": {\"host\": \"10.0.0.5\", \"port\": 7420}, \"peers\": [" PEER(
         5, 7420) "], " SECRET "}}",
     0,
     SKIP_FS,
     1,
     {"bad.json: cluster.peers[0]: address 10.0.0.5:7420 is this node's own cluster.listen"}},
    {"peers without a secret",
     "{\"cluster\": {\"peers\": [" PEER(1, 7420) "]}}",
     0,
     0,
     1,
     {"bad.json: cluster.secret_file: required when cluster.peers is not empty"}},
    {"too many peers",
     NULL,
     0,
     SKIP_FS,
     1,
     {"bad.json: cluster.peers: too many entries: 257, at most 256"}},
    {"KV settings out of range",
     "{\"model\": {\"kv_block_size\": 0, \"kv_memory_fraction\": 0, \"kv_blocks\": -1, "
     "\"max_seqs_per_rank\": 0, \"cuda_graphs\": 1, \"fp8_dispatch\": \"no\"}}",
     0,
     0,
     6,
     {"bad.json: model.kv_block_size: expected an integer 1..1024, got 0",
      "bad.json: model.kv_memory_fraction: expected a number in (0, 1], got 0",
      "bad.json: model.kv_blocks: expected an integer 0..1073741824, got -1",
      "bad.json: model.max_seqs_per_rank: expected an integer 1..4096, got 0",
      "bad.json: model.cuda_graphs: expected true or false, got 1",
      "bad.json: model.fp8_dispatch: expected true or false, got \"no\""}},
    {"GPU ordinal out of range",
     "{\"compute\": {\"backend\": \"cuda\", \"gpus\": [64]}}",
     0,
     0,
     1,
     {"bad.json: compute.gpus[0]: expected an integer 0..63, got 64"}},
    {"too many GPUs",
     "{\"compute\": {\"backend\": \"cuda\", \"gpus\": [0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16]}}",
     0,
     0,
     1,
     {"bad.json: compute.gpus: too many entries: 17, at most 16"}},
    {"cuda without GPUs",
     "{\"compute\": {\"backend\": \"cuda\"}}",
     0,
     0,
     1,
     {"bad.json: compute.gpus: backend \"cuda\" needs at least one GPU"}},
    {"cpu with GPUs",
     "{\"compute\": {\"gpus\": [0]}}",
     0,
     0,
     1,
     {"bad.json: compute.gpus: only used with backend \"cuda\" (backend is \"cpu\")"}},
    {"ranks_per_node against GPUs",
     "{\"compute\": {\"backend\": \"cuda\", \"gpus\": [0, 1], \"ranks_per_node\": 4}}",
     0,
     0,
     1,
     {"bad.json: compute.ranks_per_node: with backend \"cuda\" it is the number of compute.gpus "
      "(2), got 4"}},
    {"nvlink on cpu",
     "{\"compute\": {\"transport\": \"nvlink\"}}",
     0,
     0,
     1,
     {"bad.json: compute.transport: \"nvlink\" needs backend \"cuda\""}},
    {"nvlink across nodes",
     "{\"compute\": {\"backend\": \"cuda\", \"gpus\": [0], \"transport\": \"nvlink\"}, "
     "\"cluster\": {\"peers\": [" PEER(1, 7420) "], " SECRET "}}",
     0,
     SKIP_FS,
     1,
     {"bad.json: compute.transport: \"nvlink\" joins the GPUs of one node"}},
    {"explicit placement without map",
     "{\"model\": {\"placement\": \"explicit\"}}",
     0,
     0,
     1,
     {"bad.json: model.expert_map: placement \"explicit\" needs an expert map"}},
    {"map with contiguous placement",
     "{\"model\": {\"expert_map\": [0, 1]}}",
     0,
     0,
     1,
     {"bad.json: model.expert_map: only used with placement \"explicit\""}},
    {"map entry not an integer",
     "{\"model\": {\"placement\": \"explicit\", \"expert_map\": [0, \"a\", 1.5]}}",
     0,
     0,
     2,
     {"bad.json: model.expert_map[1]: expected an integer 0..4111, got \"a\"",
      "bad.json: model.expert_map[2]: expected an integer 0..4111, got 1.5"}},
    {"map not an array",
     "{\"model\": {\"placement\": \"explicit\", \"expert_map\": \"0,1\"}}",
     0,
     0,
     1,
     {"bad.json: model.expert_map: expected an array of integers, got \"0,1\""}},
    {"heartbeat timeout not above interval",
     "{\"timeouts\": {\"heartbeat_interval_ms\": 1000, \"heartbeat_timeout_ms\": 1000}}",
     0,
     0,
     1,
     {"bad.json: timeouts.heartbeat_timeout_ms: must exceed timeouts.heartbeat_interval_ms "
      "(1000), got 1000"}},
    {"http and cluster on one port",
     "{\"http\": {\"listen\": {\"host\": \"127.0.0.1\", \"port\": 7420}}}",
     0,
     0,
     1,
     {"bad.json: http.listen.port: 7420 is also cluster.listen.port on an overlapping address"}},
    {"model path missing",
     "{\"model\": {\"path\": \"/nonexistent/epd-test-model\"}}",
     0,
     0,
     1,
     {"bad.json: model.path: cannot access \"/nonexistent/epd-test-model\": No such file or "
      "directory"}},
    {"secret missing",
     "{\"cluster\": {\"peers\": [" PEER(1, 7420) "], \"secret_file\": \"/nonexistent/s\"}}",
     0,
     0,
     1,
     {"bad.json: cluster.secret_file: cannot access \"/nonexistent/s\": No such file"}},
    {"several errors at once",
     "{\"node\": {\"id\": -1, \"name\": \"\"}, \"compute\": {\"backend\": \"gpu\", \"num_sms\": "
     "0},\n \"log\": {\"level\": \"loud\"}, \"bogus\": true, \"timeouts\": "
     "{\"heartbeat_timeout_ms\": "
     "50, \"heartbeat_interval_ms\": 100}}",
     0,
     0,
     7,
     {"bad.json: node.id: expected an integer 0..65535, got -1",
      "bad.json: node.name: must not be empty",
      "bad.json: compute.backend: expected one of \"cpu\", \"cuda\", got \"gpu\"",
      "bad.json: compute.num_sms: expected an integer 1..256, got 0",
      "bad.json: log.level: expected one of \"error\", \"warn\", \"info\", \"debug\", got \"loud\"",
      "bad.json: bogus: unknown key",
      "bad.json: timeouts.heartbeat_timeout_ms: must exceed timeouts.heartbeat_interval_ms (100), "
      "got 50"}},
    {"errors in peers and rules together",
     "{\"cluster\": {\"peers\": [" PEER(1, 7420) ", " PEER(1, 0) ", " PEER(
         2, 7420) "]}, "
                  "\"compute\": {\"backend\": \"cuda\", \"gpus\": [3, 64]}}",
     0,
     0,
     3,
     {"bad.json: cluster.peers[1].port: expected an integer 1..65535, got 0",
      "bad.json: compute.gpus[1]: expected an integer 0..63, got 64",
      "bad.json: cluster.secret_file: required when cluster.peers is not empty"}},
};

/* 257 peers: one more than EPD_CFG_MAX_PEERS */
static char *too_many_peers(void)
{
    size_t cap = 64 + 257 * 64;
    char *s = malloc(cap), *o = s;
    assert_non_null(s);
    o += sprintf(o, "{\"cluster\": {" SECRET ", \"peers\": [");
    for (int i = 0; i < 257; i++)
        o += sprintf(o, "%s{\"id\": %d, \"host\": \"h%d\", \"port\": 7420}", i ? ", " : "", i + 1,
                     i);
    sprintf(o, "]}}");
    return s;
}

static void test_bad_configs(void **state)
{
    (void)state;
    int failures = 0;
    for (size_t k = 0; k < sizeof(bad_cases) / sizeof(bad_cases[0]); k++) {
        const bad_case_t *c = &bad_cases[k];
        char *generated = c->json ? NULL : too_many_peers();
        const char *json = c->json ? c->json : generated;
        size_t len = c->len ? c->len : strlen(json);
        epd_config_t cfg;
        epd_config_errors_t errs;
        int rc = epd_config_parse_ex(json, len, "bad.json", c->flags, &cfg, &errs);
        bool good = rc == -EINVAL && errs.status == rc && count_of(&errs) == c->count;
        for (int i = 0; i < 8 && c->expect[i]; i++) {
            if (!has_msg(&errs, c->expect[i])) {
                fprintf(stderr, "case %s: missing message: %s\n", c->name, c->expect[i]);
                good = false;
            }
        }
        if (c->absent) {
            for (int i = 0; i < errs.count; i++)
                if (strstr(errs.msgs[i], c->absent)) good = false;
        }
        if (!good) {
            fprintf(stderr, "case %s: rc %d, expected %d error(s)\n", c->name, rc, c->count);
            dump_errors(c->name, &errs);
            failures++;
        }
        epd_config_errors_free(&errs);
        free(generated);
    }
    assert_int_equal(failures, 0);
}

static void test_error_cap(void **state)
{
    (void)state;
    char json[200 * 24] = "{";
    size_t o = 1;
    for (int i = 0; i < 150; i++)
        o += (size_t)sprintf(json + o, "%s\"zz%03d\": 1", i ? ", " : "", i);
    strcpy(json + o, "}");
    epd_config_t cfg;
    epd_config_errors_t errs;
    assert_int_equal(epd_config_parse(json, strlen(json), "many.json", &cfg, &errs), -EINVAL);
    assert_int_equal(errs.count, EPD_CFG_MAX_ERRORS);
    assert_int_equal(errs.dropped, 150 - EPD_CFG_MAX_ERRORS);
    assert_string_equal(errs.msgs[0], "many.json: zz000: unknown key");
    char *text = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&text, &len);
    epd_config_errors_print(&errs, f);
    fclose(f);
    assert_non_null(strstr(text, "many.json: zz099: unknown key\n"));
    assert_null(strstr(text, "zz100"));
    assert_non_null(strstr(text, "... and 50 more errors not shown\n"));
    free(text);
    epd_config_errors_free(&errs);
}

/* ---- file-system checks ---- */

static int fs_errors(const char *json, const char *want)
{
    epd_config_t cfg;
    epd_config_errors_t errs;
    epd_config_parse(json, strlen(json), "fs.json", &cfg, &errs);
    int n = count_of(&errs);
    if (want && !has_msg(&errs, want)) {
        dump_errors(want, &errs);
        n = -1;
    }
    epd_config_errors_free(&errs);
    return n;
}

static void test_filesystem_checks(void **state)
{
    (void)state;
    scratch_t s;
    make_scratch(&s);
    char json[2048], want[1024], file[400];

    /* a proper model directory and secret pass */
    snprintf(json, sizeof(json),
             "{\"model\": {\"path\": \"%s\"}, \"cluster\": {\"peers\": [" PEER(
                 1, 7420) "], \"secret_file\": \"%s\"}}",
             s.model, s.secret);
    assert_int_equal(fs_errors(json, NULL), 0);

    /* the model path is a file */
    snprintf(json, sizeof(json), "{\"model\": {\"path\": \"%s\"}}", s.secret);
    snprintf(want, sizeof(want), "fs.json: model.path: \"%s\" is not a directory", s.secret);
    assert_int_equal(fs_errors(json, want), 1);

    /* a secret readable by others: the actual mode is named */
    snprintf(file, sizeof(file), "%s/open.secret", s.dir);
    write_file(file, "0123456789abcdef0123", 20, 0644);
    snprintf(json, sizeof(json),
             "{\"cluster\": {\"peers\": [" PEER(1, 7420) "], \"secret_file\": \"%s\"}}", file);
    snprintf(want, sizeof(want),
             "fs.json: cluster.secret_file: \"%s\" has mode 0644; a secret must be readable by "
             "its owner only (0600)",
             file);
    assert_int_equal(fs_errors(json, want), 1);
    assert_int_equal(chmod(file, 0640), 0);
    snprintf(want, sizeof(want), "\"%s\" has mode 0640", file);
    assert_int_equal(fs_errors(json, want), 1);
    assert_int_equal(chmod(file, 0400), 0);
    assert_int_equal(fs_errors(json, NULL), 0);

    /* a secret too short to be one */
    snprintf(file, sizeof(file), "%s/short.secret", s.dir);
    write_file(file, "abc", 3, 0600);
    snprintf(json, sizeof(json),
             "{\"cluster\": {\"peers\": [" PEER(1, 7420) "], \"secret_file\": \"%s\"}}", file);
    snprintf(want, sizeof(want),
             "fs.json: cluster.secret_file: \"%s\" holds 3 bytes; a secret needs at least 16",
             file);
    assert_int_equal(fs_errors(json, want), 1);

    /* a directory as the secret */
    snprintf(json, sizeof(json),
             "{\"cluster\": {\"peers\": [" PEER(1, 7420) "], \"secret_file\": \"%s\"}}", s.model);
    snprintf(want, sizeof(want), "fs.json: cluster.secret_file: \"%s\" is not a regular file",
             s.model);
    assert_int_equal(fs_errors(json, want), 1);

    /* unreadable files: only meaningful where permissions bind (not as root) */
    if (geteuid() != 0) {
        snprintf(file, sizeof(file), "%s/locked", s.dir);
        assert_int_equal(mkdir(file, 0), 0);
        snprintf(json, sizeof(json), "{\"model\": {\"path\": \"%s\"}}", file);
        snprintf(want, sizeof(want), "fs.json: model.path: directory \"%s\" is not readable", file);
        assert_int_equal(fs_errors(json, want), 1);
        assert_int_equal(chmod(file, 0700), 0);
        snprintf(file, sizeof(file), "%s/locked.secret", s.dir);
        write_file(file, "0123456789abcdef0123", 20, 0000);
        snprintf(json, sizeof(json),
                 "{\"cluster\": {\"peers\": [" PEER(1, 7420) "], \"secret_file\": \"%s\"}}", file);
        snprintf(want, sizeof(want), "fs.json: cluster.secret_file: cannot read \"%s\"", file);
        assert_int_equal(fs_errors(json, want), 1);
    }

    /* the same config passes when the file-system checks are skipped */
    snprintf(json, sizeof(json), "{\"model\": {\"path\": \"/nonexistent/model\"}}");
    epd_config_t cfg;
    epd_config_errors_t errs;
    assert_int_equal(epd_config_parse_ex(json, strlen(json), "fs.json", SKIP_FS, &cfg, &errs), 0);
    epd_config_errors_free(&errs);
    rm_scratch(&s);
}

static void test_load_files(void **state)
{
    (void)state;
    scratch_t s;
    make_scratch(&s);
    char path[400], want[600];
    epd_config_t cfg;
    epd_config_errors_t errs;

    snprintf(path, sizeof(path), "%s/absent.json", s.dir);
    assert_int_equal(epd_config_load(path, &cfg, &errs), -ENOENT);
    assert_int_equal(errs.status, -ENOENT);
    snprintf(want, sizeof(want), "%s: cannot open: No such file or directory", path);
    assert_int_equal(errs.count, 1);
    assert_string_equal(errs.msgs[0], want);
    epd_config_errors_free(&errs);

    assert_int_equal(epd_config_load(s.dir, &cfg, &errs), -EINVAL);
    snprintf(want, sizeof(want), "%s: not a regular file", s.dir);
    assert_int_equal(errs.count, 1);
    assert_string_equal(errs.msgs[0], want);
    epd_config_errors_free(&errs);

    snprintf(path, sizeof(path), "%s/empty.json", s.dir);
    write_file(path, "", 0, 0644);
    assert_int_equal(epd_config_load(path, &cfg, &errs), -EINVAL);
    snprintf(want, sizeof(want), "%s: file is empty", path);
    assert_int_equal(errs.count, 1);
    assert_non_null(strstr(errs.msgs[0], want));
    epd_config_errors_free(&errs);

    /* one byte over the limit: refused before parsing */
    size_t big = EPD_CFG_MAX_FILE_BYTES + 1;
    char *text = malloc(big);
    assert_non_null(text);
    memset(text, ' ', big);
    text[0] = '{';
    text[big - 1] = '}';
    snprintf(path, sizeof(path), "%s/big.json", s.dir);
    write_file(path, text, big, 0644);
    assert_int_equal(epd_config_load(path, &cfg, &errs), -EFBIG);
    snprintf(want, sizeof(want), "%s: 1048577 bytes, larger than the limit of 1048576 bytes", path);
    assert_int_equal(errs.count, 1);
    assert_string_equal(errs.msgs[0], want);
    epd_config_errors_free(&errs);
    /* exactly at the limit it is fine */
    text[1] = '{';
    write_file(path, text + 1, big - 1, 0644);
    assert_int_equal(epd_config_load(path, &cfg, &errs), 0);
    epd_config_errors_free(&errs);
    free(text);

    /* errors in a loaded file name the file */
    snprintf(path, sizeof(path), "%s/bad.json", s.dir);
    write_file(path, "{\"node\": {\"id\": \"x\"}}", 21, 0644);
    assert_int_equal(epd_config_load(path, &cfg, &errs), -EINVAL);
    snprintf(want, sizeof(want), "%s: node.id: expected an integer 0..65535, got \"x\"", path);
    assert_int_equal(errs.count, 1);
    assert_string_equal(errs.msgs[0], want);
    epd_config_errors_free(&errs);
    rm_scratch(&s);
}

/* ---- defaults ---- */

static void test_defaults(void **state)
{
    (void)state;
    epd_config_t cfg;
    epd_config_errors_t errs;
    assert_int_equal(epd_config_parse("{}", 2, "empty.json", &cfg, &errs), 0);
    assert_int_equal(errs.count, 0);
    epd_config_errors_free(&errs);

    char host[256] = {0};
    assert_int_equal(gethostname(host, sizeof(host) - 1), 0);
    host[63] = '\0';
    assert_string_equal(cfg.name, host);
    assert_int_equal(cfg.node_id, 0);
    assert_string_equal(cfg.cluster_name, "epd");
    assert_string_equal(cfg.listen.host, "0.0.0.0");
    assert_int_equal(cfg.listen.port, 7420);
    assert_int_equal(cfg.num_peers, 0);
    assert_string_equal(cfg.secret_file, "");
    assert_string_equal(cfg.http.host, "127.0.0.1");
    assert_int_equal(cfg.http.port, 8080);
    assert_int_equal(cfg.http_max_header_bytes, 16384);
    assert_int_equal(cfg.http_max_body_bytes, 1048576);
    assert_int_equal(cfg.http_idle_timeout_ms, 30000);
    assert_int_equal(cfg.http_max_connections, 256);
    assert_int_equal(cfg.backend, EPD_BACKEND_CPU);
    assert_int_equal(cfg.transport, EPD_TRANSPORT_TCP);
    assert_int_equal(cfg.num_gpus, 0);
    assert_int_equal(cfg.num_sms, 8);
    assert_int_equal(cfg.ranks_per_node, 1);
    assert_string_equal(cfg.model_path, "");
    assert_int_equal(cfg.placement, EPD_PLACEMENT_CONTIGUOUS);
    assert_int_equal(cfg.num_expert_map, 0);
    assert_int_equal(cfg.max_batch_tokens, 128);
    assert_int_equal(cfg.max_seq_len, 4096);
    assert_int_equal(cfg.max_queued_requests, 256);
    assert_int_equal(cfg.kv_block_size, 16);
    assert_true(cfg.kv_memory_fraction == 0.9);
    assert_int_equal(cfg.kv_blocks, 0);
    assert_int_equal(cfg.max_seqs_per_rank, 64);
    assert_int_equal(cfg.cuda_graphs, 1);
    assert_int_equal(cfg.fp8_dispatch, 0);
    assert_int_equal(cfg.connect_timeout_ms, 5000);
    assert_int_equal(cfg.heartbeat_interval_ms, 1000);
    assert_int_equal(cfg.heartbeat_timeout_ms, 5000);
    assert_int_equal(cfg.ep_timeout_ms, 10000);
    assert_int_equal(cfg.shutdown_timeout_ms, 10000);
    assert_int_equal(cfg.log_level, EPD_LOG_INFO);

    /* epd_config_defaults gives the same as parsing "{}" */
    epd_config_t d;
    epd_config_defaults(&d);
    assert_memory_equal(&d, &cfg, sizeof(cfg));

    /* two ranks may share a GPU */
    const char *shared = "{\"compute\": {\"backend\": \"cuda\", \"transport\": \"nvlink\", "
                         "\"gpus\": [0, 0]}, \"model\": {\"kv_memory_fraction\": 0.5, "
                         "\"cuda_graphs\": false}}";
    assert_int_equal(epd_config_parse(shared, strlen(shared), "shared.json", &cfg, &errs), 0);
    epd_config_errors_free(&errs);
    assert_int_equal(cfg.ranks_per_node, 2);
    assert_true(cfg.kv_memory_fraction == 0.5);
    assert_int_equal(cfg.cuda_graphs, 0);

    assert_string_equal(epd_backend_name(EPD_BACKEND_CUDA), "cuda");
    assert_string_equal(epd_transport_name(EPD_TRANSPORT_RDMA), "rdma");
    assert_string_equal(epd_log_level_name(EPD_LOG_WARN), "warn");
    assert_string_equal(epd_placement_name(EPD_PLACEMENT_EXPLICIT), "explicit");
}

/* ---- examples ---- */

static void load_example(const char *rel, unsigned flags, epd_config_t *cfg)
{
    char path[1024];
    epd_config_errors_t errs;
    snprintf(path, sizeof(path), "%s/%s", EPD_CONFIG_EXAMPLES_DIR, rel);
    int rc = epd_config_load_ex(path, flags, cfg, &errs);
    if (rc != 0) dump_errors(rel, &errs);
    assert_int_equal(rc, 0);
    epd_config_errors_free(&errs);
}

static void test_examples(void **state)
{
    (void)state;
    static epd_config_t one, gpu, n0, n1;
    load_example("single-node-cpu.json", 0, &one);
    assert_int_equal(one.backend, EPD_BACKEND_CPU);
    assert_int_equal(one.ranks_per_node, 2);
    assert_int_equal(one.num_peers, 0);

    /* model.path and secret_file name paths on a deployed machine */
    load_example("two-gpu.json", SKIP_FS, &gpu);
    assert_int_equal(gpu.backend, EPD_BACKEND_CUDA);
    assert_int_equal(gpu.transport, EPD_TRANSPORT_NVLINK);
    assert_int_equal(gpu.num_gpus, 2);
    assert_int_equal(gpu.gpus[0], 0);
    assert_int_equal(gpu.gpus[1], 1);
    assert_int_equal(gpu.ranks_per_node, 2);

    load_example("two-nodes/node0.json", SKIP_FS, &n0);
    load_example("two-nodes/node1.json", SKIP_FS, &n1);
    assert_int_equal(n0.num_peers, 1);
    assert_int_equal(n1.num_peers, 1);
    assert_int_equal(n0.peers[0].node_id, n1.node_id);
    assert_int_equal(n1.peers[0].node_id, n0.node_id);
    assert_int_equal(n0.peers[0].addr.port, n1.listen.port);
    assert_int_equal(n1.peers[0].addr.port, n0.listen.port);
    assert_string_equal(n0.secret_file, n1.secret_file);

    /* the pair forms one cluster; the other examples do not match it */
    char why[256];
    assert_int_equal(epd_config_diff(&n0, &n1, why, sizeof(why)), 0);
    char f0[65], f1[65], fo[65];
    assert_int_equal(epd_config_fingerprint_hex(&n0, f0), 0);
    assert_int_equal(epd_config_fingerprint_hex(&n1, f1), 0);
    assert_int_equal(epd_config_fingerprint_hex(&one, fo), 0);
    assert_string_equal(f0, f1);
    assert_string_not_equal(f0, fo);
    assert_int_equal(epd_config_diff(&n0, &one, why, sizeof(why)), 1);
    assert_string_equal(why, "cluster.name: \"pair\" vs \"dev\"");
}

/* The examples with their deployment paths pointed at real files pass the full checks. */
static void test_examples_with_files(void **state)
{
    (void)state;
    scratch_t s;
    make_scratch(&s);
    const char *files[][3] = {
        {"two-gpu.json", "/var/lib/epd/models/Qwen3-30B-A3B", s.model},
        {"two-nodes/node0.json", "/etc/epd/cluster.secret", s.secret},
        {"two-nodes/node1.json", "/etc/epd/cluster.secret", s.secret},
    };
    for (size_t i = 0; i < sizeof(files) / sizeof(files[0]); i++) {
        char path[1024];
        snprintf(path, sizeof(path), "%s/%s", EPD_CONFIG_EXAMPLES_DIR, files[i][0]);
        char *text = read_all(path);
        assert_non_null(strstr(text, files[i][1]));
        char *local = replace(text, files[i][1], files[i][2]);
        epd_config_t cfg;
        epd_config_errors_t errs;
        int rc = epd_config_parse(local, strlen(local), files[i][0], &cfg, &errs);
        if (rc != 0) dump_errors(files[i][0], &errs);
        assert_int_equal(rc, 0);
        epd_config_errors_free(&errs);
        /* and without the files the same text fails on the file system */
        rc = epd_config_parse(text, strlen(text), files[i][0], &cfg, &errs);
        if (access(files[i][1], F_OK) != 0) {
            assert_int_equal(rc, -EINVAL);
            assert_int_equal(errs.count, 1);
            assert_non_null(strstr(errs.msgs[0], "cannot access"));
        }
        epd_config_errors_free(&errs);
        free(local);
        free(text);
    }
    rm_scratch(&s);
}

/* ---- round trip, fingerprint, diff ---- */

static const char rich[] =
    "{\"node\": {\"id\": 7, \"name\": \"n7 (rack 3)\"},"
    " \"cluster\": {\"name\": \"big\", \"listen\": {\"host\": \"::\", \"port\": 9000},"
    "   \"peers\": [{\"id\": 1, \"host\": \"a.example\", \"port\": 9000},"
    "               {\"id\": 2, \"host\": \"fe80::1%eth0\", \"port\": 9001}],"
    "   \"secret_file\": \"/etc/epd/s\"},"
    " \"http\": {\"listen\": {\"host\": \"0.0.0.0\", \"port\": 80}, \"max_header_bytes\": 2048,"
    "   \"max_body_bytes\": 4096, \"idle_timeout_ms\": 100, \"max_connections\": 3},"
    " \"compute\": {\"backend\": \"cuda\", \"transport\": \"rdma\", \"gpus\": [3, 1, 2],"
    "   \"num_sms\": 24},"
    " \"model\": {\"path\": \"/m\", \"placement\": \"explicit\", \"expert_map\": [0, 1, 2, 0, 5],"
    "   \"max_batch_tokens\": 64, \"max_seq_len\": 32768},"
    " \"timeouts\": {\"connect_ms\": 11, \"heartbeat_interval_ms\": 12, \"heartbeat_timeout_ms\": "
    "30, \"ep_op_ms\": 14, \"shutdown_ms\": 0},"
    " \"log\": {\"level\": \"debug\"}}";

static void parse_ok(const char *json, epd_config_t *cfg)
{
    epd_config_errors_t errs;
    int rc = epd_config_parse_ex(json, strlen(json), "rt.json", SKIP_FS, cfg, &errs);
    if (rc != 0) dump_errors("parse_ok", &errs);
    assert_int_equal(rc, 0);
    epd_config_errors_free(&errs);
}

static void test_round_trip(void **state)
{
    (void)state;
    static epd_config_t a, b, d;
    parse_ok(rich, &a);
    assert_int_equal(a.ranks_per_node, 3); /* cuda: one rank per GPU */
    char *text = epd_config_dump_json(&a);
    assert_non_null(text);
    parse_ok(text, &b);
    assert_memory_equal(&a, &b, sizeof(a));
    char why[256];
    assert_int_equal(epd_config_diff_all(&a, &b, why, sizeof(why)), 0);

    /* the dump read by cJSON directly carries the values of `rich` */
    cJSON *root = cJSON_Parse(text);
    assert_non_null(root);
    const cJSON *peers = cJSON_GetObjectItem(cJSON_GetObjectItem(root, "cluster"), "peers");
    assert_int_equal(cJSON_GetArraySize(peers), 2);
    const cJSON *p1 = cJSON_GetArrayItem(peers, 1);
    assert_string_equal(cJSON_GetObjectItem(p1, "host")->valuestring, "fe80::1%eth0");
    assert_int_equal(cJSON_GetObjectItem(p1, "port")->valueint, 9001);
    const cJSON *map = cJSON_GetObjectItem(cJSON_GetObjectItem(root, "model"), "expert_map");
    assert_int_equal(cJSON_GetArraySize(map), 5);
    assert_int_equal(cJSON_GetArrayItem(map, 4)->valueint, 5);
    assert_string_equal(cJSON_GetObjectItem(cJSON_GetObjectItem(root, "log"), "level")->valuestring,
                        "debug");
    assert_int_equal(
        cJSON_GetObjectItem(cJSON_GetObjectItem(root, "http"), "max_body_bytes")->valueint, 4096);
    cJSON_Delete(root);
    free(text);

    /* the defaults round-trip too */
    epd_config_defaults(&d);
    text = epd_config_dump_json(&d);
    parse_ok(text, &b);
    assert_memory_equal(&d, &b, sizeof(d));
    free(text);
}

/* The fingerprint's canonical form written out by hand and hashed here with libcrypto. */
static void test_fingerprint_known_answer(void **state)
{
    (void)state;
    const char canon[] = "epd-config-fingerprint-v1\n"
                         "cluster.name=\"epd\"\n"
                         "compute.backend=\"cpu\"\n"
                         "compute.transport=\"tcp\"\n"
                         "compute.ranks_per_node=1\n"
                         "model.placement=\"contiguous\"\n"
                         "model.expert_map=[]\n"
                         "model.max_batch_tokens=128\n"
                         "model.max_prefill_tokens=512\n"
                         "model.max_seq_len=4096\n";
    uint8_t want[32], got[32];
    unsigned int n = 0;
    assert_int_equal(EVP_Digest(canon, sizeof(canon) - 1, want, &n, EVP_sha256(), NULL), 1);
    epd_config_t cfg;
    epd_config_defaults(&cfg);
    assert_int_equal(epd_config_fingerprint(&cfg, got), 0);
    assert_memory_equal(got, want, 32);
    char hex[65], want_hex[65];
    for (int i = 0; i < 32; i++)
        sprintf(want_hex + 2 * i, "%02x", want[i]);
    assert_int_equal(epd_config_fingerprint_hex(&cfg, hex), 0);
    assert_string_equal(hex, want_hex);
}

typedef struct fp_case {
    const char *json;
    const char *diff; /* NULL: must match the base config */
} fp_case_t;

static void test_fingerprint_and_diff(void **state)
{
    (void)state;
    const char *base = "{\"model\": {\"placement\": \"explicit\", \"expert_map\": [0, 0, 1, 1]}}";
    static const fp_case_t cases[] = {
        /* node-local settings do not change the fingerprint */
        {"{\"node\": {\"id\": 3, \"name\": \"x\"}, \"http\": {\"listen\": {\"port\": 81}},"
         " \"compute\": {\"num_sms\": 20}, \"log\": {\"level\": \"debug\"},"
         " \"timeouts\": {\"connect_ms\": 100},"
         " \"model\": {\"placement\": \"explicit\", \"expert_map\": [0, 0, 1, 1]}}",
         NULL},
        {"{\"cluster\": {\"name\": \"other\"}, \"model\": {\"placement\": \"explicit\","
         " \"expert_map\": [0, 0, 1, 1]}}",
         "cluster.name: \"epd\" vs \"other\""},
        {"{\"compute\": {\"transport\": \"rdma\"}, \"model\": {\"placement\": \"explicit\","
         " \"expert_map\": [0, 0, 1, 1]}}",
         "compute.transport: \"tcp\" vs \"rdma\""},
        {"{\"compute\": {\"backend\": \"cuda\", \"gpus\": [0]}, \"model\": {\"placement\": "
         "\"explicit\", \"expert_map\": [0, 0, 1, 1]}}",
         "compute.backend: \"cpu\" vs \"cuda\""},
        {"{\"compute\": {\"ranks_per_node\": 2}, \"model\": {\"placement\": \"explicit\","
         " \"expert_map\": [0, 0, 1, 1]}}",
         "compute.ranks_per_node: 1 vs 2"},
        {"{\"model\": {\"placement\": \"explicit\", \"expert_map\": [0, 0, 1, 0]}}",
         "model.expert_map[3]: 1 vs 0"},
        {"{\"model\": {\"placement\": \"explicit\", \"expert_map\": [0, 0, 1]}}",
         "model.expert_map: 4 entries vs 3"},
        {"{}", "model.placement: \"explicit\" vs \"contiguous\""},
        {"{\"model\": {\"placement\": \"explicit\", \"expert_map\": [0, 0, 1, 1],"
         " \"max_batch_tokens\": 256}}",
         "model.max_batch_tokens: 128 vs 256"},
        {"{\"model\": {\"placement\": \"explicit\", \"expert_map\": [0, 0, 1, 1],"
         " \"max_seq_len\": 8192}}",
         "model.max_seq_len: 4096 vs 8192"},
    };
    static epd_config_t a, b;
    parse_ok(base, &a);
    char fa[65], fb[65], why[256];
    assert_int_equal(epd_config_fingerprint_hex(&a, fa), 0);
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        parse_ok(cases[i].json, &b);
        assert_int_equal(epd_config_fingerprint_hex(&b, fb), 0);
        int rc = epd_config_diff(&a, &b, why, sizeof(why));
        if (!cases[i].diff) {
            assert_string_equal(fa, fb);
            assert_int_equal(rc, 0);
            assert_string_equal(why, "");
        } else {
            assert_string_not_equal(fa, fb);
            assert_int_equal(rc, 1);
            assert_string_equal(why, cases[i].diff);
        }
    }

    /* diff_all sees node-local changes, down to the element */
    parse_ok("{\"cluster\": {\"peers\": [{\"id\": 1, \"host\": \"h\", \"port\": 1},"
             " {\"id\": 2, \"host\": \"h\", \"port\": 2}], \"secret_file\": \"/s\"}}",
             &a);
    parse_ok("{\"cluster\": {\"peers\": [{\"id\": 1, \"host\": \"h\", \"port\": 1},"
             " {\"id\": 2, \"host\": \"h\", \"port\": 3}], \"secret_file\": \"/s\"}}",
             &b);
    assert_int_equal(epd_config_diff(&a, &b, why, sizeof(why)), 0);
    assert_int_equal(epd_config_diff_all(&a, &b, why, sizeof(why)), 1);
    assert_string_equal(why, "cluster.peers[1].port: 2 vs 3");
    /* a short buffer is cut, never overrun */
    char tiny[8];
    memset(tiny, 'x', sizeof(tiny));
    assert_int_equal(epd_config_diff_all(&a, &b, tiny, 6), 1);
    assert_string_equal(tiny, "clust");
    assert_int_equal(tiny[7], 'x');
}

/* The generated reference names every setting with its default as the defaults really are. */
static void test_doc_matches_defaults(void **state)
{
    (void)state;
    char *doc = epd_config_doc_markdown();
    assert_non_null(doc);
    const char *rows[] = {
        "| `node.id` | integer | `0` |",
        "| `cluster.listen.port` | integer | `7420` |",
        "| `cluster.peers[].port` | integer | required | 1..65535 |",
        "| `http.listen.host` | string | `\"127.0.0.1\"` |",
        "| `http.listen.port` | integer | `8080` |",
        "| `compute.backend` | string | `\"cpu\"` | `cpu`, `cuda` | yes |",
        "| `compute.gpus` | array of integers | `[]` | up to 16 entries, each 0..63 |",
        "| `timeouts.heartbeat_timeout_ms` | integer | `5000` | 20..3600000 ms |",
        "| `log.level` | string | `\"info\"` | `error`, `warn`, `info`, `debug` |",
    };
    for (size_t i = 0; i < sizeof(rows) / sizeof(rows[0]); i++) {
        if (!strstr(doc, rows[i])) fprintf(stderr, "missing row: %s\n", rows[i]);
        assert_non_null(strstr(doc, rows[i]));
    }
    free(doc);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_bad_configs),
        cmocka_unit_test(test_error_cap),
        cmocka_unit_test(test_filesystem_checks),
        cmocka_unit_test(test_load_files),
        cmocka_unit_test(test_defaults),
        cmocka_unit_test(test_examples),
        cmocka_unit_test(test_examples_with_files),
        cmocka_unit_test(test_round_trip),
        cmocka_unit_test(test_fingerprint_known_answer),
        cmocka_unit_test(test_fingerprint_and_diff),
        cmocka_unit_test(test_doc_matches_defaults),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
