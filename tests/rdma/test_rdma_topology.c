/* The rdma wire's NIC choice by PCI topology (transport/rdma/rdma_device.c), on a sysfs tree
 * built here: two GPUs and NICs under two PCIe switches of one root complex, a NIC on another
 * root complex, a second NIC beside the first GPU, and a software device (rxe) with no PCI
 * parent. Needs no verbs device. */
#include "rdma.h"

#include <limits.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>

static char root[256];

static void mkdirs(const char *path)
{
    char p[PATH_MAX];
    snprintf(p, sizeof p, "%s", path);
    for (char *s = p + 1; *s; ++s)
        if (*s == '/') {
            *s = 0;
            mkdir(p, 0755);
            *s = '/';
        }
    mkdir(p, 0755);
}

/* A PCI function at devices/<pci_path>, reachable as bus/pci/devices/<bus id>. */
static void pci_dev(const char *pci_path)
{
    char dev[1024], dir[1024], link[PATH_MAX];
    snprintf(dev, sizeof dev, "%s/devices/%s", root, pci_path);
    mkdirs(dev);
    const char *bus = strrchr(pci_path, '/') + 1;
    snprintf(dir, sizeof dir, "%s/bus/pci/devices", root);
    mkdirs(dir);
    snprintf(link, sizeof link, "%s/%s", dir, bus);
    assert_int_equal(symlink(dev, link), 0);
}

/* A verbs device; pci_path NULL for a software one (no device link). */
static void ib_dev(const char *name, const char *pci_path)
{
    char dir[1024], dev[1024], link[PATH_MAX];
    snprintf(dir, sizeof dir, "%s/class/infiniband/%s", root, name);
    mkdirs(dir);
    if (!pci_path) return;
    pci_dev(pci_path);
    snprintf(dev, sizeof dev, "%s/devices/%s", root, pci_path);
    snprintf(link, sizeof link, "%s/device", dir);
    assert_int_equal(symlink(dev, link), 0);
}

static int setup(void **state)
{
    snprintf(root, sizeof root, "%s/ep-sysfs-XXXXXX", getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp");
    if (!mkdtemp(root)) return -1;
    pci_dev("pci0000:00/0000:00:01.0/0000:1b:00.0"); /* GPU 0, switch A */
    ib_dev("mlx5_0", "pci0000:00/0000:00:01.0/0000:1c:00.0");
    ib_dev("mlx5_3", "pci0000:00/0000:00:01.0/0000:1d:00.0"); /* a second NIC on switch A */
    pci_dev("pci0000:00/0000:00:02.0/0000:2b:00.0");          /* GPU 1, switch B */
    ib_dev("mlx5_1", "pci0000:00/0000:00:02.0/0000:2c:00.0");
    ib_dev("mlx5_2", "pci0000:80/0000:80:01.0/0000:81:00.0"); /* the other root complex */
    ib_dev("rxe0", NULL);
    return 0;
}

static int teardown(void **state)
{
    char cmd[PATH_MAX + 16];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", root);
    return system(cmd) == 0 ? 0 : -1;
}

static void test_distance_counts_bridges_between(void **state)
{
    assert_int_equal(rdma_pci_distance(root, "0000:1b:00.0", "mlx5_0"), 2); /* same switch */
    assert_int_equal(rdma_pci_distance(root, "0000:1b:00.0", "mlx5_1"), 4); /* via the root */
    assert_int_equal(rdma_pci_distance(root, "0000:1b:00.0", "mlx5_2"), 6); /* other socket */
    assert_int_equal(rdma_pci_distance(root, "0000:2b:00.0", "mlx5_1"), 2);
}

static void test_unknown_devices_have_no_distance(void **state)
{
    assert_int_equal(rdma_pci_distance(root, "0000:1b:00.0", "rxe0"), -1);
    assert_int_equal(rdma_pci_distance(root, "0000:99:00.0", "mlx5_0"), -1);
    assert_int_equal(rdma_pci_distance(root, "0000:1b:00.0", "nosuch0"), -1);
}

static void test_nearest_keeps_ties_in_order(void **state)
{
    const char *names[] = {"mlx5_0", "mlx5_1", "mlx5_2", "mlx5_3", "rxe0"};
    int idx[5];
    assert_int_equal(rdma_nearest(root, "0000:1b:00.0", names, 5, idx), 2);
    assert_int_equal(idx[0], 0);
    assert_int_equal(idx[1], 3);
    assert_int_equal(rdma_nearest(root, "0000:2b:00.0", names, 5, idx), 1);
    assert_int_equal(idx[0], 1);
    const char *soft[] = {"rxe0"};
    assert_int_equal(rdma_nearest(root, "0000:1b:00.0", soft, 1, idx), 0);
}

static void test_near_option_is_parsed(void **state)
{
    struct rdma_opts o;
    char err[200];
    assert_int_equal(rdma_opts_parse("near=0000:1b:00.0,mtu=4096", &o, err, sizeof err), 0);
    assert_string_equal(o.near, "0000:1b:00.0");
    assert_int_equal(rdma_opts_parse("near=", &o, err, sizeof err), -1);
    assert_non_null(strstr(err, "rdma option 'near='"));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_distance_counts_bridges_between),
        cmocka_unit_test(test_unknown_devices_have_no_distance),
        cmocka_unit_test(test_nearest_keeps_ties_in_order),
        cmocka_unit_test(test_near_option_is_parsed),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
