//! The artifact window: the call's precompiled module, mapped read-only from its file into
//! guest-physical memory at [`layout::ARTIFACT_START`] (a KVM memory slot of its own), so the
//! guest loads it in place and no byte of it is copied, by the VMM or by the guest.
//!
//! The file comes in as an open descriptor (the caller opened and verified it; the VMM never
//! opens it by path). It is mapped `MAP_PRIVATE` and `PROT_READ`, and the slot is read-only for
//! the guest when KVM supports that: a guest write then becomes an MMIO exit that no device
//! serves, which ends the VM. The VMM itself never reads the mapping, so a file truncated under
//! it cannot fault the VMM: KVM fails the guest's access instead (the VM ends with a KVM error).
//!
//! `bulwark run`'s cache puts the artifact 2 MiB into its file. The kernel places a file mapping
//! at a 2 MiB-aligned address when the file system keeps large page-cache folios (ext4 does from
//! Linux 6.16), so offset and address agree modulo 2 MiB, whole 2 MiB folios are mapped at once,
//! and KVM maps the guest's 2 MiB pages of the window whole: one page fault per 2 MiB touched.

use std::fs::File;
use std::sync::Arc;

use bulwark_abi::layout;
use kvm_bindings::{KVM_MEM_READONLY, kvm_userspace_memory_region};
use kvm_ioctls::VmFd;
use vm_memory::{FileOffset, MmapRegion};

/// The KVM slot number of the artifact window (RAM takes slots 0 and 1).
pub const ARTIFACT_SLOT: u32 = 2;

/// Host page size the slot is rounded up to.
const HOST_PAGE: u64 = 4096;

/// Where the artifact is: a byte range of an open file.
#[derive(Clone, Debug)]
pub struct ArtifactFile {
    /// The open file (shared: a [`crate::VmConfig`] is cloneable).
    pub file: Arc<File>,
    /// Offset of the artifact in the file; a multiple of 4096.
    pub offset: u64,
    /// Length of the artifact in bytes.
    pub len: u64,
}

/// Errors from mapping the artifact.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    /// The descriptor cannot be inspected.
    #[error("cannot inspect the artifact descriptor: {0}")]
    Stat(std::io::Error),
    /// The descriptor is not a regular file.
    #[error("the artifact descriptor is a {0}, not a regular file")]
    NotRegular(&'static str),
    /// The range is empty, too long, misaligned, or past the end of the file.
    #[error(
        "artifact range {offset}+{len} is unusable: it must be non-empty, at most {} MiB, start at a multiple of 4096 and lie inside the file ({file_len} bytes)",
        layout::ARTIFACT_MAX_SIZE >> 20
    )]
    BadRange {
        /// Offset asked for.
        offset: u64,
        /// Length asked for.
        len: u64,
        /// Length of the file.
        file_len: u64,
    },
    /// The mapping failed.
    #[error("cannot map the artifact: {0}")]
    Map(vm_memory::mmap::MmapRegionError),
    /// KVM refused the memory slot.
    #[error("KVM_SET_USER_MEMORY_REGION (artifact) failed: {0}")]
    Register(kvm_ioctls::Error),
}

/// The mapped artifact; unmapped when dropped.
#[derive(Debug)]
pub struct ArtifactMapping {
    region: MmapRegion<()>,
    len: u64,
}

impl ArtifactMapping {
    /// Checks `artifact` (a regular file holding the whole range) and maps it read-only.
    ///
    /// It makes two system calls, `fstat` and `mmap`: a VMM started with `--artifact-later`
    /// runs this on its confined main thread, whose allow-list has just those (and not
    /// `statx`, which the standard library's `metadata` uses).
    pub fn map(artifact: &ArtifactFile) -> Result<Self, ArtifactError> {
        let (mode, file_len) = fstat(&artifact.file).map_err(ArtifactError::Stat)?;
        if mode & libc::S_IFMT != libc::S_IFREG {
            return Err(ArtifactError::NotRegular(kind_of_mode(mode)));
        }
        let (offset, len) = (artifact.offset, artifact.len);
        let bad = || ArtifactError::BadRange {
            offset,
            len,
            file_len,
        };
        if len == 0 || len > layout::ARTIFACT_MAX_SIZE || !offset.is_multiple_of(HOST_PAGE) {
            return Err(bad());
        }
        if offset.checked_add(len).is_none_or(|end| end > file_len) {
            return Err(bad());
        }
        let size = usize::try_from(len).map_err(|_| bad())?;
        // The mapping covers whole host pages: the bytes past `len` in the last one read as
        // zeros (or as the file's next bytes), and the guest is told only `len`.
        let region = MmapRegion::build(
            Some(FileOffset::from_arc(Arc::clone(&artifact.file), offset)),
            size,
            libc::PROT_READ,
            libc::MAP_PRIVATE | libc::MAP_NORESERVE,
        )
        .map_err(ArtifactError::Map)?;
        Ok(Self { region, len })
    }

    /// Length of the artifact in bytes (what the guest is told).
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the artifact is empty (never: [`Self::map`] refuses that).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Size of the memory slot: the length rounded up to whole host pages.
    pub fn slot_size(&self) -> u64 {
        self.len.div_ceil(HOST_PAGE) * HOST_PAGE
    }

    /// Registers the mapping with `vm` at [`layout::ARTIFACT_START`] as slot
    /// [`ARTIFACT_SLOT`], read-only for the guest when `readonly` (KVM_CAP_READONLY_MEM).
    ///
    /// # Safety
    ///
    /// The guest reads the mapping whenever a vCPU of `vm` runs: the caller must keep `self`
    /// alive for as long as any vCPU of `vm` can run, and must not call this twice for one VM.
    pub unsafe fn register(&self, vm: &VmFd, readonly: bool) -> Result<(), ArtifactError> {
        let region = kvm_userspace_memory_region {
            slot: ARTIFACT_SLOT,
            flags: if readonly { KVM_MEM_READONLY } else { 0 },
            guest_phys_addr: layout::ARTIFACT_START,
            memory_size: self.slot_size(),
            userspace_addr: self.region.as_ptr() as u64,
        };
        // SAFETY: [as_ptr, as_ptr + slot_size) is this mapping: mmap maps whole pages, so the
        // rounded-up tail belongs to it too. The caller keeps it alive while a vCPU of `vm`
        // can run (this function's contract). The slot number is used by nothing else and the
        // guest-physical range lies past all RAM and the MMIO window (bulwark_abi::layout), so
        // the slot overlaps no other.
        unsafe { vm.set_user_memory_region(region) }.map_err(ArtifactError::Register)
    }
}

/// The file type bits and the size of `file`, from `fstat` (the system call itself: glibc's
/// `fstat` may be `newfstatat`, which a path could be given to).
fn fstat(file: &File) -> std::io::Result<(libc::mode_t, u64)> {
    use std::os::fd::AsRawFd;
    let mut st = std::mem::MaybeUninit::<libc::stat>::zeroed();
    // SAFETY: fstat writes a complete `stat` into the buffer, which has that type and size; the
    // descriptor is open (`file` owns it). The buffer is read only if the call succeeded.
    let r = unsafe { libc::syscall(libc::SYS_fstat, file.as_raw_fd(), st.as_mut_ptr()) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the call succeeded, so the struct is initialized (it was zeroed before anyway).
    let st = unsafe { st.assume_init() };
    let size = u64::try_from(st.st_size).map_err(std::io::Error::other)?;
    Ok((st.st_mode, size))
}

/// What kind of non-regular file the mode `mode` describes, for messages.
fn kind_of_mode(mode: libc::mode_t) -> &'static str {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => "directory",
        libc::S_IFIFO => "FIFO",
        libc::S_IFCHR => "character device",
        libc::S_IFBLK => "block device",
        libc::S_IFSOCK => "socket",
        libc::S_IFLNK => "symbolic link",
        _ => "special file",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn file_with(bytes: &[u8]) -> (std::path::PathBuf, Arc<File>) {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("bulwark-artifact-{}-{n}", std::process::id()));
        let mut f = File::create(&path).unwrap();
        f.write_all(bytes).unwrap();
        (path.clone(), Arc::new(File::open(&path).unwrap()))
    }

    #[test]
    fn maps_the_range_read_only_and_rounds_the_slot_to_pages() {
        let mut bytes = vec![0u8; 4096];
        bytes.extend(b"artifact!");
        let (path, file) = file_with(&bytes);
        let m = ArtifactMapping::map(&ArtifactFile {
            file,
            offset: 4096,
            len: 9,
        })
        .unwrap();
        assert_eq!((m.len(), m.slot_size()), (9, 4096));
        // SAFETY: the mapping is alive and 9 bytes long; nothing writes the file meanwhile.
        let seen = unsafe { std::slice::from_raw_parts(m.region.as_ptr(), 9) };
        assert_eq!(seen, b"artifact!");
        assert_eq!(m.region.prot(), libc::PROT_READ);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn bad_ranges_and_non_files_are_refused() {
        let (path, file) = file_with(&[1u8; 8192]);
        let range = |offset, len| ArtifactFile {
            file: Arc::clone(&file),
            offset,
            len,
        };
        for (offset, len) in [
            (0, 0),
            (1, 10),
            (4096, 4097),
            (!4095, 1),
            (0, layout::ARTIFACT_MAX_SIZE + 1),
        ] {
            let e = ArtifactMapping::map(&range(offset, len)).unwrap_err();
            assert!(matches!(e, ArtifactError::BadRange { .. }), "{e}");
        }
        assert!(ArtifactMapping::map(&range(0, 8192)).is_ok());
        std::fs::remove_file(path).unwrap();
        let dir = Arc::new(File::open(std::env::temp_dir()).unwrap());
        let e = ArtifactMapping::map(&ArtifactFile {
            file: dir,
            offset: 0,
            len: 1,
        })
        .unwrap_err();
        assert!(matches!(e, ArtifactError::NotRegular("directory")), "{e}");
    }
}
