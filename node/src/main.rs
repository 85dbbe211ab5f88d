//! The `hearth` binary.

// The store and the event pipeline allocate many small, short-lived buffers per
// message; glibc's allocator spent about a quarter of the node's CPU on them under
// load (docs/benchmarks.md), mimalloc much less.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    hearth_node::cli::main()
}
