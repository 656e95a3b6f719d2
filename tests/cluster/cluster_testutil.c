/* Helper for the cluster integration scripts:
 *   cluster_testutil freeports N        N distinct free TCP ports on 127.0.0.1, one per line
 *   cluster_testutil jget FILE PATH     a value of a JSON document: PATH like
 * rank_table.nodes.2.first_rank (numbers print as integers when whole; exit 1 if absent) */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cjson/cJSON.h>

static int freeports(int n)
{
    int fds[64];
    if (n < 1 || n > 64) return 2;
    for (int i = 0; i < n; i++) {
        struct sockaddr_in a;
        socklen_t l = sizeof a;
        memset(&a, 0, sizeof a);
        a.sin_family = AF_INET;
        a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        fds[i] = socket(AF_INET, SOCK_STREAM, 0);
        /* all kept open until every port is chosen, so the N are distinct */
        if (fds[i] < 0 || bind(fds[i], (struct sockaddr *)&a, sizeof a) < 0 ||
            getsockname(fds[i], (struct sockaddr *)&a, &l) < 0) {
            perror("freeports");
            return 1;
        }
        printf("%d\n", ntohs(a.sin_port));
    }
    for (int i = 0; i < n; i++)
        close(fds[i]);
    return 0;
}

static int jget(const char *file, const char *path)
{
    FILE *f = fopen(file, "rb");
    if (!f) {
        perror(file);
        return 2;
    }
    static char buf[1 << 20];
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = 0;
    cJSON *doc = cJSON_Parse(buf);
    if (!doc) {
        fprintf(stderr, "jget: %s is not JSON\n", file);
        return 2;
    }
    char p[512];
    snprintf(p, sizeof p, "%s", path);
    cJSON *cur = doc;
    for (char *tok = strtok(p, "."); tok && cur; tok = strtok(NULL, ".")) {
        char *end;
        long idx = strtol(tok, &end, 10);
        if (*end == 0 && cJSON_IsArray(cur))
            cur = cJSON_GetArrayItem(cur, (int)idx);
        else
            cur = cJSON_GetObjectItemCaseSensitive(cur, tok);
    }
    int rc = 0;
    if (!cur)
        rc = 1;
    else if (cJSON_IsString(cur))
        printf("%s\n", cur->valuestring);
    else if (cJSON_IsNumber(cur) && cur->valuedouble == (double)(long long)cur->valuedouble)
        printf("%lld\n", (long long)cur->valuedouble);
    else if (cJSON_IsNumber(cur))
        printf("%g\n", cur->valuedouble);
    else if (cJSON_IsBool(cur))
        printf("%s\n", cJSON_IsTrue(cur) ? "true" : "false");
    else if (cJSON_IsNull(cur))
        printf("null\n");
    else if (cJSON_IsArray(cur))
        printf("%d\n", cJSON_GetArraySize(cur));
    else
        printf("object\n");
    cJSON_Delete(doc);
    return rc;
}

int main(int argc, char **argv)
{
    if (argc == 3 && strcmp(argv[1], "freeports") == 0) return freeports(atoi(argv[2]));
    if (argc == 4 && strcmp(argv[1], "jget") == 0) return jget(argv[2], argv[3]);
    fprintf(stderr, "usage: cluster_testutil freeports N | jget FILE PATH\n");
    return 2;
}
