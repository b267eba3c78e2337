//! A snapshot of guest RAM that can be put back by rewriting only the pages written since.
//!
//! [`MemorySnapshot::take`] copies the pages of guest RAM that hold data (see
//! [`WriteTracker::present`]) and write-protects all of RAM; [`MemorySnapshot::restore`] asks
//! the tracker which pages were written since, copies the snapshot's content back into each of
//! them (or zeros it when the snapshot had nothing there, which reads as zeros), and protects
//! them again. Pages are written in place, never dropped (`MADV_DONTNEED`): the next call
//! would pay a fresh page fault (7-36 µs here) for every page it touches again, against ~0.6 µs
//! for rewriting it.
//!
//! Every access goes through vm-memory's bounds-checked API (a `memcpy` once the region is
//! found), so taking and restoring need no `unsafe`: rewriting 2,000 pages that way took
//! 0.62-0.79 ms against 0.56-0.72 ms through raw pointers (the `bench_` test). [`FullCopy`] is the test aid that checks a restore
//! byte for byte.

use std::ops::Range;
use std::time::Instant;

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::tracker::{PAGE_SIZE, TrackerError, WriteTracker};
use crate::memory::GuestMemory;

/// Most written pages a restore leaves writable (16 MiB): see [`MemorySnapshot::restore`].
pub const KEEP_WRITABLE_PAGES: u64 = 4096;

/// A page of zeros, the content of every page a snapshot does not hold.
static ZERO_PAGE: [u8; PAGE_SIZE] = [0; PAGE_SIZE];

/// Errors from taking or restoring a [`MemorySnapshot`].
#[derive(Debug, thiserror::Error)]
pub enum ResetError {
    /// Finding or protecting written pages failed.
    #[error(transparent)]
    Tracker(#[from] TrackerError),
    /// Guest RAM is not one region.
    #[error(
        "VM reuse supports guest RAM in one region (at most 3 GiB), this VM has {0} regions: \
         give it less RAM or run it without reuse"
    )]
    Regions(usize),
    /// The tracker does not watch exactly the guest RAM region.
    #[error(
        "the write tracker does not cover guest RAM exactly (a bug in the VMM): this VM cannot \
         be reused"
    )]
    TrackerMismatch,
    /// The snapshot does not fit in host memory.
    #[error("cannot allocate {mib} MiB for the memory snapshot: run without VM reuse")]
    OutOfMemory {
        /// Size asked for, in MiB.
        mib: usize,
    },
    /// Reading or writing guest RAM failed.
    #[error("cannot access guest RAM at {addr:#x} for a reset: {source}")]
    Access {
        /// Guest-physical address.
        addr: u64,
        /// What vm-memory reported.
        source: vm_memory::GuestMemoryError,
    },
}

/// What one [`MemorySnapshot::restore`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RestoreStats {
    /// Pages written since the snapshot or the last restore (each is copied or zeroed).
    pub pages_written: u64,
    /// Written pages the snapshot held, whose content was copied back.
    pub pages_copied: u64,
    /// Written pages the snapshot did not hold (they read as zeros in it), zeroed in place.
    pub pages_zeroed: u64,
    /// Time the whole restore took, finding, rewriting and re-protecting the pages, in
    /// microseconds.
    pub micros: u64,
}

/// The content of guest RAM at one point in time: every page that held data, in page order.
#[derive(Debug)]
pub struct MemorySnapshot {
    /// Guest-physical address of the start of RAM (of the tracked region).
    base: u64,
    /// Page numbers (offset from `base` / [`PAGE_SIZE`]) of the pages held, ascending.
    pages: Vec<usize>,
    /// The content of `pages[i]` at `data[i * PAGE_SIZE..][..PAGE_SIZE]`.
    data: Vec<u8>,
}

/// How [`MemorySnapshot::restore`] protects the pages it rewrote. Measured on 1 GiB of RAM
/// with 2,000 pages written: [`Reprotect::Written`] 0.6-0.75 ms, [`Reprotect::All`] 7.5-10.6
/// ms, so restore uses the first.
#[derive(Debug, Clone, Copy)]
enum Reprotect {
    /// PAGEMAP_SCAN with PM_SCAN_WP_MATCHING: only the written pages.
    #[cfg_attr(not(test), allow(dead_code))]
    Written,
    /// None while the written pages are at most this many; else as `Written`.
    WrittenOver(u64),
    /// UFFDIO_WRITEPROTECT over the whole range.
    #[cfg_attr(not(test), allow(dead_code))]
    All,
}

/// The region of `mem` the tracker watches: its guest address; `mem` must be that one region.
fn tracked_region(mem: &GuestMemory, tracker: &WriteTracker) -> Result<u64, ResetError> {
    if mem.num_regions() != 1 {
        return Err(ResetError::Regions(mem.num_regions()));
    }
    let region = mem.iter().next().ok_or(ResetError::Regions(0))?;
    let start = region.start_addr();
    let host = mem
        .get_host_address(start)
        .map_err(|source| ResetError::Access {
            addr: start.0,
            source,
        })?;
    let same_len = usize::try_from(region.len()).is_ok_and(|len| len == tracker.len());
    if host != tracker.host() || !same_len {
        return Err(ResetError::TrackerMismatch);
    }
    Ok(start.0)
}

/// Guest address `offset` bytes past `base`.
fn guest(base: u64, offset: usize) -> u64 {
    // Offsets come from the tracker and lie inside the region, whose end fits in u64.
    base.saturating_add(offset as u64)
}

impl MemorySnapshot {
    /// Copies every page of guest RAM that holds data and write-protects all of RAM, so that
    /// [`restore`](Self::restore) finds what changes from here on. `tracker` must watch the
    /// one region of `mem`. The vCPU must not run meanwhile.
    pub fn take(mem: &GuestMemory, tracker: &WriteTracker) -> Result<MemorySnapshot, ResetError> {
        let base = tracked_region(mem, tracker)?;
        let mut ranges = Vec::new();
        tracker.present(&mut ranges)?;
        let mut pages: Vec<usize> = ranges
            .iter()
            .flat_map(|r| (r.start..r.end).step_by(PAGE_SIZE))
            .map(|offset| offset / PAGE_SIZE)
            .collect();
        // Pages protected earlier and not present: never-touched ones (zeros, the usual case
        // when this tracker protected before) or swapped out ones. Only reading them tells.
        tracker.protected_swapped(&mut ranges)?;
        let mut page = [0u8; PAGE_SIZE];
        let mut unsure = false;
        for offset in ranges
            .iter()
            .flat_map(|r| (r.start..r.end).step_by(PAGE_SIZE))
        {
            let addr = guest(base, offset);
            mem.read_slice(&mut page, GuestAddress(addr))
                .map_err(|source| ResetError::Access { addr, source })?;
            if page.iter().any(|&b| b != 0) {
                pages.push(offset / PAGE_SIZE);
                unsure = true;
            }
        }
        if unsure {
            pages.sort_unstable();
        }
        let bytes = pages.len() * PAGE_SIZE;
        let mut data = Vec::new();
        data.try_reserve_exact(bytes)
            .map_err(|_| ResetError::OutOfMemory { mib: bytes >> 20 })?;
        data.resize(bytes, 0);
        // Copy runs of consecutive pages at once.
        let mut first = 0;
        while first < pages.len() {
            let mut last = first;
            while pages.get(last + 1) == Some(&(pages[last] + 1)) {
                last += 1;
            }
            let addr = guest(base, pages[first] * PAGE_SIZE);
            let into = &mut data[first * PAGE_SIZE..(last + 1) * PAGE_SIZE];
            mem.read_slice(into, GuestAddress(addr))
                .map_err(|source| ResetError::Access { addr, source })?;
            first = last + 1;
        }
        tracker.protect_all()?;
        Ok(MemorySnapshot { base, pages, data })
    }

    /// Number of pages the snapshot holds.
    pub fn pages(&self) -> usize {
        self.pages.len()
    }

    /// Puts every page written since the snapshot (or the last restore) back to its content
    /// in the snapshot, so that guest RAM equals the snapshot byte for byte. `mem` and
    /// `tracker` must be those the snapshot was taken with, and the vCPU must not run meanwhile.
    ///
    /// The written pages stay writable while they are at most [`KEEP_WRITABLE_PAGES`]: the
    /// next call then takes no write-protect fault on the pages the last one wrote (on kvm_pvm
    /// each is an exit, ~5 µs), and they keep counting as written, so the next restore rewrites
    /// them all again (~0.3 µs each). More than that, they are write-protected again, which
    /// bounds what a restore rewrites.
    pub fn restore(
        &self,
        mem: &GuestMemory,
        tracker: &WriteTracker,
    ) -> Result<RestoreStats, ResetError> {
        self.restore_with(mem, tracker, Reprotect::WrittenOver(KEEP_WRITABLE_PAGES))
    }

    /// [`restore`](Self::restore), re-protecting as `reprotect` says.
    fn restore_with(
        &self,
        mem: &GuestMemory,
        tracker: &WriteTracker,
        reprotect: Reprotect,
    ) -> Result<RestoreStats, ResetError> {
        let started = Instant::now();
        if tracked_region(mem, tracker)? != self.base {
            return Err(ResetError::TrackerMismatch);
        }
        let mut written = Vec::new();
        tracker.written(&mut written)?;
        let mut stats = self.rewrite(mem, &written)?;
        match reprotect {
            Reprotect::WrittenOver(keep) if stats.pages_written <= keep => {}
            Reprotect::Written | Reprotect::WrittenOver(_) => tracker.protect_written()?,
            Reprotect::All => tracker.protect_all()?,
        }
        stats.micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        Ok(stats)
    }

    /// Rewrites the pages of `written` (sorted offsets) from the snapshot.
    fn rewrite(
        &self,
        mem: &GuestMemory,
        written: &[Range<usize>],
    ) -> Result<RestoreStats, ResetError> {
        let mut stats = RestoreStats::default();
        // Both `written` and `pages` ascend: look each page up from where the last one was.
        let mut cursor = 0;
        for range in written {
            for offset in (range.start..range.end).step_by(PAGE_SIZE) {
                let page = offset / PAGE_SIZE;
                cursor += self.pages[cursor..].partition_point(|&p| p < page);
                let addr = guest(self.base, offset);
                let content = if self.pages.get(cursor) == Some(&page) {
                    stats.pages_copied += 1;
                    let at = cursor * PAGE_SIZE;
                    self.data
                        .get(at..at + PAGE_SIZE)
                        .ok_or(ResetError::TrackerMismatch)?
                } else {
                    stats.pages_zeroed += 1;
                    &ZERO_PAGE[..]
                };
                mem.write_slice(content, GuestAddress(addr))
                    .map_err(|source| ResetError::Access { addr, source })?;
            }
        }
        stats.pages_written = stats.pages_copied + stats.pages_zeroed;
        Ok(stats)
    }
}

/// A copy of all of guest RAM, to check a restore byte for byte (tests and the VMM's
/// `--verify-reset`). Pages of zeros are not kept, only their absence noted: the copy costs the
/// memory of the pages that hold data. Reading every page maps the never-touched ones to the
/// shared zero page, which costs page tables but no memory, and does not count as a write.
#[derive(Debug)]
pub struct FullCopy {
    regions: Vec<RegionCopy>,
}

/// One region of a [`FullCopy`].
#[derive(Debug)]
struct RegionCopy {
    /// Guest address.
    addr: u64,
    /// Length in bytes.
    len: usize,
    /// The pages that hold data: index in the region and content, ascending.
    held: Vec<(usize, Box<[u8]>)>,
}

impl FullCopy {
    /// Copies all of `mem`.
    pub fn take(mem: &GuestMemory) -> Result<FullCopy, ResetError> {
        let mut regions = Vec::new();
        let mut page = [0u8; PAGE_SIZE];
        for region in mem.iter() {
            let addr = region.start_addr().0;
            let len = usize::try_from(region.len())
                .map_err(|_| ResetError::OutOfMemory { mib: usize::MAX })?;
            let mut held = Vec::new();
            for (i, at) in (0..len).step_by(PAGE_SIZE).enumerate() {
                let seen = &mut page[..PAGE_SIZE.min(len - at)];
                let addr = guest(addr, at);
                mem.read_slice(seen, GuestAddress(addr))
                    .map_err(|source| ResetError::Access { addr, source })?;
                if seen.iter().any(|&b| b != 0) {
                    held.push((i, Box::from(&*seen)));
                }
            }
            regions.push(RegionCopy { addr, len, held });
        }
        Ok(FullCopy { regions })
    }

    /// The guest address of the first page of `mem` that differs from this copy, or `None`
    /// when all of RAM is the same. A page `mem` lacks (another layout) counts as different.
    pub fn first_difference(&self, mem: &GuestMemory) -> Option<u64> {
        let mut page = [0u8; PAGE_SIZE];
        for RegionCopy { addr, len, held } in &self.regions {
            let mut next = held.iter().peekable();
            for (i, at) in (0..*len).step_by(PAGE_SIZE).enumerate() {
                let guest_addr = guest(*addr, at);
                let seen = &mut page[..PAGE_SIZE.min(len - at)];
                if mem.read_slice(seen, GuestAddress(guest_addr)).is_err() {
                    return Some(guest_addr);
                }
                let same = match next.peek() {
                    Some((j, content)) if *j == i => {
                        next.next();
                        **content == *seen
                    }
                    _ => seen.iter().all(|&b| b == 0),
                };
                if !same {
                    return Some(guest_addr);
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    /// Guest RAM and a tracker over it; the tracker is dropped first (field order).
    struct Fixture {
        tracker: WriteTracker,
        mem: GuestMemory,
    }

    fn fixture(mib: u64) -> Fixture {
        let mem = crate::memory::create(mib).unwrap();
        let host = mem.get_host_address(GuestAddress(0)).unwrap();
        let len = usize::try_from(mib << 20).unwrap();
        // SAFETY: the one region of `mem`, a private anonymous mapping, which the fixture
        // keeps alive longer than the tracker (fields drop in order).
        let tracker = unsafe { WriteTracker::new(host, len) }.unwrap();
        Fixture { tracker, mem }
    }

    /// Writes a value made of `page` and `round` into `page` at an offset that varies.
    fn scribble(mem: &GuestMemory, page: usize, round: u64) {
        let value = (page as u64) << 8 | round | 1 << 63;
        let at = page * PAGE_SIZE + (page * 8 + usize::try_from(round).unwrap() * 64) % PAGE_SIZE;
        mem.write_obj(value, GuestAddress(at as u64)).unwrap();
    }

    const PAGES_64M: usize = (64 << 20) / PAGE_SIZE;
    const LAST: usize = PAGES_64M - 1;

    /// Pages written before the snapshot.
    fn before() -> BTreeSet<usize> {
        let mut pages: BTreeSet<usize> = [0, 1, 7, 300, 510, 511, 4000, 9999, LAST].into();
        pages.extend(1000..1040);
        pages
    }

    /// Pages written after it: first and last, touched before, never touched, a run across
    /// the 2 MiB boundary at page 512.
    fn after(round: u64) -> BTreeSet<usize> {
        let mut pages: BTreeSet<usize> = [0, LAST, 7, 4000, 1020, 2, 600, 12345].into();
        pages.extend(505..520);
        pages.insert(5000 + usize::try_from(round).unwrap());
        pages
    }

    #[test]
    fn restore_puts_back_exactly_the_snapshot() {
        let f = fixture(64);
        let pre = before();
        for &p in &pre {
            scribble(&f.mem, p, 1);
        }
        let snap = MemorySnapshot::take(&f.mem, &f.tracker).unwrap();
        assert_eq!(snap.pages(), pre.len(), "only the pages that hold data");
        let expected = FullCopy::take(&f.mem).unwrap();
        assert_eq!(expected.first_difference(&f.mem), None);

        for round in 2..5 {
            let post = after(round);
            for &p in &post {
                scribble(&f.mem, p, round);
            }
            assert!(expected.first_difference(&f.mem).is_some());
            let stats = snap
                .restore_with(&f.mem, &f.tracker, Reprotect::Written)
                .unwrap();
            assert_eq!(expected.first_difference(&f.mem), None, "round {round}");
            let copied = post.intersection(&pre).count() as u64;
            let zeroed = post.difference(&pre).count() as u64;
            assert_eq!(
                (stats.pages_written, stats.pages_copied, stats.pages_zeroed),
                (post.len() as u64, copied, zeroed),
                "round {round}"
            );
            assert!(copied > 0 && zeroed > 0);
            // Nothing written since: a second restore does nothing.
            let idle = snap
                .restore_with(&f.mem, &f.tracker, Reprotect::Written)
                .unwrap();
            assert_eq!(idle.pages_written, 0);
        }
    }

    #[test]
    fn pages_left_writable_are_rewritten_at_every_restore() {
        let f = fixture(64);
        let pre = before();
        for &p in &pre {
            scribble(&f.mem, p, 1);
        }
        let snap = MemorySnapshot::take(&f.mem, &f.tracker).unwrap();
        let expected = FullCopy::take(&f.mem).unwrap();
        let mut ever = BTreeSet::new();
        for round in 2..6 {
            let post = after(round);
            for &p in &post {
                scribble(&f.mem, p, round);
            }
            ever.extend(post.iter().copied());
            let stats = snap.restore(&f.mem, &f.tracker).unwrap();
            assert_eq!(expected.first_difference(&f.mem), None, "round {round}");
            // Below the bound nothing is protected again: every page written in any round so
            // far counts as written, and is put back each time.
            assert_eq!(stats.pages_written, ever.len() as u64, "round {round}");
        }
        // Over the bound, the written pages are protected again: then an idle restore is empty.
        let many = usize::try_from(KEEP_WRITABLE_PAGES).unwrap() + 1;
        for p in 0..many {
            scribble(&f.mem, 6000 + p, 9);
        }
        let stats = snap.restore(&f.mem, &f.tracker).unwrap();
        assert!(stats.pages_written > KEEP_WRITABLE_PAGES);
        assert_eq!(expected.first_difference(&f.mem), None);
        let idle = snap.restore(&f.mem, &f.tracker).unwrap();
        assert_eq!(idle.pages_written, 0);
    }

    #[test]
    fn restore_without_writes_reports_no_pages() {
        let f = fixture(64);
        scribble(&f.mem, 3, 1);
        let snap = MemorySnapshot::take(&f.mem, &f.tracker).unwrap();
        // Reading is not writing, even of pages never touched.
        let copy = FullCopy::take(&f.mem).unwrap();
        let stats = snap.restore(&f.mem, &f.tracker).unwrap();
        assert_eq!(
            (stats.pages_written, stats.pages_copied, stats.pages_zeroed),
            (0, 0, 0)
        );
        assert_eq!(copy.first_difference(&f.mem), None);
    }

    #[test]
    fn full_copy_finds_the_first_difference() {
        let f = fixture(64);
        let copy = FullCopy::take(&f.mem).unwrap();
        scribble(&f.mem, 777, 1);
        scribble(&f.mem, 900, 1);
        assert_eq!(copy.first_difference(&f.mem), Some(777 * PAGE_SIZE as u64));
    }

    #[test]
    fn a_second_snapshot_on_the_same_tracker_keeps_protected_data() {
        // After a first snapshot every untouched page holds a marker the kernel calls
        // "swapped": a second snapshot must hold the pages with data and not the rest.
        let f = fixture(64);
        scribble(&f.mem, 10, 1);
        let first = MemorySnapshot::take(&f.mem, &f.tracker).unwrap();
        assert_eq!(first.pages(), 1);
        scribble(&f.mem, 20, 2);
        let second = MemorySnapshot::take(&f.mem, &f.tracker).unwrap();
        assert_eq!(second.pages(), 2);
        let expected = FullCopy::take(&f.mem).unwrap();
        for p in [10, 20, 30] {
            scribble(&f.mem, p, 3);
        }
        let stats = second.restore(&f.mem, &f.tracker).unwrap();
        assert_eq!((stats.pages_copied, stats.pages_zeroed), (2, 1));
        assert_eq!(expected.first_difference(&f.mem), None);
    }

    #[test]
    fn a_tracker_over_other_memory_is_refused() {
        let f = fixture(64);
        let other = crate::memory::create(64).unwrap();
        assert!(matches!(
            MemorySnapshot::take(&other, &f.tracker),
            Err(ResetError::TrackerMismatch)
        ));
    }

    /// Timings on 1 GiB of RAM with 64 MiB of data and 2,000 pages written per call:
    /// `cargo test --release --locked -p bulwark-vmm reset::memory::tests::bench -- --ignored --nocapture`
    #[test]
    #[ignore = "benchmark: prints timings"]
    fn bench_restore_1gib_2000_pages() {
        const PAGES: usize = (1 << 30) / PAGE_SIZE;
        let f = fixture(1024);
        let t = Instant::now();
        for p in 0..(64 << 20) / PAGE_SIZE {
            scribble(&f.mem, p * 7 % PAGES, 1);
        }
        println!("populate 64 MiB: {:?}", t.elapsed());
        let t = Instant::now();
        let snap = MemorySnapshot::take(&f.mem, &f.tracker).unwrap();
        println!("take ({} pages): {:?}", snap.pages(), t.elapsed());
        let dirty = |round: u64| {
            for i in 0..2000 {
                scribble(
                    &f.mem,
                    (i * 131 + usize::try_from(round).unwrap()) % PAGES,
                    round,
                );
            }
        };
        let median = |mut v: Vec<u128>| {
            v.sort_unstable();
            v[v.len() / 2]
        };
        let (mut scan, mut rewrite, mut by_written, mut by_all, mut total_w, mut total_a) =
            (vec![], vec![], vec![], vec![], vec![], vec![]);
        let mut out = Vec::new();
        for round in 2..22 {
            dirty(round);
            let t = Instant::now();
            f.tracker.written(&mut out).unwrap();
            scan.push(t.elapsed().as_micros());
            let t = Instant::now();
            let stats = snap.rewrite(&f.mem, &out).unwrap();
            rewrite.push(t.elapsed().as_micros());
            assert_eq!(stats.pages_written, 2000);
            let t = Instant::now();
            if round % 2 == 0 {
                f.tracker.protect_written().unwrap();
                by_written.push(t.elapsed().as_micros());
            } else {
                f.tracker.protect_all().unwrap();
                by_all.push(t.elapsed().as_micros());
            }
            dirty(round + 100);
            let mode = if round % 2 == 0 {
                Reprotect::Written
            } else {
                Reprotect::All
            };
            let stats = snap.restore_with(&f.mem, &f.tracker, mode).unwrap();
            assert_eq!(stats.pages_written, 2000);
            if round % 2 == 0 {
                total_w.push(u128::from(stats.micros));
            } else {
                total_a.push(u128::from(stats.micros));
            }
        }
        // The same rewrite through raw pointers instead of vm-memory's checked copies.
        let host = f.tracker.host();
        let mut raw = vec![];
        for round in 30..40 {
            dirty(round);
            f.tracker.written(&mut out).unwrap();
            let t = Instant::now();
            let mut cursor = 0;
            for offset in out.iter().flat_map(|r| (r.start..r.end).step_by(PAGE_SIZE)) {
                let page = offset / PAGE_SIZE;
                cursor += snap.pages[cursor..].partition_point(|&p| p < page);
                let dst = host.wrapping_add(offset);
                if snap.pages.get(cursor) == Some(&page) {
                    let src = &snap.data[cursor * PAGE_SIZE..][..PAGE_SIZE];
                    // SAFETY: `offset` is a written page inside the tracked 1 GiB mapping,
                    // alive in `f`; the snapshot's data is another allocation.
                    unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst, PAGE_SIZE) };
                } else {
                    // SAFETY: as above.
                    unsafe { std::ptr::write_bytes(dst, 0, PAGE_SIZE) };
                }
            }
            raw.push(t.elapsed().as_micros());
            f.tracker.protect_written().unwrap();
        }
        println!(
            "raw-pointer rewrite of 2000 pages, median µs: {}",
            median(raw)
        );
        let t = Instant::now();
        let again = MemorySnapshot::take(&f.mem, &f.tracker).unwrap();
        println!(
            "second take on the protected tracker ({} pages): {:?}",
            again.pages(),
            t.elapsed()
        );
        println!(
            "medians, µs: scan {} | rewrite 2000 pages {} | protect_written {} | protect_all {} \
             | restore with protect_written {} | restore with protect_all {}",
            median(scan),
            median(rewrite),
            median(by_written),
            median(by_all),
            median(total_w),
            median(total_a)
        );
    }
}
