/* wisp test guest: virtio-mmio block driver (ring 3). */
#include "guest.h"

const char *test_blk_read(void) { return "not implemented"; }
const char *test_blk_write(void) { return "not implemented"; }
const char *test_blk_ro(void) { return "not implemented"; }
const char *test_blk_id(void) { return "not implemented"; }
const char *test_blk_two(void) { return "not implemented"; }
const char *test_blk_irq(void) { return "not implemented"; }
const char *test_blk_bench(void) { return "not implemented"; }
