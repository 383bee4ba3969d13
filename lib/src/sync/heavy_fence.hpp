// The heavy side of an asymmetric fence, across processes.
//
// Some hot paths publish "I am in the middle of an operation on record r" with a plain store
// (`SlotHeader::pending`, no stronger than release) and then load a shared word, with no fence
// between: a fence there would cost every operation a few nanoseconds for the sake of a check
// that runs once in thousands of configuration switches (docs/design.md, "Generation checkpoints").
// The rare side pays instead: heavy_fence() makes every thread on the host, in every process, pass
// through a full memory barrier, so that the pairing is as if each of those hot paths had a full
// fence between its store and its load. After it returns, a thread that loaded the shared word
// before the caller's last write to it has its announcement visible to the caller's loads.
#pragma once

namespace lim::detail {

// membarrier(MEMBARRIER_CMD_GLOBAL): every running thread of every process executes a full
// barrier before this returns (threads not running have been through a context switch, itself
// one). Blocks for an RCU grace period: milliseconds. Returns false, having done nothing, when
// the kernel or a seccomp policy refuses the call (Linux before 4.3, some sandboxes, and every
// kernel booted with nohz_full, which refuses this command with EINVAL); the caller then falls
// back as its own comment says. Never throws; no allocation.
bool heavy_fence() noexcept;

}  // namespace lim::detail
