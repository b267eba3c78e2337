//! The boot-info block and the payload: where they go in guest RAM and how big RAM must be.

use std::path::{Path, PathBuf};

use bulwark_abi::ABI_VERSION;
use bulwark_abi::boot::{BOOT_INFO_MAGIC, BootInfo, TestMode};
use bulwark_abi::layout;
use vm_memory::{Bytes, GuestAddress};

use crate::files::{self, InputFileError};
use crate::memory::GuestMemory;

/// Errors from placing the payload or writing boot info.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The payload file could not be read, or is not a regular file.
    #[error("cannot read payload {path}: {source}")]
    ReadPayload {
        /// The payload path.
        path: PathBuf,
        /// What went wrong.
        source: InputFileError,
    },
    /// Guest RAM cannot hold the image, stack, payload and the minimum heap.
    #[error(
        "--mem-mib {have_mib} is too small: the guest image, its stack{payload} and a {} MiB heap need at least {need_mib} MiB",
        layout::MIN_HEAP_SIZE >> 20
    )]
    RamTooSmall {
        /// RAM given, in MiB.
        have_mib: u64,
        /// RAM needed, in MiB.
        need_mib: u64,
        /// A note on the payload's size, or empty.
        payload: String,
    },
    /// Writing into guest memory failed.
    #[error("cannot write {what} into guest RAM: {source}")]
    Write {
        /// What was being written.
        what: &'static str,
        /// vm-memory's error.
        source: vm_memory::GuestMemoryError,
    },
}

/// The smallest RAM, in bytes, that holds everything for a payload of `payload_size` bytes.
pub fn min_ram_size(payload_size: u64) -> Option<u64> {
    layout::heap_start(payload_size)?.checked_add(layout::MIN_HEAP_SIZE)
}

/// Reads the payload file (if any) and builds the boot info for `mem`, checking that RAM is big
/// enough. Returns the block and the payload bytes; nothing is written yet.
pub fn plan(
    mem_size: u64,
    payload: Option<&Path>,
    test_mode: TestMode,
    tsc_khz: u64,
) -> Result<(BootInfo, Vec<u8>), BootError> {
    // The image, stack, payload and minimum heap all lie in low RAM, whatever lies above 4 GiB.
    let [(_, low), (_, high)] = layout::ram_ranges(mem_size);
    let too_small = |payload_size: u64| {
        let need = min_ram_size(payload_size);
        BootError::RamTooSmall {
            have_mib: mem_size >> 20,
            need_mib: need.map_or(u64::MAX, |s| s.div_ceil(1 << 20)),
            payload: match payload_size {
                0 => String::new(),
                _ if need.is_none_or(|n| n > layout::LOW_RAM_END) => format!(
                    ", a {payload_size}-byte payload (more than fits below {} MiB)",
                    layout::LOW_RAM_END >> 20
                ),
                _ => format!(", a {payload_size}-byte payload"),
            },
        }
    };
    let fits = |payload_size: u64| min_ram_size(payload_size).is_some_and(|need| need <= low);
    let bytes = match payload {
        Some(path) => {
            // Opened once and read with a cap: a FIFO, a device or a file that grows cannot
            // make this block or read without end. The largest payload that could fit is the
            // cap; the exact check follows.
            let max = low.saturating_sub(min_ram_size(0).unwrap_or(u64::MAX));
            match files::read_regular(path, max) {
                Ok(bytes) => bytes,
                Err(InputFileError::TooLarge { size, .. }) => return Err(too_small(size)),
                Err(source) => {
                    return Err(BootError::ReadPayload {
                        path: path.to_owned(),
                        source,
                    });
                }
            }
        }
        None => Vec::new(),
    };
    let payload_size = bytes.len() as u64;
    let heap_start = layout::heap_start(payload_size).ok_or_else(|| too_small(payload_size))?;
    if !fits(payload_size) {
        return Err(too_small(payload_size));
    }
    let info = BootInfo {
        magic: BOOT_INFO_MAGIC,
        abi_version: ABI_VERSION,
        test_mode: test_mode as u32,
        mem_size,
        heap_start,
        heap_size: low - heap_start,
        high_ram_size: high,
        payload_start: layout::PAYLOAD_START,
        payload_size,
        tsc_khz,
        vsock_cid: 0,
        artifact_size: 0,
    };
    Ok((info, bytes))
}

/// Writes the boot-info block and the payload into guest RAM.
pub fn write(mem: &GuestMemory, info: &BootInfo, payload: &[u8]) -> Result<(), BootError> {
    mem.write_slice(&info.to_bytes(), GuestAddress(layout::BOOT_INFO))
        .map_err(|source| BootError::Write {
            what: "boot info",
            source,
        })?;
    mem.write_slice(payload, GuestAddress(info.payload_start))
        .map_err(|source| BootError::Write {
            what: "the payload",
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_places_the_heap_after_the_payload_and_validates() {
        let dir = std::env::temp_dir().join(format!("bulwark-boot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("payload");
        std::fs::write(&path, vec![7u8; 3 << 20]).unwrap();
        let (info, bytes) = plan(256 << 20, Some(&path), TestMode::Spin, 1000).unwrap();
        assert_eq!(bytes.len(), 3 << 20);
        assert_eq!(info.heap_start, layout::PAYLOAD_START + (4 << 20));
        assert_eq!(info.heap_start + info.heap_size, 256 << 20);
        assert_eq!(info.test_mode, TestMode::Spin as u32);
        assert_eq!(info.validate(), Ok(()));

        let mem = crate::memory::create(256).unwrap();
        write(&mem, &info, &bytes).unwrap();
        let mut back = [0u8; BootInfo::SIZE];
        mem.read_slice(&mut back, GuestAddress(layout::BOOT_INFO))
            .unwrap();
        assert_eq!(back, info.to_bytes());
        let b: u8 = mem
            .read_obj(GuestAddress(layout::PAYLOAD_START + (3 << 20) - 1))
            .unwrap();
        assert_eq!(b, 7);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_payload_must_fit_in_low_ram_whatever_high_ram_there_is() {
        let dir = std::env::temp_dir().join(format!("bulwark-boot-low-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("payload");
        // Sparse: refused by its size before a byte is read.
        let file = std::fs::File::create(&path).unwrap();
        file.set_len(layout::LOW_RAM_END).unwrap();
        let e = plan(5 << 30, Some(&path), TestMode::None, 0).unwrap_err();
        assert!(matches!(e, BootError::RamTooSmall { .. }), "{e}");
        assert!(
            e.to_string().contains("more than fits below 3072 MiB"),
            "{e}"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn plan_refuses_ram_too_small_with_the_needed_size() {
        let need = min_ram_size(0).unwrap();
        assert!(plan(need, None, TestMode::None, 0).is_ok());
        let e = plan(need - layout::PAGE_SIZE, None, TestMode::None, 0).unwrap_err();
        assert!(
            e.to_string()
                .contains(&format!("at least {} MiB", need >> 20)),
            "{e}"
        );
        let e = plan(
            64 << 20,
            Some(Path::new("/nonexistent/payload")),
            TestMode::None,
            0,
        );
        assert!(matches!(e, Err(BootError::ReadPayload { .. })));
    }
}
