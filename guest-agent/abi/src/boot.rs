//! The boot-info block the VMM writes at [`BOOT_INFO`](crate::layout::BOOT_INFO) before the guest
//! starts; the guest finds its address in RDI.

/// Value of [`BootInfo::magic`]: `"BULWARK\0"` little-endian.
pub const BOOT_INFO_MAGIC: u64 = u64::from_le_bytes(*b"BULWARK\0");

/// What the guest does after it is ready; the VMM sets it with `--guest-test` for fault tests.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TestMode {
    /// Normal operation.
    None = 0,
    /// Execute `ud2` (the VMM must report exception vector 6 and its RIP).
    InvalidOpcode = 1,
    /// Read [`MMIO_UNCLAIMED`](crate::layout::MMIO_UNCLAIMED), which no device claims.
    UnclaimedMmio = 2,
    /// Loop forever without exiting (the VMM's `--timeout` must end it).
    Spin = 3,
    /// Serve the vsock echo service on [`ECHO_PORT`](crate::vsock::ECHO_PORT) until stopped.
    VsockEcho = 4,
    /// Connect to host port [`HOST_TEST_PORT`](crate::vsock::HOST_TEST_PORT), write a greeting,
    /// echo what comes back until the host closes, then exit with status 0.
    VsockConnect = 5,
    /// Write to the exception stubs' page from CPL3 (the VMM must report a page fault: the
    /// page is supervisor-only and read-only).
    WriteStubs = 6,
    /// Write to the artifact window (the VMM must report a page fault: the window is mapped
    /// read-only, and the file behind it must stay unchanged).
    WriteArtifact = 7,
    /// Read the first byte past the artifact's last 4 KiB page, inside its last 2 MiB guest
    /// page (no memory is behind it: the VMM must report an unclaimed MMIO access).
    ReadPastArtifact = 8,
    /// Register a trap entry, map 64 KiB of window 0, write and read it, then read the byte
    /// past it: the VMM must deliver the page fault to the entry, which prints it and exits
    /// with status 0.
    WindowTrap = 9,
    /// Write to the window page tables from CPL3 (the VMM must report a page fault: the region
    /// is supervisor-only).
    WriteWindowTables = 10,
    /// Wait (spinning) until the VMM has mapped an artifact late (`--artifact-later`:
    /// [`BootInfo::artifact_size`] becomes non-zero), then read past it as
    /// [`TestMode::ReadPastArtifact`] does (the VMM must report an unclaimed MMIO access).
    ReadPastLateArtifact = 11,
}

impl TestMode {
    /// Decodes a raw value from boot info; unknown values are `None` (the guest refuses them).
    pub const fn from_raw(raw: u32) -> Option<Self> {
        match raw {
            0 => Some(Self::None),
            1 => Some(Self::InvalidOpcode),
            2 => Some(Self::UnclaimedMmio),
            3 => Some(Self::Spin),
            4 => Some(Self::VsockEcho),
            5 => Some(Self::VsockConnect),
            6 => Some(Self::WriteStubs),
            7 => Some(Self::WriteArtifact),
            8 => Some(Self::ReadPastArtifact),
            9 => Some(Self::WindowTrap),
            10 => Some(Self::WriteWindowTables),
            11 => Some(Self::ReadPastLateArtifact),
            _ => None,
        }
    }
}

/// Boot information, `repr(C)` so both sides agree on every offset.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BootInfo {
    /// Always [`BOOT_INFO_MAGIC`].
    pub magic: u64,
    /// [`crate::ABI_VERSION`] of the VMM that wrote this block.
    pub abi_version: u32,
    /// A raw [`TestMode`].
    pub test_mode: u32,
    /// Size of guest RAM in bytes, low and high together
    /// ([`ram_ranges`](crate::layout::ram_ranges)).
    pub mem_size: u64,
    /// First byte of the heap the guest may allocate from (2 MiB aligned).
    pub heap_start: u64,
    /// Size of the heap in bytes; it ends at the end of low RAM.
    pub heap_size: u64,
    /// Bytes of high RAM, from [`HIGH_RAM_START`](crate::layout::HIGH_RAM_START): all of it is a
    /// second heap (0 when RAM fits below [`LOW_RAM_END`](crate::layout::LOW_RAM_END)).
    pub high_ram_size: u64,
    /// Address of the payload blob (0 bytes long when the VMM got none).
    pub payload_start: u64,
    /// Length of the payload blob in bytes.
    pub payload_size: u64,
    /// TSC frequency in kHz, as KVM reports it for the vCPU (0 if unknown).
    pub tsc_khz: u64,
    /// The guest's vsock CID if the VM has a virtio-vsock device at
    /// [`VIRTIO_VSOCK_MMIO`](crate::layout::VIRTIO_VSOCK_MMIO), else 0. The device is already
    /// set up, its rings at [`VIRTQUEUES`](crate::layout::VIRTQUEUES).
    pub vsock_cid: u64,
    /// Bytes of the precompiled module mapped read-only at
    /// [`ARTIFACT_START`](crate::layout::ARTIFACT_START) (0: none). Past them, up to the next
    /// 4 KiB, the window reads as zeros; past that nothing is behind it.
    ///
    /// The one field that may change while the guest runs: a VMM started with
    /// `--artifact-later` boots the guest with 0 here and writes the size (one aligned 8-byte
    /// store) once, after the artifact's memory slot exists; it never changes again. A guest
    /// reads it with a volatile read when a call needs the artifact, and must check it against
    /// [`ARTIFACT_MAX_SIZE`](crate::layout::ARTIFACT_MAX_SIZE) again.
    pub artifact_size: u64,
}

impl BootInfo {
    /// Size of the block in guest memory.
    pub const SIZE: usize = core::mem::size_of::<Self>();

    /// Offset of [`BootInfo::artifact_size`] in the block: where a VMM that maps the artifact
    /// late writes its size, and where the guest reads it again.
    pub const ARTIFACT_SIZE_OFFSET: usize = core::mem::offset_of!(Self, artifact_size);

    /// Serializes the block as it lies in guest memory (little-endian, `repr(C)` order).
    pub fn to_bytes(&self) -> [u8; Self::SIZE] {
        let mut out = [0u8; Self::SIZE];
        let fields: [&[u8]; 12] = [
            &self.magic.to_le_bytes(),
            &self.abi_version.to_le_bytes(),
            &self.test_mode.to_le_bytes(),
            &self.mem_size.to_le_bytes(),
            &self.heap_start.to_le_bytes(),
            &self.heap_size.to_le_bytes(),
            &self.high_ram_size.to_le_bytes(),
            &self.payload_start.to_le_bytes(),
            &self.payload_size.to_le_bytes(),
            &self.tsc_khz.to_le_bytes(),
            &self.vsock_cid.to_le_bytes(),
            &self.artifact_size.to_le_bytes(),
        ];
        let mut at = 0;
        for f in fields {
            out[at..at + f.len()].copy_from_slice(f);
            at += f.len();
        }
        out
    }

    /// Checks the block's internal consistency; `Err` names the first problem.
    pub fn validate(&self) -> Result<(), &'static str> {
        use crate::layout::*;
        if self.magic != BOOT_INFO_MAGIC {
            return Err("bad magic");
        }
        if self.abi_version != crate::ABI_VERSION {
            return Err("ABI version mismatch");
        }
        if TestMode::from_raw(self.test_mode).is_none() {
            return Err("unknown test mode");
        }
        let payload_end = self.payload_start.checked_add(self.payload_size);
        if self.payload_start != PAYLOAD_START || payload_end.is_none_or(|e| e > self.heap_start) {
            return Err("payload outside its region");
        }
        let [(_, low), (_, high)] = ram_ranges(self.mem_size);
        let heap_end = self.heap_start.checked_add(self.heap_size);
        if !self.heap_start.is_multiple_of(PAGE_SIZE) || heap_end != Some(low) {
            return Err("heap does not end at the end of RAM");
        }
        if self.high_ram_size != high {
            return Err("high RAM is not the RAM past low RAM");
        }
        if self.mem_size > MAX_RAM_SIZE || self.heap_size < MIN_HEAP_SIZE {
            return Err("RAM size out of range");
        }
        if self.vsock_cid != 0 && !(3..0xffff_ffff).contains(&self.vsock_cid) {
            return Err("reserved vsock CID");
        }
        if self.artifact_size > ARTIFACT_MAX_SIZE {
            return Err("artifact larger than its window");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::*;

    fn sample() -> BootInfo {
        let heap_start = heap_start(4096).unwrap();
        BootInfo {
            magic: BOOT_INFO_MAGIC,
            abi_version: crate::ABI_VERSION,
            test_mode: TestMode::None as u32,
            mem_size: 256 << 20,
            heap_start,
            heap_size: (256 << 20) - heap_start,
            high_ram_size: 0,
            payload_start: PAYLOAD_START,
            payload_size: 4096,
            tsc_khz: 2_000_000,
            vsock_cid: 3,
            artifact_size: 70 << 20,
        }
    }

    #[test]
    fn bytes_match_the_repr_c_layout() {
        let info = sample();
        let bytes = info.to_bytes();
        assert_eq!(bytes.len(), 88);
        assert_eq!(BootInfo::ARTIFACT_SIZE_OFFSET, 80);
        assert_eq!(
            bytes[80..88],
            info.artifact_size.to_le_bytes(),
            "the late-written field is where the offset says"
        );
        // SAFETY: BootInfo is repr(C), plain integers, and `bytes` is exactly its size.
        let back: BootInfo = unsafe { core::ptr::read_unaligned(bytes.as_ptr().cast()) };
        assert_eq!(back, info);
    }

    #[test]
    fn validate_accepts_a_good_block_and_names_bad_fields() {
        assert_eq!(sample().validate(), Ok(()));
        let mut b = sample();
        b.magic = 0;
        assert_eq!(b.validate(), Err("bad magic"));
        let mut b = sample();
        b.abi_version += 1;
        assert_eq!(b.validate(), Err("ABI version mismatch"));
        let mut b = sample();
        b.test_mode = 99;
        assert_eq!(b.validate(), Err("unknown test mode"));
        let mut b = sample();
        b.payload_size = u64::MAX;
        assert_eq!(b.validate(), Err("payload outside its region"));
        let mut b = sample();
        b.heap_size += 1;
        assert_eq!(b.validate(), Err("heap does not end at the end of RAM"));
        let mut b = sample();
        b.high_ram_size = 1 << 30;
        assert_eq!(b.validate(), Err("high RAM is not the RAM past low RAM"));
        // 5 GiB: the heap ends at LOW_RAM_END, and 2 GiB more are above 4 GiB.
        let mut b = sample();
        b.mem_size = 5 << 30;
        b.heap_size = LOW_RAM_END - b.heap_start;
        assert_eq!(b.validate(), Err("high RAM is not the RAM past low RAM"));
        b.high_ram_size = 2 << 30;
        assert_eq!(b.validate(), Ok(()));
        let mut b = sample();
        b.vsock_cid = 2;
        assert_eq!(b.validate(), Err("reserved vsock CID"));
        let mut b = sample();
        b.artifact_size = ARTIFACT_MAX_SIZE + 1;
        assert_eq!(b.validate(), Err("artifact larger than its window"));
    }
}
