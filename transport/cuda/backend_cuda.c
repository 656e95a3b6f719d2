/* libep's cuda backend (host side): one rank per GPU, driven by one host thread each. Owns the
 * symmetric device buffer, its peers' addresses (peer access in one process, CUDA IPC across
 * processes), the mapped error word the kernels report stalls through, LL handles and hooks,
 * and HT handles. All compute and movement is in kernels/ (see kernels/ep_cuda.h).
 *
 * With the tcp or rdma transport (ranks on different nodes) peers are not reachable by stores:
 * the buffer's window (what peers write) is pinned host memory that a wire reads and writes, the
 * kernels append put/signal commands to a ring in mapped host memory, and a proxy thread
 * (proxy.c) runs them through the wire. HT ops there are driven from the host (ht_proxy.c). */
#include "group.h"

#include "cuda_impl.h"

#include <cuda_runtime.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* Turns a kernel-reported stall (mapped error word) into a status. */
ep_status_t cuda_check_err(ep_group_t *g)
{
    cuda_impl_t *c = impl_of(g);
    int code = ((volatile int *)c->err_host)[EPK_ERR_CODE];
    if (code == EPK_CODE_OK) return EP_OK;
    __sync_synchronize();
    int peer = ((volatile int *)c->err_host)[EPK_ERR_PEER];
    int what = ((volatile int *)c->err_host)[EPK_ERR_WHAT];
    if (code == EPK_CODE_ABORT || atomic_load(&g->aborted))
        return ep_group_fail(g, peer, EP_ERR_ABORTED, "rank %d: group aborted", g->rank);
    if (code == EPK_CODE_PEER) {
        const char *why = c->px.error[0]                 ? c->px.error
                          : c->wire && c->wire->error[0] ? c->wire->error
                                                         : "the proxy reported a failure";
        return ep_group_fail(g, peer, EP_ERR_PEER, "%s", why);
    }
    if (what == EPK_WAIT_RING)
        return ep_group_fail(g, -1, EP_ERR_TIMEOUT,
                             "rank %d: the proxy's command ring stayed full for %u ms", g->rank,
                             g->cfg.timeout_ms);
    return ep_group_fail(g, peer, EP_ERR_TIMEOUT,
                         "rank %d: no signal from rank %d within %u ms (GPU wait: %s)", g->rank,
                         peer, g->cfg.timeout_ms, epk_wait_name(what));
}

ep_status_t cuda_set_device(ep_group_t *g)
{
    cudaError_t e = cudaSetDevice(impl_of(g)->device);
    return e == cudaSuccess ? EP_OK : cuda_fail(g, e, "cudaSetDevice");
}

static int imin(int a, int b)
{
    return a < b ? a : b;
}

/* Commands the ring holds (a power of two): an LL op issues a few per send block and peer.
 * EP_CUDA_RING_SLOTS (a power of two, 16..65536) overrides it: tests make the ring small so that
 * kernels wait on a full ring. */
#define PROXY_RING_SLOTS 8192

static uint32_t ring_slots(void)
{
    const char *v = getenv("EP_CUDA_RING_SLOTS");
    char *end;
    unsigned long n = v ? strtoul(v, &end, 10) : 0;
    if (!v || *end || n < 16 || n > 65536 || (n & (n - 1))) return PROXY_RING_SLOTS;
    return (uint32_t)n;
}
/* LL send blocks on the proxy path (each takes a contiguous range of tokens or rows). */
#define PROXY_SEND_BLOCKS 16

/* Mapped pinned host memory: *host for the CPU, *dev for the kernels. */
static ep_status_t host_mapped(ep_group_t *g, size_t bytes, void **host, void **dev,
                               const char *what)
{
    cudaError_t e = cudaHostAlloc(host, bytes, cudaHostAllocMapped | cudaHostAllocPortable);
    if (e != cudaSuccess) {
        *host = NULL;
        return ep_group_fail(g, -1, EP_ERR_NOMEM, "rank %d: cudaHostAlloc of %zu bytes (%s): %s",
                             g->rank, bytes, what, cudaGetErrorString(e));
    }
    memset(*host, 0, bytes);
    if ((e = cudaHostGetDevicePointer(dev, *host, 0)) != cudaSuccess)
        return cuda_fail(g, e, "cudaHostGetDevicePointer");
    return EP_OK;
}

/* Proxy path: the window in pinned host memory, the command ring, and the wire. */
static ep_status_t proxy_setup(ep_group_t *g)
{
    cuda_impl_t *c = impl_of(g);
    void *dev;
    ep_status_t st;
    cudaError_t e;
    if ((st = host_mapped(g, c->ctx.lay.win_total, (void **)&c->win_host, &dev, "the window")))
        return st;
    c->ctx.win = dev;
    c->ctx.ring.nslots = ring_slots();
    if ((st = host_mapped(g, c->ctx.ring.nslots * sizeof(epk_cmd_t), (void **)&c->ring_host, &dev,
                          "the command ring")))
        return st;
    c->ctx.ring.slots = dev;
    if ((st = host_mapped(g, 64, (void **)&c->head_host, &dev, "the ring head"))) return st;
    c->ctx.ring.head = dev;
    if ((e = cudaMalloc((void **)&c->tail_dev, sizeof *c->tail_dev)) != cudaSuccess) {
        c->tail_dev = NULL;
        return cuda_fail(g, e, "cudaMalloc of the ring tail");
    }
    if ((e = cudaMemset(c->tail_dev, 0, sizeof *c->tail_dev)) != cudaSuccess)
        return cuda_fail(g, e, "cudaMemset of the ring tail");
    c->ctx.ring.tail = c->tail_dev;
    c->ctx.proxy = 1;
    if (c->ctx.lay.ht_blk) {
        /* HT over the wire (ht_proxy.c): device pack/stage blocks, pinned routing scratch */
        const size_t T = (size_t)g->cfg.ht_max_tokens, R = (size_t)g->nranks;
        const size_t pack = R * c->ctx.lay.ht_blk;
        if ((e = cudaMalloc((void **)&c->ht_pack, pack)) != cudaSuccess) {
            c->ht_pack = NULL;
            return ep_group_fail(g, -1, EP_ERR_NOMEM, "rank %d: cudaMalloc of %zu bytes (HT): %s",
                                 g->rank, pack, cudaGetErrorString(e));
        }
        void **scratch[3] = {(void **)&c->ht_idx_host, (void **)&c->ht_pos_host,
                             (void **)&c->ht_nrpe_host};
        const size_t bytes[3] = {T * g->cfg.num_topk * 4, T * R * 4,
                                 (size_t)g->cfg.num_experts / R * 4};
        for (int i = 0; i < 3; ++i)
            if ((e = cudaHostAlloc(scratch[i], bytes[i], 0)) != cudaSuccess) {
                *scratch[i] = NULL;
                return cuda_fail(g, e, "cudaHostAlloc of the HT routing scratch");
            }
    }

    if (g->cfg.transport == EP_TRANSPORT_RDMA) {
#ifdef EP_HAVE_RDMA
        st = ep_wire_rdma_create(&g->cfg, g->rank, g->nranks, &c->wire);
        /* the NIC nearest this GPU (sysfs spells the bus id in lower case) */
        char bus[32];
        unsigned dom, b, dv, fn;
        if (st == EP_OK && cudaDeviceGetPCIBusId(bus, sizeof bus, c->device) == cudaSuccess &&
            sscanf(bus, "%x:%x:%x.%x", &dom, &b, &dv, &fn) == 4) {
            snprintf(bus, sizeof bus, "%04x:%02x:%02x.%x", dom, b, dv, fn);
            ep_wire_rdma_prefer_near(c->wire, bus);
        }
#else
        st = EP_ERR_UNSUPPORTED;
#endif
    } else {
        st = ep_wire_tcp_create(&g->cfg, g->rank, g->nranks, &c->wire);
    }
    if (st) {
        c->wire = NULL;
        return ep_group_fail(g, -1, st, "rank %d: creating the %s wire failed (%s)", g->rank,
                             ep_transport_name(g->cfg.transport), ep_strerror(st));
    }
    if (atomic_load(&g->aborted)) atomic_store(&c->wire->aborted, 1);
    return EP_OK;
}

_Static_assert(EPK_AG_BYTES(3) == EP_WIRE_AG_BYTES(3), "kernels/ep_cuda.h and wire.h differ");

/* Ranks that are threads of one process: ep_group_allgather over an shm wire on a small host
 * buffer of their own (the device buffers are for the kernels). Collective: every rank decided
 * inproc alike from the same exchange. */
static ep_status_t ag_setup(ep_group_t *g, const ep_bootstrap_t *bs)
{
    cuda_impl_t *c = impl_of(g);
    const size_t bytes = (EP_WIRE_AG_BYTES(g->nranks) + 63) / 64 * 64;
    ep_status_t st = ep_wire_shm_create(&g->cfg, g->rank, g->nranks, &c->ag_wire);
    if (st) {
        c->ag_wire = NULL;
        return ep_group_fail(g, -1, st, "rank %d: creating the allgather's shm wire: %s", g->rank,
                             ep_strerror(st));
    }
    if (atomic_load(&g->aborted)) atomic_store(&c->ag_wire->aborted, 1);
    c->ag_buf = aligned_alloc(64, bytes);
    if (!c->ag_buf)
        return ep_group_fail(g, -1, EP_ERR_NOMEM, "rank %d: out of host memory", g->rank);
    memset(c->ag_buf, 0, bytes);
    if ((st = c->ag_wire->ops->connect(c->ag_wire, bs, c->ag_buf, bytes))) {
        int fp = atomic_load(&c->ag_wire->failed_peer);
        return ep_group_fail(g, fp >= 0 && fp < g->nranks ? fp : -1, st,
                             "rank %d: connecting the allgather's shm wire: %s", g->rank,
                             c->ag_wire->error);
    }
    return EP_OK;
}

static ep_status_t cu_create(ep_group_t *g, const ep_bootstrap_t *bs)
{
    const ep_config_t *cfg = &g->cfg;
    const int R = g->nranks;
    struct peer_info me, *all = NULL;
    cudaError_t e;
    ep_status_t st;
    int ndev = 0;

    cuda_impl_t *c = calloc(1, sizeof *c);
    if (!c) return ep_group_fail(g, -1, EP_ERR_NOMEM, "rank %d: out of host memory", g->rank);
    g->impl = c;
    pthread_mutex_init(&c->sc_lock, NULL);
    if ((e = cudaGetDeviceCount(&ndev)) != cudaSuccess || ndev == 0) {
        st = ep_group_fail(g, -1, EP_ERR_UNSUPPORTED, "rank %d: no CUDA device (%s)", g->rank,
                           e == cudaSuccess ? "device count 0" : cudaGetErrorString(e));
        goto fail;
    }
    c->device = cfg->device >= 0 ? cfg->device : g->rank % ndev;
    if (c->device >= ndev) {
        st = ep_group_fail(g, -1, EP_ERR_INVALID, "rank %d: config.device %d but only %d devices",
                           g->rank, c->device, ndev);
        goto fail;
    }
    if ((st = cuda_set_device(g)) != EP_OK) goto fail;
    if (R > EP_MAX_RANKS) {
        st = ep_group_fail(g, -1, EP_ERR_INVALID, "rank %d: %d ranks, at most %d", g->rank, R,
                           EP_MAX_RANKS);
        goto fail;
    }

    if ((e = (cudaError_t)epk_preload()) != cudaSuccess) {
        st = cuda_fail(g, e, "loading the kernels");
        goto fail;
    }
    c->proxy = cfg->transport == EP_TRANSPORT_TCP || cfg->transport == EP_TRANSPORT_RDMA;
    if (cfg->transport == EP_TRANSPORT_SHM) {
        st = ep_group_fail(g, -1, EP_ERR_UNSUPPORTED,
                           "config.transport shm: the cuda backend reaches its peers over nvlink "
                           "(auto), or through a proxy over tcp or rdma");
        goto fail;
    }
    epk_layout(&c->ctx.lay, cfg, R, c->proxy);
    /* proxy path: the device holds only the local part; its base sits win_total below the
     * allocation so that the layout's offsets stay the same (kernels add >= win_total) */
    const size_t dev_bytes = c->proxy ? c->ctx.lay.total - c->ctx.lay.win_total : c->ctx.lay.total;
    if ((e = cudaMalloc((void **)&c->buf, dev_bytes)) != cudaSuccess) {
        st = ep_group_fail(g, -1, EP_ERR_NOMEM, "rank %d: cudaMalloc of %zu bytes: %s", g->rank,
                           dev_bytes, cudaGetErrorString(e));
        c->buf = NULL;
        goto fail;
    }
    if ((e = cudaMemset(c->buf, 0, dev_bytes)) != cudaSuccess) {
        st = cuda_fail(g, e, "cudaMemset of the symmetric buffer");
        goto fail;
    }
    if (c->proxy && (st = proxy_setup(g)) != EP_OK) goto fail;
    c->ctx.base[g->rank] =
        c->proxy ? (uint8_t *)((uintptr_t)c->buf - c->ctx.lay.win_total) : c->buf;
    if (!c->proxy) c->ctx.win = c->buf;
    if ((e = cudaHostAlloc((void **)&c->err_host, 64, cudaHostAllocMapped)) != cudaSuccess) {
        c->err_host = NULL;
        st = cuda_fail(g, e, "cudaHostAlloc of the error word");
        goto fail;
    }
    memset(c->err_host, 0, 64);
    if ((e = cudaHostGetDevicePointer((void **)&c->err_dev, c->err_host, 0)) != cudaSuccess) {
        st = cuda_fail(g, e, "cudaHostGetDevicePointer");
        goto fail;
    }
    if ((e = cudaHostAlloc((void **)&c->info_host, sizeof *c->info_host, cudaHostAllocMapped)) !=
        cudaSuccess) {
        c->info_host = NULL;
        st = cuda_fail(g, e, "cudaHostAlloc of the HT exchange area");
        goto fail;
    }
    memset(c->info_host, 0, sizeof *c->info_host);
    if ((e = cudaHostGetDevicePointer((void **)&c->info_dev, c->info_host, 0)) != cudaSuccess ||
        (e = cudaStreamCreateWithFlags(&c->cs, cudaStreamNonBlocking)) != cudaSuccess ||
        (e = cudaStreamCreateWithFlags(&c->ss, cudaStreamNonBlocking)) != cudaSuccess ||
        (e = cudaEventCreateWithFlags(&c->ev_fork, cudaEventDisableTiming)) != cudaSuccess ||
        (e = cudaEventCreateWithFlags(&c->ev_cs, cudaEventDisableTiming)) != cudaSuccess ||
        (e = cudaEventCreateWithFlags(&c->ev_ss, cudaEventDisableTiming)) != cudaSuccess) {
        st = cuda_fail(g, e, "creating the copy streams");
        goto fail;
    }
    for (int i = 0; i < HT_COMBINE_CHUNKS; ++i)
        if ((e = cudaEventCreateWithFlags(&c->ev_chunk[i], cudaEventDisableTiming)) !=
            cudaSuccess) {
            st = cuda_fail(g, e, "creating the copy events");
            goto fail;
        }

    memset(&me, 0, sizeof me);
    me.pid = (int)getpid();
    me.device = c->device;
    gethostname(me.host, sizeof me.host - 1);
    if ((e = cudaDeviceGetAttribute(&me.num_sms, cudaDevAttrMultiProcessorCount, c->device)) !=
            cudaSuccess ||
        (e = cudaDeviceGetPCIBusId(me.busid, sizeof me.busid, c->device)) != cudaSuccess ||
        (e = cudaIpcGetMemHandle(&me.ipc, c->buf)) != cudaSuccess) {
        st = cuda_fail(g, e, "querying the device / cudaIpcGetMemHandle");
        goto fail;
    }
    me.base = (uint64_t)(uintptr_t)c->buf;
    all = calloc((size_t)R, sizeof *all);
    if (!all) {
        st = ep_group_fail(g, -1, EP_ERR_NOMEM, "rank %d: out of host memory", g->rank);
        goto fail;
    }
    int rc = bs->allgather(bs->ctx, &me, all, sizeof me, cfg->timeout_ms);
    if (rc != 0) {
        st = ep_group_fail(g, -1, EP_ERR_BOOTSTRAP, "rank %d: exchanging buffer addresses: %s",
                           g->rank, ep_strerror((ep_status_t)rc));
        goto fail;
    }

    c->inproc = 1;
    {
        /* EP_CUDA_HT_COPY=0 keeps HT row movement on the SMs (peer stores / loads) */
        const char *ev = getenv("EP_CUDA_HT_COPY");
        c->ht_copy = !(ev && ev[0] == '0');
    }
    int share = 1, sms = me.num_sms;
    for (int r = 0; r < R; ++r) {
        if (all[r].pid != me.pid || strcmp(all[r].host, me.host) != 0) c->inproc = 0;
        int same = 0;
        for (int q = 0; q < R; ++q)
            same += strcmp(all[q].busid, all[r].busid) == 0;
        share = same > share ? same : share;
        sms = imin(sms, all[r].num_sms);
    }
    if (c->proxy) c->inproc = 0; /* no peer pointers on the proxy path */
    for (int r = 0; r < R && !c->proxy; ++r) {
        if (r == g->rank) continue;
        if (c->inproc) {
            if (all[r].device != c->device) {
                int can = 0;
                cudaDeviceCanAccessPeer(&can, c->device, all[r].device);
                if (!can) {
                    st = ep_group_fail(g, r, EP_ERR_UNSUPPORTED,
                                       "rank %d: device %d cannot access device %d of rank %d",
                                       g->rank, c->device, all[r].device, r);
                    goto fail;
                }
                e = cudaDeviceEnablePeerAccess(all[r].device, 0);
                if (e == cudaErrorPeerAccessAlreadyEnabled) {
                    cudaGetLastError();
                } else if (e != cudaSuccess) {
                    st = cuda_fail(g, e, "cudaDeviceEnablePeerAccess");
                    goto fail;
                }
            }
            c->ctx.base[r] = (uint8_t *)(uintptr_t)all[r].base;
        } else {
            e = cudaIpcOpenMemHandle(&c->ipc_open[r], all[r].ipc, cudaIpcMemLazyEnablePeerAccess);
            if (e != cudaSuccess) {
                c->ipc_open[r] = NULL;
                st = ep_group_fail(g, r, EP_ERR_CUDA, "rank %d: opening rank %d's buffer: %s",
                                   g->rank, r, cudaGetErrorString(e));
                goto fail;
            }
            c->ctx.base[r] = c->ipc_open[r];
        }
    }

    if (c->inproc && (st = ag_setup(g, bs)) != EP_OK) goto fail;

    c->ctx.rank = g->rank;
    c->ctx.nranks = R;
    c->ctx.num_experts = cfg->num_experts;
    c->ctx.local_experts = cfg->num_experts / R;
    c->ctx.hidden = cfg->hidden;
    c->ctx.topk = cfg->num_topk;
    c->ctx.ll_max_tokens = cfg->ll_max_tokens;
    c->ctx.ht_max_tokens = cfg->ht_max_tokens;
    c->ctx.timeout_ns = (unsigned long long)cfg->timeout_ms * 1000000ull;
    c->ctx.err = c->err_dev;
    if (c->proxy) {
        /* the wire exchanges its endpoints through the bootstrap, then the proxy starts */
        if ((st = c->wire->ops->connect(c->wire, bs, c->win_host, c->ctx.lay.win_total))) {
            int fp = atomic_load(&c->wire->failed_peer);
            st = ep_group_fail(g, fp >= 0 && fp < R ? fp : -1, st,
                               "rank %d: connecting the %s wire: %s", g->rank, c->wire->ops->name,
                               c->wire->error[0] ? c->wire->error : ep_strerror(st));
            goto fail;
        }
        c->px.wire = c->wire;
        c->px.slots = c->ring_host;
        c->px.head = (_Atomic uint64_t *)c->head_host;
        c->px.nslots = c->ctx.ring.nslots;
        c->px.err = c->err_host;
        if ((st = ep_cuda_proxy_start(&c->px)) != EP_OK) {
            st = ep_group_fail(g, -1, st, "rank %d: starting the proxy thread failed", g->rank);
            goto fail;
        }
    }

    /* Block counts must agree on every rank (receivers count the senders' blocks): they derive
     * from the config and the smallest device; ranks sharing a GPU split it so that every
     * rank's kernels stay resident together. */
    const int avail = sms / share > 0 ? sms / share : 1;
    const int tmax = cfg->ll_max_tokens > 0 ? cfg->ll_max_tokens : 1;
    /* two 256-thread LL blocks fit on one SM together (register use), so 2 * avail stay
     * co-resident, which the one-launch mode needs */
    /* the proxy path gives each send block a contiguous range whose rows leave as one put, so
     * fewer, larger ranges mean fewer commands and system-scope fences */
    c->ll_disp_send = imin(tmax, c->proxy ? PROXY_SEND_BLOCKS : 2 * avail);
    c->ll_disp_recv = imin(c->ctx.local_experts, 2 * avail);
    c->ll_comb_send = imin(R * tmax, c->proxy ? PROXY_SEND_BLOCKS : 2 * avail);
    c->ll_comb_recv = imin(tmax, 2 * avail);
    int nsms = cfg->num_sms > 0 ? cfg->num_sms : 24;
    c->ht_blocks = imin(nsms, avail);

    rc = bs->barrier(bs->ctx, cfg->timeout_ms);
    if (rc != 0) {
        st = ep_group_fail(g, -1, EP_ERR_BOOTSTRAP, "rank %d: barrier after connecting: %s",
                           g->rank, ep_strerror((ep_status_t)rc));
        goto fail;
    }
    free(all);
    c->bs = *bs;
    c->connected = 1;
    return EP_OK;

fail:
    free(all);
    return st;
}

static void cu_destroy(ep_group_t *g)
{
    cuda_impl_t *c = impl_of(g);
    if (!c) return;
    cudaSetDevice(c->device);
    cudaDeviceSynchronize();
    if (c->proxy && c->connected && c->px.running) {
        /* every command the kernels issued goes out before the peers are told we are done */
        unsigned long long tail = 0;
        if (cudaMemcpy(&tail, c->tail_dev, sizeof tail, cudaMemcpyDeviceToHost) == cudaSuccess)
            ep_cuda_proxy_drain(&c->px, tail, g->cfg.timeout_ms);
    }
    /* peers may still write into this buffer until they are done too */
    if (c->connected) c->bs.barrier(c->bs.ctx, g->cfg.timeout_ms);
    ep_cuda_proxy_stop(&c->px);
    if (c->wire) c->wire->ops->destroy(c->wire);
    if (c->ag_wire) {
        /* the shm wire frees the buffer once no rank can write into it any more */
        c->ag_wire->ops->release_buffer(c->ag_wire, c->ag_buf);
        c->ag_wire->ops->destroy(c->ag_wire);
    } else {
        free(c->ag_buf);
    }
    if (c->win_host) cudaFreeHost(c->win_host);
    if (c->ring_host) cudaFreeHost(c->ring_host);
    if (c->head_host) cudaFreeHost(c->head_host);
    if (c->tail_dev) cudaFree(c->tail_dev);
    if (c->ht_pack) cudaFree(c->ht_pack);
    if (c->ht_idx_host) cudaFreeHost(c->ht_idx_host);
    if (c->ht_pos_host) cudaFreeHost(c->ht_pos_host);
    if (c->ht_nrpe_host) cudaFreeHost(c->ht_nrpe_host);
    for (int r = 0; r < EP_MAX_RANKS; ++r)
        if (c->ipc_open[r]) cudaIpcCloseMemHandle(c->ipc_open[r]);
    while (c->sc_free) {
        struct ht_scratch *s = c->sc_free;
        c->sc_free = s->next;
        cudaFree(s->mem);
        free(s);
    }
    if (c->buf) cudaFree(c->buf);
    if (c->err_host) cudaFreeHost(c->err_host);
    if (c->info_host) cudaFreeHost(c->info_host);
    for (int i = 0; i < HT_COMBINE_CHUNKS; ++i)
        if (c->ev_chunk[i]) cudaEventDestroy(c->ev_chunk[i]);
    if (c->ev_fork) cudaEventDestroy(c->ev_fork);
    if (c->ev_cs) cudaEventDestroy(c->ev_cs);
    if (c->ev_ss) cudaEventDestroy(c->ev_ss);
    if (c->cs) cudaStreamDestroy(c->cs);
    if (c->ss) cudaStreamDestroy(c->ss);
    pthread_mutex_destroy(&c->sc_lock);
    free(c);
    g->impl = NULL;
}

ep_status_t cuda_launched(ep_group_t *g, int rc, const char *what)
{
    return rc == 0 ? EP_OK : cuda_fail(g, (cudaError_t)rc, what);
}

static ep_status_t cu_route(ep_group_t *g, const ep_route_params_t *p, const float *logits, int T,
                            int32_t *topk_idx, float *topk_weights, void *stream)
{
    ep_status_t st = cuda_set_device(g);
    if (st != EP_OK) return st;
    return cuda_launched(g, epk_route(p, logits, T, topk_idx, topk_weights, stream),
                         "route kernel");
}

/* What every LL op checks first: no kernel-reported failure, the device, and no receive hook
 * still pending on the buffer the op is about to overwrite. */
static ep_status_t ll_start(ep_group_t *g, int buf)
{
    ep_status_t st;
    if ((st = cuda_check_err(g)) != EP_OK || (st = cuda_set_device(g)) != EP_OK) return st;
    if (impl_of(g)->hooks[buf].pending)
        return ep_group_fail(g, -1, EP_ERR_STATE,
                             "rank %d: LL buffer %d still has a receive hook that never ran",
                             g->rank, buf);
    return EP_OK;
}

static ep_status_t cu_ll_dispatch(ep_group_t *g, int buf, const ep_ll_dispatch_args_t *a,
                                  ep_ll_dispatch_out_t *out, ep_ll_handle_t **handle,
                                  ep_hook_t **hook)
{
    cuda_impl_t *c = impl_of(g);
    ep_status_t st;
    if ((st = ll_start(g, buf)) != EP_OK) return st;
    epk_ll_dispatch_params_t p = {
        .buf = buf,
        .x = a->x,
        .num_tokens = a->num_tokens,
        .topk_idx = a->topk_idx,
        .topk_w = a->topk_weights,
        .use_fp8 = a->use_fp8,
        .round_scale = a->round_scale,
        .send_blocks = c->ll_disp_send,
        .recv_blocks = c->ll_disp_recv,
    };
    int mode = a->use_hook ? 1 : 0;
    epk_ll_dispatch_params_t lp = p;
    if (mode == 0 && lp.recv_blocks < lp.send_blocks)
        lp.recv_blocks = lp.send_blocks; /* one launch: every block receives (see kernels) */
    if ((st = cuda_launched(g, epk_ll_dispatch(&c->ctx, &lp, mode, a->stream), "LL dispatch")) !=
        EP_OK)
        return st;

    uint8_t *b = c->ctx.base[g->rank] + c->ctx.lay.ll_loc + (size_t)buf * c->ctx.lay.ll_loc_bytes;
    out->recv_x = b + c->ctx.lay.ll_recv_x;
    out->recv_scales = a->use_fp8 ? (float *)(b + c->ctx.lay.ll_recv_scales) : NULL;
    out->recv_count = (int32_t *)(b + c->ctx.lay.ll_recv_count);
    out->recv_src_info = (int32_t *)(b + c->ctx.lay.ll_src_info);
    out->recv_range = (int32_t *)(b + c->ctx.lay.ll_range);
    c->handles[buf].base.group = g;
    c->handles[buf].buf = buf;
    c->handles[buf].num_tokens = a->num_tokens;
    if (handle) *handle = &c->handles[buf].base;
    if (a->use_hook) {
        struct cuda_hook *h = &c->hooks[buf];
        memset(h, 0, sizeof *h);
        h->base.group = g;
        h->kind = 1;
        h->pending = 1;
        h->stream = a->stream;
        h->dp = p;
        if (hook) *hook = &h->base;
    } else if (hook) {
        *hook = NULL;
    }
    return EP_OK;
}

static ep_status_t cu_ll_combine(ep_group_t *g, int buf, const ep_ll_combine_args_t *a,
                                 ep_hook_t **hook)
{
    cuda_impl_t *c = impl_of(g);
    ep_status_t st;
    if ((st = ll_start(g, buf)) != EP_OK) return st;
    const struct cuda_ll_handle *h = (const struct cuda_ll_handle *)a->handle;
    if (!h || (h != &c->handles[0] && h != &c->handles[1]))
        return ep_group_fail(g, -1, EP_ERR_INVALID,
                             "rank %d: LL combine handle is not one of this group's", g->rank);
    epk_ll_combine_params_t p = {
        .buf = buf,
        .disp_buf = h->buf,
        .expert_y = a->expert_y,
        .topk_idx = a->topk_idx,
        .topk_w = a->topk_weights,
        .num_tokens = h->num_tokens,
        .out = a->out,
        .send_blocks = c->ll_comb_send,
        .recv_blocks = c->ll_comb_recv,
    };
    int mode = a->use_hook ? 1 : 0;
    epk_ll_combine_params_t lp = p;
    if (mode == 0 && lp.recv_blocks < lp.send_blocks) lp.recv_blocks = lp.send_blocks;
    if ((st = cuda_launched(g, epk_ll_combine(&c->ctx, &lp, mode, a->stream), "LL combine")) !=
        EP_OK)
        return st;
    if (a->use_hook) {
        struct cuda_hook *hk = &c->hooks[buf];
        memset(hk, 0, sizeof *hk);
        hk->base.group = g;
        hk->kind = 2;
        hk->pending = 1;
        hk->stream = a->stream;
        hk->cp = p;
        if (hook) *hook = &hk->base;
    } else if (hook) {
        *hook = NULL;
    }
    return EP_OK;
}

static ep_status_t cu_hook_run(ep_group_t *g, ep_hook_t *hook_base)
{
    cuda_impl_t *c = impl_of(g);
    struct cuda_hook *hook = (struct cuda_hook *)hook_base;
    ep_status_t st;
    if (!hook || (hook != &c->hooks[0] && hook != &c->hooks[1]))
        return ep_group_fail(g, -1, EP_ERR_INVALID, "rank %d: hook is not one of this group's",
                             g->rank);
    if (!hook->pending)
        return ep_group_fail(g, -1, EP_ERR_STATE, "rank %d: hook already ran", g->rank);
    hook->pending = 0;
    if ((st = cuda_check_err(g)) != EP_OK || (st = cuda_set_device(g)) != EP_OK) return st;
    if (hook->kind == 1)
        return cuda_launched(g, epk_ll_dispatch(&c->ctx, &hook->dp, 2, hook->stream),
                             "LL dispatch receive");
    return cuda_launched(g, epk_ll_combine(&c->ctx, &hook->cp, 2, hook->stream),
                         "LL combine receive");
}

static ep_status_t cu_layout(ep_group_t *g, const int32_t *topk_idx, int T, ep_ht_layout_t *l,
                             void *stream)
{
    ep_status_t st;
    if ((st = cuda_check_err(g)) != EP_OK || (st = cuda_set_device(g)) != EP_OK) return st;
    return cuda_launched(g,
                         epk_ht_layout(&impl_of(g)->ctx, topk_idx, T, l->num_tokens_per_rank,
                                       l->num_tokens_per_expert, l->is_token_in_rank, stream),
                         "dispatch layout");
}

ep_status_t cuda_get_scratch(ep_group_t *g, struct ht_scratch **out)
{
    cuda_impl_t *c = impl_of(g);
    const size_t R = (size_t)g->nranks,
                 T = (size_t)(g->cfg.ht_max_tokens > 0 ? g->cfg.ht_max_tokens : 1);
    pthread_mutex_lock(&c->sc_lock);
    struct ht_scratch *s = c->sc_free;
    if (s) c->sc_free = s->next;
    pthread_mutex_unlock(&c->sc_lock);
    if (!s) {
        s = calloc(1, sizeof *s);
        if (!s) return ep_group_fail(g, -1, EP_ERR_NOMEM, "rank %d: out of host memory", g->rank);
        size_t bytes = (T * R + 3 * R + 1) * 4;
        cudaError_t e = cudaMalloc(&s->mem, bytes);
        if (e != cudaSuccess) {
            free(s);
            return ep_group_fail(g, -1, EP_ERR_NOMEM, "rank %d: cudaMalloc of HT scratch: %s",
                                 g->rank, cudaGetErrorString(e));
        }
        int32_t *p = s->mem;
        s->st.pos = p;
        s->st.base_at = p + T * R;
        s->st.recv_from = s->st.base_at + R;
        s->st.n_recv = s->st.recv_from + R;
    }
    *out = s;
    return EP_OK;
}

void cuda_put_scratch(cuda_impl_t *c, struct ht_scratch *s)
{
    pthread_mutex_lock(&c->sc_lock);
    s->next = c->sc_free;
    c->sc_free = s;
    pthread_mutex_unlock(&c->sc_lock);
}

static ep_status_t cu_ht_dispatch(ep_group_t *g, const ep_ht_dispatch_args_t *a,
                                  ep_ht_dispatch_out_t *out, ep_ht_handle_t **handle)
{
    cuda_impl_t *c = impl_of(g);
    ep_status_t st;
    struct ht_scratch *sc = NULL;
    struct cuda_ht_handle *h = NULL;
    cudaError_t e;
    if ((st = cuda_check_err(g)) != EP_OK || (st = cuda_set_device(g)) != EP_OK) return st;
    if (!c->proxy && !c->inproc)
        return ep_group_fail(g, -1, EP_ERR_UNSUPPORTED,
                             "rank %d: cuda HT ops need all ranks in one process", g->rank);
    if ((st = cuda_get_scratch(g, &sc)) != EP_OK) return st;
    h = calloc(1, sizeof *h);
    if (!h) {
        st = ep_group_fail(g, -1, EP_ERR_NOMEM, "rank %d: out of host memory", g->rank);
        goto fail;
    }
    h->sc = sc;
    if (c->proxy) {
        if ((st = cuda_ht_dispatch_proxy(g, a, out, h, 0)) != EP_OK) goto fail;
        h->base.group = g;
        *handle = &h->base;
        return EP_OK;
    }
    const uint64_t seq = ++c->ht_seq;
    const epk_ht_ptrs_t mine = {
        .recv_x = (uint64_t)(uintptr_t)out->recv_x,
        .recv_scales = (uint64_t)(uintptr_t)out->recv_scales,
        .recv_topk_idx = (uint64_t)(uintptr_t)out->recv_topk_idx,
        .recv_topk_w = (uint64_t)(uintptr_t)out->recv_topk_weights,
        .capacity = (uint64_t)(out->capacity > 0 ? out->capacity : 0),
    };
    if ((st = cuda_launched(g,
                            epk_ht_prep(&c->ctx, &sc->st, a->topk_idx, a->num_tokens,
                                        a->expert_alignment, out->num_recv_per_expert, c->info_dev,
                                        &mine, seq, a->stream),
                            "HT count exchange")) != EP_OK)
        goto fail;
    if ((e = cudaStreamSynchronize((cudaStream_t)a->stream)) != cudaSuccess) {
        st = cuda_fail(g, e, "cudaStreamSynchronize after the HT count exchange");
        goto fail;
    }
    if ((st = cuda_check_err(g)) != EP_OK) goto fail;
    const volatile epk_ht_info_t *info = c->info_host;
    const int N = info->n_recv, R = g->nranks, me = g->rank;

    /* Copy-engine path: each run of consecutive tokens for a rank (this one included) is one
     * copy straight into that rank's recv_x; the SMs move only the small metadata. */
    int ce = c->ht_copy;
    for (int d = 0; d < R && ce; ++d)
        if (info->nruns[d] < 0 ||
            (uint64_t)(info->base_at[d] + info->count_to[d]) > info->capacity[d])
            ce = 0;
    epk_ht_dispatch_params_t p = {
        .x = a->x,
        .x_scales = a->x_scales,
        .use_fp8 = a->use_fp8,
        .num_tokens = a->num_tokens,
        .topk_idx = a->topk_idx,
        .topk_w = a->topk_weights,
        .recv_x = out->recv_x,
        .capacity = out->capacity,
        .recv_scales = out->recv_scales,
        .recv_topk_idx = out->recv_topk_idx,
        .recv_topk_w = out->recv_topk_weights,
        .blocks = c->ht_blocks,
        .local_rows_only = ce ? 2 : 0,
        .ptrs_ready = 1,
        .no_done = ce,
        .seq = seq,
    };
    c->ht_done += (uint64_t)c->ht_blocks;
    p.done_target = c->ht_done;
    cudaStream_t ms = (cudaStream_t)a->stream;
    if (ce) {
        const size_t rb = a->use_fp8 ? (size_t)g->cfg.hidden : (size_t)g->cfg.hidden * 2;
        if ((e = cudaEventRecord(c->ev_fork, ms)) != cudaSuccess ||
            (e = cudaStreamWaitEvent(c->cs, c->ev_fork, 0)) != cudaSuccess) {
            st = cuda_fail(g, e, "forking the copy stream");
            goto fail;
        }
        if ((e = cudaStreamWaitEvent(c->ss, c->ev_fork, 0)) != cudaSuccess) {
            st = cuda_fail(g, e, "forking the local copy stream");
            goto fail;
        }
        /* peers' rows on the copy stream, this rank's own rows on the other one: two copy
         * engines at once, no SM moves row data */
        for (int d = 0; d < R; ++d) {
            cudaStream_t cstream = d == me ? c->ss : c->cs;
            int rows = 0;
            for (int i = 0; i < info->nruns[d]; ++i) {
                const int first = info->runs[d][i][0], len = info->runs[d][i][1] - first + 1;
                e = cudaMemcpyAsync((uint8_t *)(uintptr_t)info->recv_x[d] +
                                        (size_t)(info->base_at[d] + rows) * rb,
                                    (const uint8_t *)a->x + (size_t)first * rb, (size_t)len * rb,
                                    cudaMemcpyDefault, cstream);
                if (e != cudaSuccess) {
                    st = cuda_fail(g, e, "HT dispatch copy to a peer");
                    goto fail;
                }
                rows += len;
            }
        }
    }
    /* The transfer runs even when this rank lacks room (peers skip rows past the capacity it
     * published), so that every rank stays in step. */
    if ((st = cuda_launched(g, epk_ht_dispatch(&c->ctx, &sc->st, &p, a->stream), "HT dispatch")) !=
        EP_OK)
        goto fail;
    if (ce) {
        if ((e = cudaEventRecord(c->ev_cs, c->cs)) != cudaSuccess ||
            (e = cudaEventRecord(c->ev_ss, c->ss)) != cudaSuccess ||
            (e = cudaStreamWaitEvent(ms, c->ev_cs, 0)) != cudaSuccess ||
            (e = cudaStreamWaitEvent(ms, c->ev_ss, 0)) != cudaSuccess) {
            st = cuda_fail(g, e, "joining the copy streams");
            goto fail;
        }
        if ((st = cuda_launched(g,
                                epk_ht_done(&c->ctx, (uint64_t)c->ht_blocks, p.done_target, 1, ms),
                                "HT dispatch completion")) != EP_OK)
            goto fail;
    }
    if (N > out->capacity) {
        st = ep_group_fail(g, -1, EP_ERR_INVALID,
                           "rank %d: HT dispatch receives %d rows, out.capacity is %d", g->rank, N,
                           out->capacity);
        goto fail;
    }
    for (int s = 0; s < R; ++s)
        h->recv_from[s] = info->recv_from[s];
    out->num_recv_tokens = N;
    h->base.group = g;
    h->sc = sc;
    h->num_tokens = a->num_tokens;
    h->num_recv = N;
    *handle = &h->base;
    return EP_OK;

fail:
    free(h);
    if (sc) cuda_put_scratch(c, sc);
    return st;
}

static ep_status_t cu_ht_dispatch_cached(ep_group_t *g, const ep_ht_handle_t *hb,
                                         const ep_ht_dispatch_args_t *a, ep_ht_dispatch_out_t *out)
{
    const struct cuda_ht_handle *h = (const struct cuda_ht_handle *)hb;
    cuda_impl_t *c = impl_of(g);
    ep_status_t st;
    if ((st = cuda_check_err(g)) != EP_OK || (st = cuda_set_device(g)) != EP_OK) return st;
    if (h->num_recv > out->capacity)
        return ep_group_fail(g, -1, EP_ERR_INVALID,
                             "rank %d: cached HT dispatch receives %d rows, out.capacity is %d",
                             g->rank, h->num_recv, out->capacity);
    if (c->proxy) return cuda_ht_dispatch_proxy(g, a, out, (struct cuda_ht_handle *)h, 1);
    epk_ht_dispatch_params_t p = {
        .x = a->x,
        .x_scales = a->x_scales,
        .use_fp8 = a->use_fp8,
        .num_tokens = h->num_tokens,
        .topk_idx = NULL,
        .recv_x = out->recv_x,
        .capacity = out->capacity,
        .recv_scales = out->recv_scales,
        .blocks = c->ht_blocks,
        .seq = ++c->ht_seq,
    };
    c->ht_done += (uint64_t)c->ht_blocks;
    p.done_target = c->ht_done;
    if ((st = cuda_launched(g, epk_ht_dispatch(&c->ctx, &h->sc->st, &p, a->stream),
                            "HT cached dispatch")) != EP_OK)
        return st;
    out->num_recv_tokens = h->num_recv;
    return EP_OK;
}

static ep_status_t cu_ht_combine(ep_group_t *g, const ep_ht_handle_t *hb, const uint16_t *x,
                                 uint16_t *out, void *stream)
{
    const struct cuda_ht_handle *h = (const struct cuda_ht_handle *)hb;
    cuda_impl_t *c = impl_of(g);
    ep_status_t st;
    if ((st = cuda_check_err(g)) != EP_OK || (st = cuda_set_device(g)) != EP_OK) return st;
    if (c->proxy) return cuda_ht_combine_proxy(g, h, x, out, stream);
    cudaStream_t ms = (cudaStream_t)stream;
    cudaError_t e;
    if (c->ht_copy) {
        /* Copy-engine path: every rank copies the block of rows it received from source s
         * (contiguous in x) back into s's staging area in chunks, each chunk announced on the
         * signal stream; the source sums its copies as the chunks land. */
        const int R = g->nranks, me = g->rank, H = g->cfg.hidden, NCH = HT_COMBINE_CHUNKS;
        const uint64_t stage_base = c->ht_comb_n * (uint64_t)NCH;
        c->ht_comb_n++;
        if ((e = cudaEventRecord(c->ev_fork, ms)) != cudaSuccess ||
            (e = cudaStreamWaitEvent(c->cs, c->ev_fork, 0)) != cudaSuccess ||
            (e = cudaStreamWaitEvent(c->ss, c->ev_fork, 0)) != cudaSuccess)
            return cuda_fail(g, e, "forking the copy streams");
        for (int ch = 0; ch < NCH; ++ch) {
            int base = 0;
            for (int s = 0; s < R; ++s) {
                const int n = h->recv_from[s];
                const int r0 = (int)((long long)ch * n / NCH),
                          r1 = (int)((long long)(ch + 1) * n / NCH);
                if (s != me && r1 > r0) {
                    e = cudaMemcpyAsync(c->ctx.base[s] + c->ctx.lay.ht_stage +
                                            ((size_t)me * g->cfg.ht_max_tokens + r0) * H * 2,
                                        x + (size_t)(base + r0) * H, (size_t)(r1 - r0) * H * 2,
                                        cudaMemcpyDefault, c->cs);
                    if (e != cudaSuccess) return cuda_fail(g, e, "HT combine copy to a peer");
                }
                base += n;
            }
            if ((e = cudaEventRecord(c->ev_chunk[ch], c->cs)) != cudaSuccess ||
                (e = cudaStreamWaitEvent(c->ss, c->ev_chunk[ch], 0)) != cudaSuccess)
                return cuda_fail(g, e, "ordering the combine signals");
            if ((st = cuda_launched(g, epk_ht_stage_signal(&c->ctx, stage_base + ch + 1, c->ss),
                                    "HT combine signal")) != EP_OK)
                return st;
        }
        if ((st = cuda_launched(g,
                                epk_ht_combine_staged(&c->ctx, &h->sc->st, x, out, h->num_tokens,
                                                      c->ht_blocks, NCH, stage_base, ms),
                                "HT combine sum")) != EP_OK)
            return st;
        if ((e = cudaEventRecord(c->ev_cs, c->cs)) != cudaSuccess ||
            (e = cudaEventRecord(c->ev_ss, c->ss)) != cudaSuccess ||
            (e = cudaStreamWaitEvent(ms, c->ev_cs, 0)) != cudaSuccess ||
            (e = cudaStreamWaitEvent(ms, c->ev_ss, 0)) != cudaSuccess)
            return cuda_fail(g, e, "joining the copy streams");
        return EP_OK;
    }
    const uint64_t seq = ++c->ht_seq;
    c->ht_done += (uint64_t)c->ht_blocks;
    return cuda_launched(g,
                         epk_ht_combine(&c->ctx, &h->sc->st, x, out, h->num_tokens, c->ht_blocks,
                                        seq, c->ht_done, stream),
                         "HT combine");
}

static void cu_ht_handle_destroy(ep_ht_handle_t *hb)
{
    struct cuda_ht_handle *h = (struct cuda_ht_handle *)hb;
    if (!h) return;
    if (h->base.group && h->base.group->impl && h->sc)
        cuda_put_scratch(impl_of(h->base.group), h->sc);
    free(h);
}

static ep_status_t cu_allgather(ep_group_t *g, const void *in, void *out, size_t len)
{
    cuda_impl_t *c = impl_of(g);
    ep_wire_t *w = c->proxy ? c->wire : c->ag_wire;
    if (!w)
        return ep_group_fail(g, -1, EP_ERR_UNSUPPORTED,
                             "ep_group_allgather: the cuda backend's ranks are in several "
                             "processes over nvlink (CUDA IPC), with no host path between them");
    ep_status_t st = ep_wire_allgather(w, c->proxy ? c->ctx.lay.ag : 0, ++c->ag_call, in, out, len);
    if (st == EP_OK || st == EP_ERR_ABORTED) return st;
    int fp = atomic_load(&w->failed_peer);
    return ep_group_fail(g, fp >= 0 && fp < g->nranks ? fp : -1, st, "%s", w->error);
}

static void cu_abort(ep_group_t *g)
{
    cuda_impl_t *c = impl_of(g);
    if (!c || !c->err_host) return;
    if (c->wire) atomic_store(&c->wire->aborted, 1); /* host waits of HT on the proxy path */
    if (c->ag_wire) atomic_store(&c->ag_wire->aborted, 1);
    volatile int *e = c->err_host;
    if (e[EPK_ERR_CODE] == EPK_CODE_OK) {
        e[EPK_ERR_PEER] = atomic_load(&g->failed_peer);
        __sync_synchronize();
        e[EPK_ERR_CODE] = EPK_CODE_ABORT;
    }
}

const struct ep_backend_ops ep_backend_cuda_ops = {
    .name = "cuda",
    .create = cu_create,
    .destroy = cu_destroy,
    .route = cu_route,
    .ll_dispatch = cu_ll_dispatch,
    .ll_combine = cu_ll_combine,
    .hook_run = cu_hook_run,
    .get_dispatch_layout = cu_layout,
    .ht_dispatch = cu_ht_dispatch,
    .ht_dispatch_cached = cu_ht_dispatch_cached,
    .ht_combine = cu_ht_combine,
    .ht_handle_destroy = cu_ht_handle_destroy,
    .allgather = cu_allgather,
    .abort = cu_abort,
    .check = cuda_check_err,
};
