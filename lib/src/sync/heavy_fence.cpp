#include "sync/heavy_fence.hpp"

#include <linux/membarrier.h>
#include <sys/syscall.h>
#include <unistd.h>

namespace lim::detail {

bool heavy_fence() noexcept {
    // MEMBARRIER_CMD_GLOBAL (called MEMBARRIER_CMD_SHARED before Linux 4.16): the only command
    // that reaches threads of other processes without their registering first. The expedited
    // commands are cheaper but per process (or need every process to register), and a segment's
    // processes are independent programs.
    return syscall(SYS_membarrier, MEMBARRIER_CMD_GLOBAL, 0, 0) == 0;
}

}  // namespace lim::detail
