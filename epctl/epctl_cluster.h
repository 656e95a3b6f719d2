/* epctl's cluster commands (epctl_cluster.c): up, drain, undrain, down, and the rank table and peer
 * health that `epctl status` prints. Each returns epctl's exit status. */
#ifndef EPD_EPCTL_CLUSTER_H
#define EPD_EPCTL_CLUSTER_H

#include <stdio.h>

int epctl_cmd_up(int argc, char **argv);
int epctl_cmd_drain(int argc, char **argv);
int epctl_cmd_undrain(int argc, char **argv);
int epctl_cmd_down(int argc, char **argv);
/* Fetches GET /v1/cluster from node and prints the rank table and peers. */
int epctl_cluster_print(const char *node, int timeout_ms, FILE *out);

#endif /* EPD_EPCTL_CLUSTER_H */
