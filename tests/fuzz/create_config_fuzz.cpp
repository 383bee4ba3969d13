// libFuzzer target: `limctl create` files. The loader limctl runs (tools/limctl/create_kinds.cpp)
// must answer any text with a plan or a UsageError / lim::Error, and a plan it returns must hold
// options lim accepts.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string_view>

#include "common.hpp"
#include "create_kinds.hpp"
#include "lim/error.hpp"
#include "shm/segment_state.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
    const std::string_view text(reinterpret_cast<const char*>(data), size);
    try {
        const limctl::CreatePlan plan = limctl::load_create_plan_text(text, "fuzz.toml");
        lim::detail::validate_options(plan.options);  // what the loader accepted, lim accepts
    } catch (const limctl::UsageError&) {
    } catch (const lim::Error&) {
        std::abort();  // the loader reports bad files as UsageError, never lets lim refuse them
    }
    return 0;
}
