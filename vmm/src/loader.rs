//! Loading the guest ELF: our own checks of every header field that matters, then each checked
//! segment is copied into guest RAM straight from the file.
//!
//! The image is untrusted input as far as the VMM is concerned: every offset and address is
//! checked before anything is written, and each segment must lie inside the guest image region.
//! Only the headers are read into the VMM; segment bytes go from the file into guest RAM, with
//! no buffer in between (reading the 1.2 MB image into a fresh buffer first cost ~1 ms of page
//! faults). The segments copied are the ones checked: the headers are never parsed a second time
//! (linux-loader's ELF loader, used before, reads them again from the file, which could have
//! changed in between). Mapping the segments from the file was measured too: no faster for a
//! whole call (the guest then takes ~180 page faults instead of ~50), and a file truncated while
//! its VM ran could kill the VMM with SIGBUS, so the image is copied.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use bulwark_abi::layout;
use vm_memory::GuestAddress;

use crate::files::{self, InputFileError};
use crate::memory::GuestMemory;

/// Largest guest image file the VMM reads.
pub const MAX_IMAGE_FILE: u64 = 64 << 20;

const EHDR_SIZE: usize = 64;
const PHDR_SIZE: usize = 56;
const PT_LOAD: u32 = 1;
const PF_X: u32 = 1;
const ET_EXEC: u16 = 2;
const EM_X86_64: u16 = 62;

/// Errors from reading, checking or loading the guest image.
#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    /// The file could not be read, or is not a regular file.
    #[error("cannot read guest image {path}: {source}")]
    Read {
        /// The image path.
        path: PathBuf,
        /// What went wrong.
        source: InputFileError,
    },
    /// The file is larger than [`MAX_IMAGE_FILE`].
    #[error("guest image {path} is {size} bytes, more than the {MAX_IMAGE_FILE}-byte limit")]
    TooLarge {
        /// The image path.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
    /// Not an ELF file at all.
    #[error("guest image {0} is not an ELF file (build it with `make guest`)")]
    NotElf(PathBuf),
    /// An ELF file the VMM cannot run.
    #[error("guest image {path} is not a 64-bit little-endian x86_64 executable: {why}")]
    WrongKind {
        /// The image path.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// The program headers are malformed.
    #[error("guest image {path} has malformed program headers: {why}")]
    BadHeaders {
        /// The image path.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// A loadable segment lies outside the guest image region or outside guest RAM.
    #[error(
        "guest image {path}: segment {index} at [{start:#x}, {end:#x}) lies outside the guest image region [{:#x}, {:#x}) of guest RAM ({ram_mib} MiB)",
        layout::IMAGE_START,
        layout::IMAGE_END
    )]
    SegmentOutside {
        /// The image path.
        path: PathBuf,
        /// Index of the program header.
        index: usize,
        /// First guest-physical byte of the segment.
        start: u64,
        /// End (exclusive) of the segment.
        end: u64,
        /// Size of guest RAM in MiB.
        ram_mib: u64,
    },
    /// The entry point or the exception stubs are not inside executable code.
    #[error("guest image {path}: {what} at {addr:#x} is not inside an executable segment")]
    NotInCode {
        /// The image path.
        path: PathBuf,
        /// What was looked for.
        what: &'static str,
        /// Its address.
        addr: u64,
    },
    /// A segment could not be copied into guest RAM.
    #[error("cannot load guest image {path} into guest RAM: {source}")]
    Load {
        /// The image path.
        path: PathBuf,
        /// vm-memory's error.
        source: vm_memory::GuestMemoryError,
    },
}

/// A loadable segment, as far as the checks need it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Segment {
    offset: u64,
    addr: u64,
    file_size: u64,
    mem_size: u64,
    executable: bool,
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

/// Reads `buf.len()` bytes at `offset` of an image file (a file, or bytes in tests).
type ReadAt<'a> = &'a mut dyn FnMut(u64, &mut [u8]) -> std::io::Result<()>;

/// Checks the headers of an image of `file_len` bytes, read through `read_at`, for a RAM of
/// `ram_size` bytes, and returns its entry and loadable segments. Only the ELF header and the
/// program headers are read; nothing is written anywhere.
fn check(
    path: &Path,
    file_len: u64,
    read_at: ReadAt<'_>,
    ram_size: u64,
) -> Result<(u64, Vec<Segment>), LoaderError> {
    let wrong = |why: &str| LoaderError::WrongKind {
        path: path.to_owned(),
        why: why.to_owned(),
    };
    let bad = |why: String| LoaderError::BadHeaders {
        path: path.to_owned(),
        why,
    };
    let io = |e: std::io::Error| LoaderError::Read {
        path: path.to_owned(),
        source: InputFileError::Io(e),
    };
    let mut ehdr = [0u8; EHDR_SIZE];
    // At most EHDR_SIZE: the conversion cannot fail.
    let head = usize::try_from(file_len.min(EHDR_SIZE as u64)).unwrap_or(0);
    read_at(0, &mut ehdr[..head]).map_err(io)?;
    if head < 4 || &ehdr[..4] != b"\x7fELF" {
        return Err(LoaderError::NotElf(path.to_owned()));
    }
    if head < EHDR_SIZE {
        return Err(wrong("the ELF header is truncated"));
    }
    let image = &ehdr;
    if image[4] != 2 {
        return Err(wrong("it is a 32-bit ELF"));
    }
    if image[5] != 1 {
        return Err(wrong("it is big-endian"));
    }
    let machine = u16_at(image, 18);
    if machine != EM_X86_64 {
        return Err(wrong(&format!("machine is {machine}, not x86_64 (62)")));
    }
    if u16_at(image, 16) != ET_EXEC {
        return Err(wrong("it is not a static executable (ET_EXEC)"));
    }
    let entry = u64_at(image, 24);
    let phoff = u64_at(image, 32);
    let phentsize = usize::from(u16_at(image, 54));
    let phnum = usize::from(u16_at(image, 56));
    if phentsize != PHDR_SIZE {
        return Err(bad(format!("entry size {phentsize}, expected {PHDR_SIZE}")));
    }
    // phnum is at most 65535, so the table is at most 3.5 MiB, and it must lie in the file.
    let table_len = phnum * PHDR_SIZE;
    if phoff
        .checked_add(table_len as u64)
        .is_none_or(|end| end > file_len)
    {
        return Err(bad(format!(
            "{phnum} headers at offset {phoff} run past the end of the file"
        )));
    }
    let mut table = vec![0u8; table_len];
    read_at(phoff, &mut table).map_err(io)?;

    let mut segments = Vec::new();
    for (index, ph) in table.chunks_exact(PHDR_SIZE).enumerate() {
        if u32_at(ph, 0) != PT_LOAD {
            continue;
        }
        let seg = Segment {
            offset: u64_at(ph, 8),
            addr: u64_at(ph, 24),
            file_size: u64_at(ph, 32),
            mem_size: u64_at(ph, 40),
            executable: u32_at(ph, 4) & PF_X != 0,
        };
        if seg.file_size > seg.mem_size {
            return Err(bad(format!(
                "segment {index} has more file bytes than memory bytes"
            )));
        }
        if seg
            .offset
            .checked_add(seg.file_size)
            .is_none_or(|e| e > file_len)
        {
            return Err(bad(format!(
                "segment {index} runs past the end of the file"
            )));
        }
        let end = seg.addr.saturating_add(seg.mem_size);
        if seg.addr < layout::IMAGE_START || end > layout::IMAGE_END || end > ram_size {
            return Err(LoaderError::SegmentOutside {
                path: path.to_owned(),
                index,
                start: seg.addr,
                end,
                ram_mib: ram_size >> 20,
            });
        }
        segments.push(seg);
    }
    if segments.is_empty() {
        return Err(bad("no loadable segment".to_owned()));
    }
    let in_code = |addr: u64, len: u64| {
        segments.iter().any(|s| {
            s.executable
                && addr >= s.addr
                && addr
                    .checked_add(len)
                    .is_some_and(|e| e <= s.addr + s.file_size)
        })
    };
    let not_in_code = |what, addr| LoaderError::NotInCode {
        path: path.to_owned(),
        what,
        addr,
    };
    if !in_code(entry, 1) {
        return Err(not_in_code("the entry point", entry));
    }
    let stubs_len = layout::EXCEPTION_VECTORS * layout::EXCEPTION_STUB_STRIDE;
    if !in_code(layout::EXCEPTION_STUBS, stubs_len) {
        return Err(not_in_code("the exception stubs", layout::EXCEPTION_STUBS));
    }
    Ok((entry, segments))
}

/// A guest image whose headers are read and checked, ready to load from its file, which stays
/// open (it was opened once) until this is dropped.
#[derive(Debug)]
pub struct CheckedImage {
    path: PathBuf,
    file: File,
    segments: Vec<Segment>,
    /// Guest address of the first instruction.
    pub entry: u64,
    /// End (exclusive) of the highest segment in guest memory.
    pub end: u64,
}

/// Opens the guest ELF at `path` (once; a regular file of at most [`MAX_IMAGE_FILE`] bytes) and
/// checks its headers for a RAM of `ram_size` bytes. Only the headers are read.
pub fn read(path: &Path, ram_size: u64) -> Result<CheckedImage, LoaderError> {
    let (file, file_len) = files::open_regular(path, MAX_IMAGE_FILE).map_err(|e| match e {
        InputFileError::TooLarge { size, .. } => LoaderError::TooLarge {
            path: path.to_owned(),
            size,
        },
        other => LoaderError::Read {
            path: path.to_owned(),
            source: other,
        },
    })?;
    let (entry, segments) = check(
        path,
        file_len,
        &mut |offset, buf| file.read_exact_at(buf, offset),
        ram_size,
    )?;
    let end = segments
        .iter()
        .map(|s| s.addr + s.mem_size)
        .max()
        .unwrap_or(0);
    Ok(CheckedImage {
        path: path.to_owned(),
        file,
        segments,
        entry,
        end,
    })
}

/// Copies the checked segments of `image` into `mem`, straight from the file (the rest of each
/// segment, its bss, is already zero in fresh guest RAM). A file that shrank since it was checked
/// fails the load.
pub fn load(mem: &GuestMemory, image: &CheckedImage) -> Result<(), LoaderError> {
    use std::io::{Seek, SeekFrom};
    use vm_memory::Bytes;
    let mut file = &image.file;
    for seg in &image.segments {
        let len = usize::try_from(seg.file_size).map_err(|_| LoaderError::Load {
            path: image.path.clone(),
            source: vm_memory::GuestMemoryError::InvalidBackendAddress,
        })?;
        file.seek(SeekFrom::Start(seg.offset))
            .map_err(|e| LoaderError::Read {
                path: image.path.clone(),
                source: InputFileError::Io(e),
            })?;
        mem.read_exact_volatile_from(GuestAddress(seg.addr), &mut file, len)
            .map_err(|source| LoaderError::Load {
                path: image.path.clone(),
                source,
            })?;
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Builds a minimal x86_64 ET_EXEC image with one executable segment of `code` at `addr`,
    /// entry at `addr`.
    pub(crate) fn tiny_elf(addr: u64, code: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; EHDR_SIZE + PHDR_SIZE];
        f[..4].copy_from_slice(b"\x7fELF");
        f[4] = 2;
        f[5] = 1;
        f[6] = 1;
        f[16..18].copy_from_slice(&ET_EXEC.to_le_bytes());
        f[18..20].copy_from_slice(&EM_X86_64.to_le_bytes());
        f[20..24].copy_from_slice(&1u32.to_le_bytes());
        f[24..32].copy_from_slice(&addr.to_le_bytes());
        f[32..40].copy_from_slice(&(EHDR_SIZE as u64).to_le_bytes());
        f[52..54].copy_from_slice(&u16::try_from(EHDR_SIZE).unwrap().to_le_bytes());
        f[54..56].copy_from_slice(&u16::try_from(PHDR_SIZE).unwrap().to_le_bytes());
        f[56..58].copy_from_slice(&1u16.to_le_bytes());
        let ph = EHDR_SIZE;
        let off = (EHDR_SIZE + PHDR_SIZE) as u64;
        f[ph..ph + 4].copy_from_slice(&PT_LOAD.to_le_bytes());
        f[ph + 4..ph + 8].copy_from_slice(&(PF_X | 4).to_le_bytes());
        f[ph + 8..ph + 16].copy_from_slice(&off.to_le_bytes());
        f[ph + 16..ph + 24].copy_from_slice(&addr.to_le_bytes());
        f[ph + 24..ph + 32].copy_from_slice(&addr.to_le_bytes());
        f[ph + 32..ph + 40].copy_from_slice(&(code.len() as u64).to_le_bytes());
        f[ph + 40..ph + 48].copy_from_slice(&(code.len() as u64).to_le_bytes());
        f.extend_from_slice(code);
        f
    }

    fn stub_sized() -> Vec<u8> {
        vec![
            0xf4;
            usize::try_from(layout::EXCEPTION_VECTORS * layout::EXCEPTION_STUB_STRIDE).unwrap()
        ]
    }

    const RAM: u64 = 256 << 20;

    /// [`check`] over an image held in memory.
    fn check_bytes(
        path: &Path,
        image: &[u8],
        ram_size: u64,
    ) -> Result<(u64, Vec<Segment>), LoaderError> {
        let mut read_at = |offset: u64, buf: &mut [u8]| {
            let start = usize::try_from(offset).unwrap();
            buf.copy_from_slice(&image[start..start + buf.len()]);
            Ok(())
        };
        check(path, image.len() as u64, &mut read_at, ram_size)
    }

    #[test]
    fn accepts_a_well_formed_image() {
        let img = tiny_elf(layout::IMAGE_START, &stub_sized());
        let (entry, segs) = check_bytes(Path::new("g"), &img, RAM).unwrap();
        assert_eq!(entry, layout::IMAGE_START);
        assert_eq!(segs.len(), 1);
        assert!(segs[0].executable);
    }

    #[test]
    fn loads_segments_into_guest_memory() {
        use vm_memory::Bytes;
        let dir = std::env::temp_dir().join(format!("bulwark-loader-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("guest.elf");
        let mut code = stub_sized();
        code[5] = 0xab;
        std::fs::write(&path, tiny_elf(layout::IMAGE_START, &code)).unwrap();
        let mem = crate::memory::create(64).unwrap();
        let img = read(&path, 64 << 20).unwrap();
        load(&mem, &img).unwrap();
        assert_eq!(img.entry, layout::IMAGE_START);
        assert_eq!(img.end, layout::IMAGE_START + code.len() as u64);
        let b: u8 = mem.read_obj(GuestAddress(layout::IMAGE_START + 5)).unwrap();
        assert_eq!(b, 0xab);
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// A loadable segment for [`elf_with`]: flags, file offset, address, file and memory sizes.
    struct Load(u32, u64, u64, u64, u64);

    /// An x86_64 ET_EXEC image of `len` bytes, all 0xcc but the headers: entry `entry`, program
    /// headers right after the ELF header.
    fn elf_with(entry: u64, loads: &[Load], len: usize) -> Vec<u8> {
        let mut f = tiny_elf(entry, &[]);
        f.resize(len, 0xcc);
        f[56..58].copy_from_slice(&u16::try_from(loads.len()).unwrap().to_le_bytes());
        for (i, Load(flags, offset, addr, file_size, mem_size)) in loads.iter().enumerate() {
            let ph = EHDR_SIZE + i * PHDR_SIZE;
            f[ph..ph + 4].copy_from_slice(&PT_LOAD.to_le_bytes());
            f[ph + 4..ph + 8].copy_from_slice(&flags.to_le_bytes());
            f[ph + 8..ph + 16].copy_from_slice(&offset.to_le_bytes());
            f[ph + 16..ph + 24].copy_from_slice(&addr.to_le_bytes());
            f[ph + 24..ph + 32].copy_from_slice(&addr.to_le_bytes());
            f[ph + 32..ph + 40].copy_from_slice(&file_size.to_le_bytes());
            f[ph + 40..ph + 48].copy_from_slice(&mem_size.to_le_bytes());
        }
        f
    }

    #[test]
    fn copies_each_checked_segment_from_the_file_and_leaves_bss_zero() {
        use vm_memory::Bytes;
        let dir = std::env::temp_dir().join(format!("bulwark-loader-segs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("two.elf");
        let stubs = stub_sized().len();
        let data = layout::IMAGE_USER_START;
        // The stubs; then data of 0x1800 file bytes (0x5a) whose page holds more file bytes
        // (0xcc) past it, and bss to 64 KiB.
        let mut file = elf_with(
            layout::IMAGE_START,
            &[
                Load(
                    PF_X | 4,
                    0x1000,
                    layout::IMAGE_START,
                    stubs as u64,
                    stubs as u64,
                ),
                Load(4 | 2, 0x2000, data, 0x1800, 0x10000),
            ],
            0x5000,
        );
        file[0x1000..0x1000 + stubs].fill(0xf4);
        file[0x2000..0x3800].fill(0x5a);
        std::fs::write(&path, &file).unwrap();
        let mem = crate::memory::create(64).unwrap();
        let img = read(&path, 64 << 20).unwrap();
        load(&mem, &img).unwrap();
        let bytes = |addr: u64, len: usize| {
            let mut buf = vec![0u8; len];
            mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
            buf
        };
        assert_eq!(bytes(layout::IMAGE_START, stubs), vec![0xf4; stubs]);
        assert_eq!(bytes(data, 0x1800), vec![0x5a; 0x1800]);
        assert_eq!(
            bytes(data + 0x1800, 0xe800),
            vec![0; 0xe800],
            "bss reads as zero"
        );

        // A file that shrank after its headers were checked fails the load.
        let img = read(&path, 64 << 20).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(0x2100)
            .unwrap();
        let e = load(&crate::memory::create(64).unwrap(), &img).unwrap_err();
        assert!(matches!(e, LoaderError::Load { .. }), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn refuses_what_is_not_a_runnable_elf() {
        let p = Path::new("g");
        assert!(matches!(
            check_bytes(p, b"hello", RAM),
            Err(LoaderError::NotElf(_))
        ));
        let good = tiny_elf(layout::IMAGE_START, &stub_sized());
        let mut arm = good.clone();
        arm[18] = 183; // EM_AARCH64
        let e = check_bytes(p, &arm, RAM).unwrap_err().to_string();
        assert!(e.contains("machine is 183"), "{e}");
        let mut elf32 = good.clone();
        elf32[4] = 1;
        assert!(matches!(
            check_bytes(p, &elf32, RAM),
            Err(LoaderError::WrongKind { .. })
        ));
        let mut dynamic = good.clone();
        dynamic[16] = 3; // ET_DYN
        assert!(matches!(
            check_bytes(p, &dynamic, RAM),
            Err(LoaderError::WrongKind { .. })
        ));
        assert!(matches!(
            check_bytes(p, &good[..EHDR_SIZE + 10], RAM),
            Err(LoaderError::BadHeaders { .. })
        ));
    }

    #[test]
    fn refuses_segments_outside_the_image_region_or_ram() {
        let p = Path::new("g");
        for addr in [
            0,
            layout::BOOT_INFO,
            layout::IMAGE_END,
            1 << 32,
            u64::MAX - 4,
        ] {
            let img = tiny_elf(addr, &stub_sized());
            assert!(
                matches!(
                    check_bytes(p, &img, RAM),
                    Err(LoaderError::SegmentOutside { .. })
                ),
                "{addr:#x}"
            );
        }
        let img = tiny_elf(layout::IMAGE_START, &stub_sized());
        assert!(matches!(
            check_bytes(p, &img, 2 << 20),
            Err(LoaderError::SegmentOutside { .. })
        ));
    }

    #[test]
    fn refuses_an_image_without_exception_stubs_or_a_stray_entry() {
        let p = Path::new("g");
        let img = tiny_elf(layout::IMAGE_START, &[0xf4; 16]);
        let e = check_bytes(p, &img, RAM).unwrap_err().to_string();
        assert!(e.contains("exception stubs"), "{e}");
        let mut img = tiny_elf(layout::IMAGE_START, &stub_sized());
        img[24..32].copy_from_slice(&(layout::IMAGE_END - 8).to_le_bytes());
        let e = check_bytes(p, &img, RAM).unwrap_err().to_string();
        assert!(e.contains("entry point"), "{e}");
    }
}
