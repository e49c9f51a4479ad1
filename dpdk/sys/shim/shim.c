/* See shim.h. */
#include "shim.h"

#include <rte_mbuf_pool_ops.h>
#include <stdio.h>
#include <string.h>

int hv_errno(void) { return rte_errno; }
unsigned hv_lcore_id(void) { return rte_lcore_id(); }

uint16_t hv_rx_burst(uint16_t port, uint16_t queue, struct rte_mbuf **pkts, uint16_t n)
{
    return rte_eth_rx_burst(port, queue, pkts, n);
}

uint16_t hv_tx_burst(uint16_t port, uint16_t queue, struct rte_mbuf **pkts, uint16_t n)
{
    return rte_eth_tx_burst(port, queue, pkts, n);
}

struct rte_mempool *hv_pktmbuf_pool_create_packed(const char *name, unsigned n,
                                                  unsigned cache, uint16_t data_room,
                                                  int socket)
{
    struct rte_pktmbuf_pool_private priv;
    unsigned flags = rte_eal_iova_mode() == RTE_IOVA_VA ? RTE_MEMPOOL_F_NO_IOVA_CONTIG : 0;
    struct rte_mempool *mp;
    int rc;

    memset(&priv, 0, sizeof(priv));
    priv.mbuf_data_room_size = data_room;
    priv.mbuf_priv_size = 0;
    mp = rte_mempool_create_empty(name, n, sizeof(struct rte_mbuf) + data_room, cache,
                                  sizeof(priv), socket, flags);
    if (mp == NULL)
        return NULL;
    rc = rte_mempool_set_ops_byname(mp, rte_mbuf_best_mempool_ops(), NULL);
    if (rc != 0)
        goto fail;
    rte_pktmbuf_pool_init(mp, &priv);
    rc = rte_mempool_populate_default(mp);
    if (rc < 0)
        goto fail;
    rte_mempool_obj_iter(mp, rte_pktmbuf_init, NULL);
    return mp;
fail:
    rte_mempool_free(mp);
    rte_errno = -rc;
    return NULL;
}

struct dense_check {
    uintptr_t start;
    uintptr_t limit;
    int ok;
};

static void dense_obj(struct rte_mempool *mp, void *opaque, void *obj, unsigned idx)
{
    struct dense_check *d = opaque;
    uintptr_t begin = (uintptr_t)obj - mp->header_size;
    uintptr_t end = (uintptr_t)obj + mp->elt_size + mp->trailer_size;
    (void)idx;
    if (begin < d->start || end > d->limit)
        d->ok = 0;
}

int hv_mempool_dense(struct rte_mempool *pool)
{
    struct dense_check d;
    struct rte_mempool_memhdr *first = STAILQ_FIRST(&pool->mem_list);
    size_t obj = pool->header_size + pool->elt_size + pool->trailer_size;

    if (first == NULL)
        return 0;
    d.start = (uintptr_t)first->addr;
    d.limit = d.start + (uintptr_t)pool->populated_size * obj;
    d.ok = 1;
    rte_mempool_obj_iter(pool, dense_obj, &d);
    return d.ok;
}

struct rte_mbuf *hv_pktmbuf_alloc(struct rte_mempool *pool) { return rte_pktmbuf_alloc(pool); }

int hv_pktmbuf_alloc_bulk(struct rte_mempool *pool, struct rte_mbuf **out, unsigned n)
{
    return rte_pktmbuf_alloc_bulk(pool, out, n);
}

void hv_pktmbuf_free(struct rte_mbuf *m) { rte_pktmbuf_free(m); }
uint8_t *hv_mbuf_data(struct rte_mbuf *m) { return rte_pktmbuf_mtod(m, uint8_t *); }
uint16_t hv_mbuf_data_len(const struct rte_mbuf *m) { return m->data_len; }
uint32_t hv_mbuf_pkt_len(const struct rte_mbuf *m) { return m->pkt_len; }
uint16_t hv_mbuf_nb_segs(const struct rte_mbuf *m) { return m->nb_segs; }
uint16_t hv_mbuf_tailroom(const struct rte_mbuf *m) { return rte_pktmbuf_tailroom(m); }

uint8_t *hv_mbuf_append(struct rte_mbuf *m, uint16_t len)
{
    return (uint8_t *)rte_pktmbuf_append(m, len);
}

void hv_mbuf_trim_to(struct rte_mbuf *m, uint16_t len)
{
    if (m->nb_segs == 1 && len <= m->data_len) {
        m->data_len = len;
        m->pkt_len = len;
    }
}

int hv_port_configure(uint16_t port, uint16_t nb_rx, uint16_t nb_tx, int rss, int *rss_used)
{
    struct rte_eth_dev_info info;
    struct rte_eth_conf conf;
    int rc = rte_eth_dev_info_get(port, &info);
    if (rc != 0)
        return rc;
    memset(&conf, 0, sizeof(conf));
    *rss_used = 0;
    if (rss && nb_rx > 1) {
        uint64_t want = RTE_ETH_RSS_NONFRAG_IPV4_TCP | RTE_ETH_RSS_IPV4;
        uint64_t hf = want & info.flow_type_rss_offloads;
        if (hf != 0) {
            conf.rxmode.mq_mode = RTE_ETH_MQ_RX_RSS;
            conf.rx_adv_conf.rss_conf.rss_key = NULL;
            conf.rx_adv_conf.rss_conf.rss_hf = hf;
            *rss_used = 1;
        }
    }
    return rte_eth_dev_configure(port, nb_rx, nb_tx, &conf);
}

struct rte_flow *hv_flow_tcp_dport_to_queue(uint16_t port, uint16_t dport, uint16_t mask,
                                            uint16_t queue, char *err, size_t errlen)
{
    struct rte_flow_attr attr;
    struct rte_flow_item pattern[4];
    struct rte_flow_action actions[2];
    struct rte_flow_item_tcp tcp_spec, tcp_mask;
    struct rte_flow_action_queue q;
    struct rte_flow_error ferr;
    struct rte_flow *flow;

    memset(&attr, 0, sizeof(attr));
    attr.ingress = 1;
    memset(pattern, 0, sizeof(pattern));
    memset(actions, 0, sizeof(actions));
    memset(&tcp_spec, 0, sizeof(tcp_spec));
    memset(&tcp_mask, 0, sizeof(tcp_mask));
    memset(&ferr, 0, sizeof(ferr));
    tcp_spec.hdr.dst_port = rte_cpu_to_be_16(dport & mask);
    tcp_mask.hdr.dst_port = rte_cpu_to_be_16(mask);
    pattern[0].type = RTE_FLOW_ITEM_TYPE_ETH;
    pattern[1].type = RTE_FLOW_ITEM_TYPE_IPV4;
    pattern[2].type = RTE_FLOW_ITEM_TYPE_TCP;
    pattern[2].spec = &tcp_spec;
    pattern[2].mask = &tcp_mask;
    pattern[3].type = RTE_FLOW_ITEM_TYPE_END;
    q.index = queue;
    actions[0].type = RTE_FLOW_ACTION_TYPE_QUEUE;
    actions[0].conf = &q;
    actions[1].type = RTE_FLOW_ACTION_TYPE_END;

    if (rte_flow_validate(port, &attr, pattern, actions, &ferr) != 0) {
        snprintf(err, errlen, "%s", ferr.message ? ferr.message : "flow rule refused");
        return NULL;
    }
    flow = rte_flow_create(port, &attr, pattern, actions, &ferr);
    if (flow == NULL)
        snprintf(err, errlen, "%s", ferr.message ? ferr.message : "flow rule not created");
    return flow;
}

int hv_flow_destroy(uint16_t port, struct rte_flow *flow)
{
    struct rte_flow_error ferr;
    return rte_flow_destroy(port, flow, &ferr);
}
