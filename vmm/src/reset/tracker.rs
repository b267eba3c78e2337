//! Finding the pages of a mapping written since a point in time.
//!
//! A [`WriteTracker`] registers a range with a userfaultfd in *asynchronous* write-protect mode
//! (`UFFD_FEATURE_WP_ASYNC`): a write to a protected page is not reported to anyone, the kernel
//! just drops the page's write-protect bit and lets the write go on. Which pages have lost that
//! bit since the last protect is then read in one sweep over the page tables with the
//! `PAGEMAP_SCAN` ioctl of `/proc/self/pagemap` (category `PAGE_IS_WRITTEN`), which can also set
//! the bit again on exactly the pages it reports (`PM_SCAN_WP_MATCHING`).
//! `UFFD_FEATURE_WP_UNPOPULATED` makes protecting cover pages that were never touched too (the
//! kernel leaves a marker in their page-table entry), so a first write is recorded like any
//! other. Both need Linux 6.7 or later.
//!
//! The userfaultfd is created with `UFFD_USER_MODE_ONLY`, which an unprivileged process may do
//! whatever `vm.unprivileged_userfaultfd` says. That flag only stops *synchronous* faults taken
//! in kernel mode from being reported: asynchronous write-protect faults never go to a reader at
//! all, so writes the kernel makes on the process's behalf (KVM writing guest memory, `read(2)`
//! into it) are recorded like the process's own.

use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// Size of the pages the kernel tracks, in bytes.
pub const PAGE_SIZE: usize = 4096;

/// Kernel ABI: the few userfaultfd and pagemap definitions this module needs, which the `libc`
/// crate does not have (checked against libc 0.2.191).
pub mod abi {
    #![allow(missing_docs)]

    // From include/uapi/linux/userfaultfd.h.

    /// `UFFD_API`: the only API version.
    pub const UFFD_API: u64 = 0xAA;
    /// `UFFD_USER_MODE_ONLY`: flag of userfaultfd(2).
    pub const UFFD_USER_MODE_ONLY: libc::c_int = 1;
    /// `UFFD_FEATURE_WP_UNPOPULATED` (Linux 6.4).
    pub const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
    /// `UFFD_FEATURE_WP_ASYNC` (Linux 6.7).
    pub const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;
    /// `UFFDIO_REGISTER_MODE_WP`.
    pub const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
    /// `UFFDIO_WRITEPROTECT_MODE_WP`.
    pub const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;
    /// `_UFFDIO_WRITEPROTECT`: bit number in `uffdio_register.ioctls`.
    pub const UFFDIO_WRITEPROTECT_BIT: u32 = 0x06;

    /// `struct uffdio_api`.
    #[repr(C)]
    #[derive(Debug, Default, Clone, Copy)]
    pub struct UffdioApi {
        pub api: u64,
        pub features: u64,
        pub ioctls: u64,
    }
    const _: () = assert!(size_of::<UffdioApi>() == 24);

    /// `struct uffdio_range`.
    #[repr(C)]
    #[derive(Debug, Default, Clone, Copy)]
    pub struct UffdioRange {
        pub start: u64,
        pub len: u64,
    }
    const _: () = assert!(size_of::<UffdioRange>() == 16);

    /// `struct uffdio_register`.
    #[repr(C)]
    #[derive(Debug, Default, Clone, Copy)]
    pub struct UffdioRegister {
        pub range: UffdioRange,
        pub mode: u64,
        pub ioctls: u64,
    }
    const _: () = assert!(size_of::<UffdioRegister>() == 32);

    /// `struct uffdio_writeprotect`.
    #[repr(C)]
    #[derive(Debug, Default, Clone, Copy)]
    pub struct UffdioWriteprotect {
        pub range: UffdioRange,
        pub mode: u64,
    }
    const _: () = assert!(size_of::<UffdioWriteprotect>() == 24);

    vmm_sys_util::ioctl_iowr_nr!(UFFDIO_API, 0xAA, 0x3F, UffdioApi);
    vmm_sys_util::ioctl_iowr_nr!(UFFDIO_REGISTER, 0xAA, 0x00, UffdioRegister);
    vmm_sys_util::ioctl_iowr_nr!(UFFDIO_WRITEPROTECT, 0xAA, 0x06, UffdioWriteprotect);

    // From include/uapi/linux/fs.h (Linux 6.7).

    /// `PAGE_IS_WRITTEN`: not write-protected since the last protect.
    pub const PAGE_IS_WRITTEN: u64 = 1 << 1;
    /// `PAGE_IS_PRESENT`: mapped to a page frame.
    pub const PAGE_IS_PRESENT: u64 = 1 << 3;
    /// `PAGE_IS_SWAPPED`: swapped out (or a marker in the page-table entry).
    pub const PAGE_IS_SWAPPED: u64 = 1 << 4;
    /// `PAGE_IS_PFNZERO`: mapped to the shared zero page.
    pub const PAGE_IS_PFNZERO: u64 = 1 << 5;
    /// `PM_SCAN_WP_MATCHING`: write-protect the pages reported.
    pub const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
    /// `PM_SCAN_CHECK_WPASYNC`: fail with EPERM on a page not under async write-protect.
    pub const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;

    /// `struct page_region`: `[start, end)` with the same `categories`.
    #[repr(C)]
    #[derive(Debug, Default, Clone, Copy)]
    pub struct PageRegion {
        pub start: u64,
        pub end: u64,
        pub categories: u64,
    }
    const _: () = assert!(size_of::<PageRegion>() == 24);

    /// `struct pm_scan_arg`.
    #[repr(C)]
    #[derive(Debug, Default, Clone, Copy)]
    pub struct PmScanArg {
        pub size: u64,
        pub flags: u64,
        pub start: u64,
        pub end: u64,
        pub walk_end: u64,
        pub vec: u64,
        pub vec_len: u64,
        pub max_pages: u64,
        pub category_inverted: u64,
        pub category_mask: u64,
        pub category_anyof_mask: u64,
        pub return_mask: u64,
    }
    const _: () = assert!(size_of::<PmScanArg>() == 96);

    vmm_sys_util::ioctl_iowr_nr!(PAGEMAP_SCAN, u32::from(b'f'), 16, PmScanArg);
}

/// Errors from setting up or using a [`WriteTracker`]. Each says what failed and what it means
/// for VM reuse.
#[derive(Debug, thiserror::Error)]
pub enum TrackerError {
    /// The range is empty, not page aligned or wraps around.
    #[error(
        "cannot track writes to {len:#x} bytes at {host:#x}: the range must be non-empty and \
         page aligned (a bug in the VMM)"
    )]
    BadRange {
        /// Host address of the range.
        host: usize,
        /// Length of the range in bytes.
        len: usize,
    },
    /// userfaultfd(2) failed.
    #[error(
        "cannot create a userfaultfd ({0}): VM reuse needs userfaultfd (Linux 6.7+, not blocked \
         by seccomp); run without VM reuse on this host"
    )]
    Open(io::Error),
    /// UFFDIO_API failed.
    #[error("the userfaultfd handshake (UFFDIO_API) failed ({0}): VM reuse is not available")]
    Api(io::Error),
    /// The kernel does not offer a userfaultfd feature the tracker needs.
    #[error(
        "the kernel does not offer userfaultfd {0} (Linux 6.7+ with \
         CONFIG_PTE_MARKER_UFFD_WP): VM reuse is not available on this host"
    )]
    MissingFeature(&'static str),
    /// UFFDIO_REGISTER failed or does not allow write-protecting the range.
    #[error(
        "cannot register guest RAM for write tracking (UFFDIO_REGISTER: {0}): the mapping must \
         be private anonymous memory"
    )]
    Register(io::Error),
    /// `/proc/self/pagemap` cannot be opened.
    #[error("cannot open /proc/self/pagemap ({0}): VM reuse needs /proc mounted")]
    Pagemap(io::Error),
    /// The kernel has no PAGEMAP_SCAN ioctl.
    #[error("the kernel lacks PAGEMAP_SCAN (Linux 6.7+): VM reuse is not available on this host")]
    NoPagemapScan,
    /// PAGEMAP_SCAN failed.
    #[error(
        "PAGEMAP_SCAN failed ({0}): the written pages of guest RAM are unknown, so this VM \
         cannot be reused"
    )]
    Scan(io::Error),
    /// The kernel answered PAGEMAP_SCAN with something outside the range asked about.
    #[error(
        "PAGEMAP_SCAN answered out of range ({0}): the written pages of guest RAM are unknown, \
         so this VM cannot be reused"
    )]
    BadScan(&'static str),
    /// UFFDIO_WRITEPROTECT failed.
    #[error(
        "cannot write-protect guest RAM (UFFDIO_WRITEPROTECT: {0}): later writes would go \
         unseen, so this VM cannot be reused"
    )]
    Protect(io::Error),
}

/// Records which pages of one private anonymous mapping are written, from one protect to the
/// next. See the module documentation for how.
#[derive(Debug)]
pub struct WriteTracker {
    /// The userfaultfd the range is registered with; closing it ends the tracking.
    uffd: OwnedFd,
    /// `/proc/self/pagemap`, opened once (a confined VMM may no longer see /proc).
    pagemap: File,
    /// Host address of the range.
    host: usize,
    /// Length of the range in bytes, a multiple of [`PAGE_SIZE`].
    len: usize,
}

/// What one PAGEMAP_SCAN sweep looks for.
struct Query {
    /// `PM_SCAN_*` flags.
    flags: u64,
    /// Categories a page must all have (`category_mask`).
    all_of: u64,
    /// Categories a page must have one of, when not 0 (`category_anyof_mask`).
    any_of: u64,
    /// Categories reported per region (`return_mask`).
    returned: u64,
    /// Which reported regions to keep, by their categories.
    keep: fn(u64) -> bool,
}

/// How many regions one PAGEMAP_SCAN call may return: a call that fills them all is followed by
/// another from where it stopped.
const SCAN_BATCH: usize = 512;

impl WriteTracker {
    /// Starts tracking writes to `[host, host + len)`. Nothing is protected yet: call
    /// [`protect_all`](Self::protect_all) to start recording.
    ///
    /// # Safety
    ///
    /// `[host, host + len)` must be (part of) a private anonymous read-write mapping, page
    /// aligned, that the caller keeps mapped for as long as the tracker lives; no other
    /// userfaultfd may be registered on it.
    pub unsafe fn new(host: *mut u8, len: usize) -> Result<WriteTracker, TrackerError> {
        let addr = host as usize;
        let bad = TrackerError::BadRange { host: addr, len };
        if len == 0 || !addr.is_multiple_of(PAGE_SIZE) || !len.is_multiple_of(PAGE_SIZE) {
            return Err(bad);
        }
        if addr.checked_add(len).is_none() {
            return Err(bad);
        }
        let wanted = abi::UFFD_FEATURE_WP_ASYNC | abi::UFFD_FEATURE_WP_UNPOPULATED;
        // Ask a throwaway userfaultfd what the kernel offers, so that a missing feature gets
        // named (UFFDIO_API on the real one fails with a bare EINVAL). UFFDIO_API may only be
        // called once per userfaultfd.
        let offered = {
            let probe = open_uffd()?;
            api(&probe, 0)?
        };
        for (bit, name) in [
            (abi::UFFD_FEATURE_WP_ASYNC, "UFFD_FEATURE_WP_ASYNC"),
            (
                abi::UFFD_FEATURE_WP_UNPOPULATED,
                "UFFD_FEATURE_WP_UNPOPULATED",
            ),
        ] {
            if offered & bit == 0 {
                return Err(TrackerError::MissingFeature(name));
            }
        }
        let uffd = open_uffd()?;
        api(&uffd, wanted)?;
        let mut reg = abi::UffdioRegister {
            range: abi::UffdioRange {
                start: addr as u64,
                len: len as u64,
            },
            mode: abi::UFFDIO_REGISTER_MODE_WP,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads and writes one `uffdio_register`, which `reg` is
        // (repr(C), size checked above). Registering only changes how write faults on the
        // range are handled: in async mode the kernel resolves them itself, so no access to
        // the range can block or fail because of it. The caller guarantees the range is a
        // private anonymous mapping it keeps alive (this function's contract).
        let rc = unsafe { libc::ioctl(uffd.as_raw_fd(), abi::UFFDIO_REGISTER(), &raw mut reg) };
        if rc != 0 {
            return Err(TrackerError::Register(io::Error::last_os_error()));
        }
        if reg.ioctls & (1 << abi::UFFDIO_WRITEPROTECT_BIT) == 0 {
            return Err(TrackerError::Register(io::Error::other(
                "the range does not allow UFFDIO_WRITEPROTECT",
            )));
        }
        let pagemap = File::open("/proc/self/pagemap").map_err(TrackerError::Pagemap)?;
        let tracker = WriteTracker {
            uffd,
            pagemap,
            host: addr,
            len,
        };
        // Find out now, not at the first reset, whether PAGEMAP_SCAN exists.
        let mut probe = Vec::new();
        tracker.written(&mut probe)?;
        Ok(tracker)
    }

    /// Host address of the tracked range.
    pub fn host(&self) -> *mut u8 {
        self.host as *mut u8
    }

    /// Length of the tracked range in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the tracked range is empty (never: [`new`](Self::new) refuses that).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Write-protects the whole range, so that from now on every write to any page of it,
    /// including pages never touched so far, is recorded. Costs a walk over all of the range's
    /// page tables (and creates the missing ones).
    pub fn protect_all(&self) -> Result<(), TrackerError> {
        let mut wp = abi::UffdioWriteprotect {
            range: abi::UffdioRange {
                start: self.host as u64,
                len: self.len as u64,
            },
            mode: abi::UFFDIO_WRITEPROTECT_MODE_WP,
        };
        // SAFETY: UFFDIO_WRITEPROTECT reads and writes one `uffdio_writeprotect`, which `wp`
        // is. It only sets write-protect bits on the registered range; in async mode a later
        // write just clears the bit again, so the memory stays fully usable.
        let rc = unsafe {
            libc::ioctl(
                self.uffd.as_raw_fd(),
                abi::UFFDIO_WRITEPROTECT(),
                &raw mut wp,
            )
        };
        if rc != 0 {
            return Err(TrackerError::Protect(io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Write-protects again exactly the pages written since the last protect: after it,
    /// [`written`](Self::written) reports nothing until the next write.
    pub fn protect_written(&self) -> Result<(), TrackerError> {
        // No output vector: the kernel then walks the whole range in one call.
        self.scan(
            &Query {
                flags: abi::PM_SCAN_WP_MATCHING | abi::PM_SCAN_CHECK_WPASYNC,
                all_of: abi::PAGE_IS_WRITTEN,
                any_of: 0,
                returned: abi::PAGE_IS_WRITTEN,
                keep: |_| true,
            },
            None,
        )
    }

    /// Replaces `out` with the byte ranges (offsets from the start of the tracked range, page
    /// aligned, sorted, not adjacent) of the pages written since the last protect. Protects
    /// nothing. A range may be a multiple of 2 MiB when the kernel backs it with a huge page.
    pub fn written(&self, out: &mut Vec<Range<usize>>) -> Result<(), TrackerError> {
        self.scan(
            &Query {
                flags: abi::PM_SCAN_CHECK_WPASYNC,
                all_of: abi::PAGE_IS_WRITTEN,
                any_of: 0,
                returned: abi::PAGE_IS_WRITTEN,
                keep: |_| true,
            },
            Some(out),
        )
    }

    /// Replaces `out` with the byte ranges (as for [`written`](Self::written)) of the pages
    /// that surely hold data: present in memory and not the shared zero page, or swapped out
    /// and not write-protected. Every other page reads as zeros, except those
    /// [`protected_swapped`](Self::protected_swapped) reports.
    pub fn present(&self, out: &mut Vec<Range<usize>>) -> Result<(), TrackerError> {
        use abi::{PAGE_IS_PFNZERO, PAGE_IS_PRESENT, PAGE_IS_SWAPPED, PAGE_IS_WRITTEN};
        self.scan(
            &Query {
                flags: 0,
                all_of: 0,
                any_of: PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
                returned: PAGE_IS_PRESENT | PAGE_IS_SWAPPED | PAGE_IS_PFNZERO | PAGE_IS_WRITTEN,
                keep: |c| {
                    (c & PAGE_IS_PRESENT != 0 && c & PAGE_IS_PFNZERO == 0)
                        || (c & PAGE_IS_SWAPPED != 0 && c & PAGE_IS_WRITTEN != 0)
                },
            },
            Some(out),
        )
    }

    /// Replaces `out` with the byte ranges (as for [`written`](Self::written)) of the pages
    /// whose page-table entry is not present and write-protected. The kernel reports both a
    /// page swapped out while protected and a never-touched page that protecting left a marker
    /// in as "swapped", so these may hold data or read as zeros: only reading them tells.
    /// Before the first protect there are none.
    pub fn protected_swapped(&self, out: &mut Vec<Range<usize>>) -> Result<(), TrackerError> {
        self.scan(
            &Query {
                flags: 0,
                all_of: abi::PAGE_IS_SWAPPED,
                any_of: 0,
                returned: abi::PAGE_IS_SWAPPED | abi::PAGE_IS_WRITTEN,
                keep: |c| c & abi::PAGE_IS_WRITTEN == 0,
            },
            Some(out),
        )
    }

    /// One PAGEMAP_SCAN sweep of the whole range as `query` says. With `out`, the regions
    /// whose categories `query.keep` accepts replace its content, as offsets; without, the
    /// kernel gets no output vector at all (and walks the range in one call).
    fn scan(
        &self,
        query: &Query,
        mut out: Option<&mut Vec<Range<usize>>>,
    ) -> Result<(), TrackerError> {
        let start = self.host as u64;
        let end = start + self.len as u64;
        let vec_len = if out.is_some() { SCAN_BATCH } else { 0 };
        if let Some(out) = out.as_deref_mut() {
            out.clear();
        }
        let mut regions = [abi::PageRegion::default(); SCAN_BATCH];
        let mut from = start;
        while from < end {
            let mut arg = abi::PmScanArg {
                size: size_of::<abi::PmScanArg>() as u64,
                flags: query.flags,
                start: from,
                end,
                walk_end: 0,
                vec: if vec_len > 0 {
                    regions.as_mut_ptr() as u64
                } else {
                    0
                },
                vec_len: vec_len as u64,
                max_pages: 0,
                category_inverted: 0,
                category_mask: query.all_of,
                category_anyof_mask: query.any_of,
                return_mask: query.returned,
            };
            // SAFETY: PAGEMAP_SCAN reads and writes one `pm_scan_arg` (`arg`, repr(C), size
            // checked, `size` set) and writes at most `vec_len` `page_region`s at `vec`, which
            // is `regions` (SCAN_BATCH of them) or nothing. It only reads page tables, and with
            // PM_SCAN_WP_MATCHING sets write-protect bits on the registered range, which in
            // async mode never makes an access fail.
            let rc =
                unsafe { libc::ioctl(self.pagemap.as_raw_fd(), abi::PAGEMAP_SCAN(), &raw mut arg) };
            if rc < 0 {
                let err = io::Error::last_os_error();
                return Err(match err.raw_os_error() {
                    Some(libc::ENOTTY) => TrackerError::NoPagemapScan,
                    _ => TrackerError::Scan(err),
                });
            }
            let filled = usize::try_from(rc).map_err(|_| TrackerError::BadScan("region count"))?;
            let filled = regions
                .get(..filled)
                .ok_or(TrackerError::BadScan("region count"))?;
            for region in filled {
                if region.start < from
                    || region.end > end
                    || region.start >= region.end
                    || !region.start.is_multiple_of(PAGE_SIZE as u64)
                    || !region.end.is_multiple_of(PAGE_SIZE as u64)
                {
                    return Err(TrackerError::BadScan("region"));
                }
                let Some(out) = out.as_deref_mut() else {
                    continue;
                };
                if !(query.keep)(region.categories) {
                    continue;
                }
                let offset = |at: u64| {
                    usize::try_from(at - start).map_err(|_| TrackerError::BadScan("region"))
                };
                let (lo, hi) = (offset(region.start)?, offset(region.end)?);
                match out.last_mut() {
                    Some(last) if last.end == lo => last.end = hi,
                    _ => out.push(lo..hi),
                }
            }
            if arg.walk_end <= from || arg.walk_end > end {
                return Err(TrackerError::BadScan("walk_end"));
            }
            from = arg.walk_end;
        }
        Ok(())
    }
}

/// Opens a non-blocking, close-on-exec userfaultfd for user-mode faults only.
fn open_uffd() -> Result<OwnedFd, TrackerError> {
    // SAFETY: userfaultfd(2) takes one int of flags and returns a new descriptor or -1; it
    // touches no memory of ours.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_userfaultfd,
            libc::O_CLOEXEC | libc::O_NONBLOCK | abi::UFFD_USER_MODE_ONLY,
        )
    };
    if fd < 0 {
        return Err(TrackerError::Open(io::Error::last_os_error()));
    }
    let fd = libc::c_int::try_from(fd)
        .map_err(|_| TrackerError::Open(io::Error::other("descriptor out of range")))?;
    // SAFETY: `fd` is a descriptor the kernel just created for us and nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// UFFDIO_API with `features`; returns the features the kernel offers.
fn api(uffd: &OwnedFd, features: u64) -> Result<u64, TrackerError> {
    let mut api = abi::UffdioApi {
        api: abi::UFFD_API,
        features,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_API reads and writes one `uffdio_api`, which `api` is (repr(C), size
    // checked); it only configures the userfaultfd.
    let rc = unsafe { libc::ioctl(uffd.as_raw_fd(), abi::UFFDIO_API(), &raw mut api) };
    if rc != 0 {
        return Err(TrackerError::Api(io::Error::last_os_error()));
    }
    Ok(api.features)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    /// A private anonymous mapping, unmapped on drop.
    struct Mapping {
        ptr: *mut u8,
        len: usize,
    }

    impl Mapping {
        fn new(len: usize) -> Mapping {
            // SAFETY: a fresh anonymous mapping at an address of the kernel's choosing
            // overlaps nothing.
            let ptr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                    -1,
                    0,
                )
            };
            assert_ne!(ptr, libc::MAP_FAILED);
            Mapping {
                ptr: ptr.cast(),
                len,
            }
        }

        fn write(&self, page: usize, value: u8) {
            assert!(page * PAGE_SIZE < self.len);
            // SAFETY: the byte lies inside the mapping, alive while `self` is.
            unsafe { self.ptr.add(page * PAGE_SIZE + 17).write_volatile(value) };
        }

        fn read(&self, page: usize) -> u8 {
            assert!(page * PAGE_SIZE < self.len);
            // SAFETY: as in `write`.
            unsafe { self.ptr.add(page * PAGE_SIZE + 17).read_volatile() }
        }

        /// A tracker over the whole mapping; it must be dropped before `self`.
        fn tracker(&self) -> WriteTracker {
            // SAFETY: a private anonymous page-aligned mapping; every test drops the tracker
            // before the mapping (declared after it).
            unsafe { WriteTracker::new(self.ptr, self.len) }.unwrap()
        }
    }

    impl Drop for Mapping {
        fn drop(&mut self) {
            // SAFETY: unmaps exactly the mapping `new` made, which nothing uses any more.
            unsafe { libc::munmap(self.ptr.cast(), self.len) };
        }
    }

    fn pages(ranges: &[Range<usize>]) -> BTreeSet<usize> {
        for r in ranges {
            assert!(
                r.start < r.end
                    && r.start.is_multiple_of(PAGE_SIZE)
                    && r.end.is_multiple_of(PAGE_SIZE)
            );
        }
        for w in ranges.windows(2) {
            assert!(w[0].end < w[1].start, "sorted and merged: {ranges:?}");
        }
        ranges
            .iter()
            .flat_map(|r| (r.start..r.end).step_by(PAGE_SIZE).map(|o| o / PAGE_SIZE))
            .collect()
    }

    /// Asserts that `ranges` are exactly `expected`, naming a few differences if not.
    #[track_caller]
    fn assert_pages(ranges: &[Range<usize>], expected: &BTreeSet<usize>) {
        let got = pages(ranges);
        if &got != expected {
            let extra: Vec<_> = got.difference(expected).take(10).collect();
            let missing: Vec<_> = expected.difference(&got).take(10).collect();
            panic!(
                "{} pages reported, {} expected; extra {extra:?}, missing {missing:?}",
                got.len(),
                expected.len()
            );
        }
    }

    const MIB64: usize = 64 << 20;
    const LAST: usize = MIB64 / PAGE_SIZE - 1;

    #[test]
    fn ioctl_numbers_match_the_kernel_headers() {
        // Values of the C macros, computed by hand from _IOWR(type, nr, size).
        assert_eq!(abi::UFFDIO_API(), 0xC018_AA3F);
        assert_eq!(abi::UFFDIO_REGISTER(), 0xC020_AA00);
        assert_eq!(abi::UFFDIO_WRITEPROTECT(), 0xC018_AA06);
        assert_eq!(abi::PAGEMAP_SCAN(), 0xC060_6610);
    }

    #[test]
    fn written_reports_exactly_the_written_pages() {
        let map = Mapping::new(MIB64);
        // Touched before tracking starts: written, and read only.
        let before = [0, 1, 2, 100, 511, 512, 9000, LAST];
        for &p in &before {
            map.write(p, 1);
        }
        assert_eq!(map.read(7000), 0);
        let tracker = map.tracker();
        tracker.protect_all().unwrap();
        let mut out = Vec::new();
        tracker.written(&mut out).unwrap();
        assert!(out.is_empty(), "nothing written since protect_all: {out:?}");

        // First and last page, pages touched before, never-touched pages, a page only read
        // before, and a run across the 2 MiB boundary at page 512.
        let mut wrote: BTreeSet<usize> = [0, LAST, 100, 9000, 7000, 3, 12345].into();
        wrote.extend(500..530);
        for &p in &wrote {
            map.write(p, 2);
        }
        // Reads of never-touched and of protected pages are no writes.
        assert_eq!(map.read(4000), 0);
        assert_eq!(map.read(1), 1);
        tracker.written(&mut out).unwrap();
        assert_pages(&out, &wrote);
        // Asking again changes nothing: `written` protects nothing.
        tracker.written(&mut out).unwrap();
        assert_pages(&out, &wrote);

        // Re-protecting exactly those: nothing is written any more; new writes show alone.
        tracker.protect_written().unwrap();
        tracker.written(&mut out).unwrap();
        assert!(out.is_empty(), "{out:?}");
        let again: BTreeSet<usize> = [1, 513, 4000, LAST - 1, LAST].into();
        for &p in &again {
            map.write(p, 3);
        }
        tracker.written(&mut out).unwrap();
        assert_pages(&out, &again);

        // protect_all does the same.
        tracker.protect_all().unwrap();
        tracker.written(&mut out).unwrap();
        assert!(out.is_empty(), "{out:?}");
        map.write(600, 4);
        tracker.written(&mut out).unwrap();
        assert_pages(&out, &[600].into());
        drop(tracker);
    }

    #[test]
    fn many_scattered_writes_take_several_scan_batches() {
        let map = Mapping::new(MIB64);
        let tracker = map.tracker();
        tracker.protect_all().unwrap();
        // Every other page: one region per page, more than one batch can hold.
        let wrote: BTreeSet<usize> = (0..=LAST).step_by(2).take(3 * SCAN_BATCH + 7).collect();
        for &p in &wrote {
            map.write(p, 9);
        }
        let mut out = Vec::new();
        tracker.written(&mut out).unwrap();
        assert_eq!(out.len(), wrote.len());
        assert_pages(&out, &wrote);
        drop(tracker);
    }

    #[test]
    fn present_reports_the_pages_holding_data() {
        let map = Mapping::new(MIB64);
        let tracker = map.tracker();
        let mut out = Vec::new();
        tracker.present(&mut out).unwrap();
        assert!(out.is_empty(), "{out:?}");
        let wrote: BTreeSet<usize> = [0, 5, 6, 7, 511, 512, LAST].into();
        for &p in &wrote {
            map.write(p, 1);
        }
        // Read-only pages are the shared zero page: no data.
        assert_eq!(map.read(100), 0);
        tracker.present(&mut out).unwrap();
        assert_pages(&out, &wrote);
        tracker.protected_swapped(&mut out).unwrap();
        assert!(out.is_empty(), "nothing protected yet: {out:?}");
        // Protecting puts a marker in every untouched page, which the kernel reports as
        // "swapped": `present` leaves those out, `protected_swapped` has them all.
        tracker.protect_all().unwrap();
        tracker.present(&mut out).unwrap();
        assert_pages(&out, &wrote);
        tracker.protected_swapped(&mut out).unwrap();
        let untouched: BTreeSet<usize> = (0..=LAST)
            .filter(|p| !wrote.contains(p) && *p != 100)
            .collect();
        assert_pages(&out, &untouched);
        drop(tracker);
    }

    #[test]
    fn bad_ranges_are_refused() {
        let map = Mapping::new(4 * PAGE_SIZE);
        for (ptr, len) in [
            (map.ptr, 0),
            (map.ptr, 100),
            (map.ptr.wrapping_add(1), PAGE_SIZE),
        ] {
            // SAFETY: refused before anything is registered.
            let err = unsafe { WriteTracker::new(ptr, len) }.unwrap_err();
            assert!(matches!(err, TrackerError::BadRange { .. }), "{err}");
        }
    }
}
