//! The agent's memory as its allocator (jemalloc) sees it, for the metrics port: what the
//! agent's data holds (`allocated`, less what threads keep `cached` for reuse) against what
//! the allocator keeps resident for it (`resident`), so a growing resident set can be told
//! apart as live data or allocator pages.

use std::fmt::Write as _;

use tikv_jemalloc_ctl::{epoch, stats};

/// The bytes in all threads' caches, all arenas merged.
const TCACHE_BYTES: &[u8] = b"stats.arenas.4096.tcache_bytes\0";

/// jemalloc's statistics, in bytes, as of one refresh.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryFigures {
    /// Bytes in allocations of the agent, including freed ones its threads' caches keep.
    pub allocated: usize,
    /// Of `allocated`, the bytes freed into threads' caches (jemalloc's tcache) for reuse: an
    /// idle thread keeps its cache, so live data is `allocated - cached`.
    pub cached: usize,
    /// Bytes in the pages that hold live allocations.
    pub active: usize,
    /// Bytes of jemalloc's own bookkeeping.
    pub metadata: usize,
    /// Bytes the allocator keeps in physical memory: active pages, metadata and dirty pages
    /// not yet returned.
    pub resident: usize,
}

/// Why the figures could not be read.
#[derive(Debug, thiserror::Error)]
#[error("reading jemalloc's statistics: {0}")]
pub struct MemoryError(#[from] tikv_jemalloc_ctl::Error);

impl MemoryFigures {
    /// Refreshes jemalloc's statistics and reads them.
    pub fn read() -> Result<Self, MemoryError> {
        epoch::advance()?;
        // SAFETY: a NUL-terminated name of a `size_t` statistic (jemalloc's `stats.arenas.<i>`
        // with i = MALLCTL_ARENAS_ALL, 4096: all arenas merged), read as `usize`.
        let cached = unsafe { tikv_jemalloc_ctl::raw::read::<usize>(TCACHE_BYTES)? };
        Ok(Self {
            allocated: stats::allocated::read()?,
            cached,
            active: stats::active::read()?,
            metadata: stats::metadata::read()?,
            resident: stats::resident::read()?,
        })
    }

    /// Appends the figures as the gauge `interceptor_memory_bytes{kind=...}`.
    pub fn render(&self, out: &mut String) {
        let name = "interceptor_memory_bytes";
        let _ = writeln!(
            out,
            "# HELP {name} The agent's memory as its allocator counts it: allocated (its allocations, with cached), cached (freed into thread caches for reuse; live data is allocated - cached), active (pages holding them), metadata (the allocator's own), resident (all it keeps in physical memory).\n# TYPE {name} gauge"
        );
        for (kind, bytes) in [
            ("allocated", self.allocated),
            ("cached", self.cached),
            ("active", self.active),
            ("metadata", self.metadata),
            ("resident", self.resident),
        ] {
            let _ = writeln!(out, "{name}{{kind=\"{kind}\"}} {bytes}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_live_allocation_shows_in_allocated_and_the_figures_render_as_gauges() {
        const HELD: usize = 64 << 20;
        let before = MemoryFigures::read().expect("statistics");
        let held = std::hint::black_box(vec![1u8; HELD]);
        let during = MemoryFigures::read().expect("statistics");
        drop(held);
        // Tests running alongside allocate and free too, hence the slack.
        assert!(
            during.allocated + (16 << 20) >= before.allocated + HELD,
            "{before:?} then {during:?}"
        );
        assert!(
            during.cached <= during.allocated
                && during.allocated <= during.active
                && during.active <= during.resident,
            "{during:?}"
        );
        let mut out = String::new();
        during.render(&mut out);
        assert!(out.contains("# TYPE interceptor_memory_bytes gauge"));
        for (kind, bytes) in [
            ("allocated", during.allocated),
            ("cached", during.cached),
            ("resident", during.resident),
        ] {
            assert!(
                out.contains(&format!(
                    "interceptor_memory_bytes{{kind=\"{kind}\"}} {bytes}\n"
                )),
                "{out}"
            );
        }
    }
}
