/* wisp test guest: virtio-mmio (version 2) transport definitions. */
#ifndef VIRTIO_H
#define VIRTIO_H
#include "guest.h"

#define VMMIO_MAGIC      0x000
#define VMMIO_VERSION    0x004
#define VMMIO_DEVICE_ID  0x008
#define VMMIO_DEV_FEAT   0x010
#define VMMIO_DEV_FSEL   0x014
#define VMMIO_DRV_FEAT   0x020
#define VMMIO_DRV_FSEL   0x024
#define VMMIO_QUEUE_SEL  0x030
#define VMMIO_QUEUE_MAX  0x034
#define VMMIO_QUEUE_NUM  0x038
#define VMMIO_QUEUE_RDY  0x044
#define VMMIO_NOTIFY     0x050
#define VMMIO_INT_STATUS 0x060
#define VMMIO_INT_ACK    0x064
#define VMMIO_STATUS     0x070
#define VMMIO_DESC_LO    0x080
#define VMMIO_DESC_HI    0x084
#define VMMIO_AVAIL_LO   0x090
#define VMMIO_AVAIL_HI   0x094
#define VMMIO_USED_LO    0x0a0
#define VMMIO_USED_HI    0x0a4
#define VMMIO_CONFIG     0x100

#define ST_ACK 1
#define ST_DRIVER 2
#define ST_DRIVER_OK 4
#define ST_FEATURES_OK 8

#define F_VERSION_1 (1UL << 32)
#define QSIZE_MAX 256
#define MAX_MMIO 32

struct vdesc { u64 addr; u32 len; u16 flags, next; };
struct vavail { u16 flags, idx, ring[QSIZE_MAX], used_event; };
struct vused_elem { u32 id, len; };
struct vused { u16 flags, idx; struct vused_elem ring[QSIZE_MAX]; u16 avail_event; };

struct mmio_dev { u64 base, size; u32 gsi, irqflags; };
extern struct mmio_dev mdevs[MAX_MMIO];
extern int nmdevs;
void virtio_discover(void);

static inline void mb(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
#endif
