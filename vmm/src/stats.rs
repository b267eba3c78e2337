//! KVM's own counters for a vCPU, from its binary statistics file (`KVM_GET_STATS_FD`, Linux 5.14
//! and later): every VM exit, including the many KVM handles in the kernel without ever
//! returning to the VMM (page faults, `cpuid`, ...), and the guest page faults KVM fixed.
//!
//! The file is a header, the vCPU's id string, one descriptor per counter (flags, size, offset
//! of its value, name) and the block of values. [`VcpuStatsReader::open`] reads the header and
//! descriptors while the VMM can still open and `pread` anything, and remembers where the wanted
//! values are; [`VcpuStatsReader::read`] then takes the whole file with a single `read(2)` from
//! its start, which the confined vCPU thread may make (its seccomp list has `read`, not
//! `pread64`). Counters this kernel does not have read as `None`, and so does everything if
//! anything fails: statistics never stop a VM.

use std::fs::File;
use std::io::Read;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;

use kvm_bindings::{KVM_STATS_TYPE_CUMULATIVE, KVM_STATS_TYPE_MASK};
use kvm_ioctls::VcpuFd;

/// The ioctl kvm-ioctls has no helper for.
mod ioctls {
    use kvm_bindings::KVMIO;
    vmm_sys_util::ioctl_io_nr!(KVM_GET_STATS_FD, KVMIO, 0xce);
}
use ioctls::KVM_GET_STATS_FD;

/// Size of `struct kvm_stats_header`.
const HEADER_SIZE: usize = 24;
/// Size of `struct kvm_stats_desc` without its name.
const DESC_SIZE: usize = 16;
/// Largest statistics file read (Linux's is a few KiB).
const MAX_FILE: usize = 1 << 20;

/// The counters looked for, by their names in KVM's x86 vCPU statistics.
const EXITS: &str = "exits";
const PF_FIXED: &str = "pf_fixed";
const PF_TAKEN: &str = "pf_taken";

/// Why KVM's statistics could not be read.
#[derive(Debug, thiserror::Error)]
pub enum StatsError {
    /// KVM_GET_STATS_FD failed (a kernel before 5.14, or no such support).
    #[error("KVM_GET_STATS_FD failed: {0}")]
    Open(std::io::Error),
    /// The statistics file could not be read.
    #[error("cannot read KVM's statistics: {0}")]
    Read(std::io::Error),
    /// The statistics file is not laid out as its header says.
    #[error("KVM's statistics are malformed: {0}")]
    Malformed(&'static str),
}

/// KVM's counters for one vCPU since it was created; `None` where unknown.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VcpuStats {
    /// VM exits, all of them: those KVM handled itself and those that reached the VMM.
    pub exits: Option<u64>,
    /// Guest page faults KVM resolved by mapping a page (first touches, mostly).
    pub page_faults_fixed: Option<u64>,
    /// Guest page faults KVM's MMU handled, fixed or not.
    pub page_faults_taken: Option<u64>,
}

/// Where in a statistics file the wanted counters are.
#[derive(Debug)]
pub struct VcpuStatsReader {
    file: File,
    /// Bytes from the start of the file through the last wanted value.
    len: usize,
    exits: Option<usize>,
    pf_fixed: Option<usize>,
    pf_taken: Option<usize>,
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    let bytes = b.get(at..at.checked_add(4)?)?;
    Some(u32::from_ne_bytes(bytes.try_into().ok()?))
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    let bytes = b.get(at..at.checked_add(2)?)?;
    Some(u16::from_ne_bytes(bytes.try_into().ok()?))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    let bytes = b.get(at..at.checked_add(8)?)?;
    Some(u64::from_ne_bytes(bytes.try_into().ok()?))
}

/// The file offsets of the values of `names` (cumulative single-value counters only), and how
/// many bytes of the file hold them all: from the header and the descriptor block.
fn locate(
    header: &[u8],
    descriptors: &[u8],
    names: &[&str],
) -> Result<(Vec<Option<usize>>, usize), StatsError> {
    let malformed = StatsError::Malformed;
    let field = |at| u32_at(header, at).and_then(|v| usize::try_from(v).ok());
    let (Some(name_size), Some(count), Some(data_offset)) = (field(4), field(8), field(20)) else {
        return Err(malformed("short header"));
    };
    let stride = DESC_SIZE
        .checked_add(name_size)
        .ok_or(malformed("name size"))?;
    if count.checked_mul(stride) != Some(descriptors.len()) {
        return Err(malformed("descriptor block size"));
    }
    let mut found = vec![None; names.len()];
    let mut len = 0;
    for desc in descriptors.chunks_exact(stride) {
        let (Some(flags), Some(size), Some(offset)) =
            (u32_at(desc, 0), u16_at(desc, 6), u32_at(desc, 8))
        else {
            return Err(malformed("short descriptor"));
        };
        let name = &desc[DESC_SIZE..];
        let name = &name[..name.iter().position(|&b| b == 0).unwrap_or(name.len())];
        let Some(slot) = names.iter().position(|n| n.as_bytes() == name) else {
            continue;
        };
        if flags & KVM_STATS_TYPE_MASK != KVM_STATS_TYPE_CUMULATIVE || size != 1 {
            continue; // Not a plain counter: leave it unknown.
        }
        let at = usize::try_from(offset)
            .ok()
            .and_then(|o| data_offset.checked_add(o))
            .filter(|at| at.checked_add(8).is_some_and(|end| end <= MAX_FILE))
            .ok_or(malformed("value offset"))?;
        found[slot] = Some(at);
        len = len.max(at + 8);
    }
    Ok((found, len))
}

impl VcpuStatsReader {
    /// Opens `vcpu`'s statistics file and finds the counters in it. Call it before the process
    /// confines itself: it makes an ioctl and `pread`s.
    pub fn open(vcpu: &VcpuFd) -> Result<Self, StatsError> {
        // SAFETY: KVM_GET_STATS_FD takes no argument and only returns a new descriptor (or -1),
        // and `vcpu` is an open vCPU descriptor.
        let fd = unsafe { vmm_sys_util::ioctl::ioctl(vcpu, KVM_GET_STATS_FD()) };
        if fd < 0 {
            return Err(StatsError::Open(std::io::Error::last_os_error()));
        }
        // SAFETY: the ioctl returned a new descriptor that nothing else owns.
        let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        let mut header = [0u8; HEADER_SIZE];
        file.read_exact_at(&mut header, 0)
            .map_err(StatsError::Read)?;
        let field = |at| u32_at(&header, at).and_then(|v| usize::try_from(v).ok());
        let (Some(name_size), Some(count), Some(desc_offset)) =
            (field(4), field(8), u32_at(&header, 16))
        else {
            return Err(StatsError::Malformed("short header"));
        };
        let desc_len = DESC_SIZE
            .checked_add(name_size)
            .and_then(|s| s.checked_mul(count))
            .filter(|&l| l <= MAX_FILE)
            .ok_or(StatsError::Malformed("descriptor block size"))?;
        let mut descriptors = vec![0u8; desc_len];
        file.read_exact_at(&mut descriptors, u64::from(desc_offset))
            .map_err(StatsError::Read)?;
        let (found, len) = locate(&header, &descriptors, &[EXITS, PF_FIXED, PF_TAKEN])?;
        Ok(Self {
            file,
            len,
            exits: found[0],
            pf_fixed: found[1],
            pf_taken: found[2],
        })
    }

    /// Reads the counters now, with one `read(2)` from the start of the file (the file is read
    /// once: a second call would start where the first ended, so this takes `self`).
    pub fn read(mut self) -> Result<VcpuStats, StatsError> {
        let mut buf = vec![0u8; self.len];
        let mut filled = 0;
        while filled < buf.len() {
            match self.file.read(&mut buf[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(StatsError::Read(e)),
            }
        }
        let value = |at: Option<usize>| at.and_then(|at| u64_at(&buf[..filled], at));
        Ok(VcpuStats {
            exits: value(self.exits),
            page_faults_fixed: value(self.pf_fixed),
            page_faults_taken: value(self.pf_taken),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A statistics file's header and descriptors with `names` (name size 16), each value at
    /// 8 * its index; data block at 1000.
    fn layout(descs: &[(&str, u32, u16)]) -> (Vec<u8>, Vec<u8>) {
        let mut header = vec![0u8; HEADER_SIZE];
        header[4..8].copy_from_slice(&16u32.to_ne_bytes());
        header[8..12].copy_from_slice(&u32::try_from(descs.len()).unwrap().to_ne_bytes());
        header[20..24].copy_from_slice(&1000u32.to_ne_bytes());
        let mut block = Vec::new();
        for (i, (name, flags, size)) in descs.iter().enumerate() {
            let mut d = vec![0u8; DESC_SIZE + 16];
            d[0..4].copy_from_slice(&flags.to_ne_bytes());
            d[6..8].copy_from_slice(&size.to_ne_bytes());
            d[8..12].copy_from_slice(&(8 * u32::try_from(i).unwrap()).to_ne_bytes());
            d[DESC_SIZE..DESC_SIZE + name.len()].copy_from_slice(name.as_bytes());
            block.extend_from_slice(&d);
        }
        (header, block)
    }

    #[test]
    fn finds_plain_counters_by_name_and_skips_the_rest() {
        let (header, block) = layout(&[
            ("halt_wait_hist", 4, 32),
            ("exits", 0, 1),
            ("blocking", 1, 1),
            ("pf_fixed", 0, 1),
        ]);
        let (found, len) =
            locate(&header, &block, &["pf_fixed", "exits", "blocking", "nope"]).unwrap();
        assert_eq!(found, [Some(1024), Some(1008), None, None]);
        assert_eq!(len, 1032);
    }

    #[test]
    fn refuses_a_descriptor_block_of_the_wrong_size() {
        let (header, block) = layout(&[("exits", 0, 1)]);
        assert!(matches!(
            locate(&header, &block[..block.len() - 1], &["exits"]),
            Err(StatsError::Malformed(_))
        ));
        assert!(matches!(
            locate(&header[..8], &block, &["exits"]),
            Err(StatsError::Malformed(_))
        ));
    }

    #[test]
    fn counts_the_exits_of_a_real_vcpu() {
        let Ok(kvm) = kvm_ioctls::Kvm::new() else {
            return; // No KVM here.
        };
        let vm = kvm.create_vm().unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        let cap = libc::c_ulong::from(kvm_bindings::KVM_CAP_BINARY_STATS_FD);
        if kvm.check_extension_raw(cap) <= 0 {
            return; // A kernel before 5.14.
        }
        let stats = VcpuStatsReader::open(&vcpu).unwrap().read().unwrap();
        // x86 KVM has all three; a vCPU that never ran has no exits yet.
        assert_eq!(stats.exits, Some(0));
        assert_eq!(stats.page_faults_fixed, Some(0));
        assert!(stats.page_faults_taken.is_some());
    }
}
