//! The `interceptor` binary: node agent and CLI.

/// jemalloc gives memory back to the system; glibc's malloc kept the agent's peak after a
/// burst of 10,000 connections closed (BENCHMARKS.md, "Soak").
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read once at its start (the `_rjem_` prefix is tikv-jemallocator's):
/// a background thread returns freed pages to the system after about a second
/// (`dirty_decay_ms`), at once for pages already purged lazily (`muzzy_decay_ms`), without
/// waiting for the next allocation to trigger it.
/// jemalloc reads it as a C string (`const char *`), hence a thin pointer to a NUL-terminated
/// byte string.
#[unsafe(export_name = "_rjem_malloc_conf")]
static MALLOC_CONF: &u8 = &b"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0\0"[0];

fn main() -> std::process::ExitCode {
    interceptor::cli::main()
}
