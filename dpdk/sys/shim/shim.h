/*
 * The part of DPDK that has no symbol to link: static-inline functions (bursts, mbuf
 * accessors, rte_errno) wrapped in real functions, plus two helpers that fill DPDK's
 * configuration structures (unions and bitfields are simpler to fill in C than through
 * bindgen). Everything else is bound directly by bindgen from the headers below.
 */
#ifndef HIVEFS_DPDK_SHIM_H
#define HIVEFS_DPDK_SHIM_H

#include <stddef.h>
#include <stdint.h>
#include <rte_eal.h>
#include <rte_errno.h>
#include <rte_ethdev.h>
#include <rte_flow.h>
#include <rte_lcore.h>
#include <rte_mbuf.h>
#include <rte_mempool.h>

int hv_errno(void);
unsigned hv_lcore_id(void);

uint16_t hv_rx_burst(uint16_t port, uint16_t queue, struct rte_mbuf **pkts, uint16_t n);
uint16_t hv_tx_burst(uint16_t port, uint16_t queue, struct rte_mbuf **pkts, uint16_t n);

/*
 * A packet-buffer pool like rte_pktmbuf_pool_create's, but with its buffers packed back
 * to back when IOVA addresses are virtual ones (RTE_MEMPOOL_F_NO_IOVA_CONTIG: a buffer
 * may then cross a page boundary, which costs nothing in IOVA-as-VA mode). The default
 * layout keeps every buffer inside one page: on 4 KiB pages (--no-huge) that is one
 * 2.3 KiB buffer per page. NULL on failure (rte_errno set).
 */
struct rte_mempool *hv_pktmbuf_pool_create_packed(const char *name, unsigned n,
                                                  unsigned cache, uint16_t data_room,
                                                  int socket);
/*
 * 1 if every buffer of the pool lies within populated_size x object size bytes of the
 * start of its first memory chunk (what net_af_xdp 22.11 registers as its UMEM when it
 * shares the pool's memory with the kernel), else 0.
 */
int hv_mempool_dense(struct rte_mempool *pool);

struct rte_mbuf *hv_pktmbuf_alloc(struct rte_mempool *pool);
int hv_pktmbuf_alloc_bulk(struct rte_mempool *pool, struct rte_mbuf **out, unsigned n);
void hv_pktmbuf_free(struct rte_mbuf *m);
/* First byte of packet data, its length in this segment, segments, and room behind it. */
uint8_t *hv_mbuf_data(struct rte_mbuf *m);
uint16_t hv_mbuf_data_len(const struct rte_mbuf *m);
uint32_t hv_mbuf_pkt_len(const struct rte_mbuf *m);
uint16_t hv_mbuf_nb_segs(const struct rte_mbuf *m);
uint16_t hv_mbuf_tailroom(const struct rte_mbuf *m);
/* Extends the data by len bytes; NULL (mbuf unchanged) without room. */
uint8_t *hv_mbuf_append(struct rte_mbuf *m, uint16_t len);
/* Keeps the first len bytes (len <= data length). */
void hv_mbuf_trim_to(struct rte_mbuf *m, uint16_t len);

/*
 * Configures a port with nb_rx receive and nb_tx transmit queues. With rss != 0 and
 * more than one receive queue, packets are spread by an IPv4/TCP hash where the device
 * offers it (the device's supported hash functions are intersected with ours; none in
 * common: no RSS, reported as 1 in *rss_used = 0). Returns 0 or a negative errno.
 */
int hv_port_configure(uint16_t port, uint16_t nb_rx, uint16_t nb_tx, int rss, int *rss_used);

/*
 * A flow rule: IPv4 TCP packets whose destination port, masked with mask, equals dport
 * go to receive queue `queue`. Validated first. NULL on refusal, with the device's
 * reason in err (errlen bytes, NUL-terminated).
 */
struct rte_flow *hv_flow_tcp_dport_to_queue(uint16_t port, uint16_t dport, uint16_t mask,
                                            uint16_t queue, char *err, size_t errlen);
int hv_flow_destroy(uint16_t port, struct rte_flow *flow);

#endif
