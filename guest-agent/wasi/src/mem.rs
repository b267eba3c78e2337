//! Reading and writing the tool's linear memory, given as bytes. Every pointer and length
//! comes from the tool: each access is bounds-checked and a bad one is [`Errno::Fault`], never
//! a panic.

use alloc::string::String;
use alloc::vec::Vec;

use crate::Errno;
use crate::types::Iovec;

/// `len` bytes at `ptr`, or EFAULT.
pub fn slice(data: &[u8], ptr: u32, len: u32) -> Result<&[u8], Errno> {
    let start = ptr as usize;
    let end = start.checked_add(len as usize).ok_or(Errno::Fault)?;
    data.get(start..end).ok_or(Errno::Fault)
}

/// `len` writable bytes at `ptr`, or EFAULT.
pub fn slice_mut(data: &mut [u8], ptr: u32, len: u32) -> Result<&mut [u8], Errno> {
    let start = ptr as usize;
    let end = start.checked_add(len as usize).ok_or(Errno::Fault)?;
    data.get_mut(start..end).ok_or(Errno::Fault)
}

/// `N` bytes at `ptr`, copied out, or EFAULT.
pub fn read_array<const N: usize>(data: &[u8], ptr: u32) -> Result<[u8; N], Errno> {
    let n = u32::try_from(N).map_err(|_| Errno::Fault)?;
    let mut out = [0u8; N];
    out.copy_from_slice(slice(data, ptr, n)?);
    Ok(out)
}

/// Copies `bytes` to `ptr`.
pub fn write_bytes(data: &mut [u8], ptr: u32, bytes: &[u8]) -> Result<(), Errno> {
    let len = u32::try_from(bytes.len()).map_err(|_| Errno::Fault)?;
    slice_mut(data, ptr, len)?.copy_from_slice(bytes);
    Ok(())
}

/// Stores a little-endian u32 at `ptr`.
pub fn write_u32(data: &mut [u8], ptr: u32, v: u32) -> Result<(), Errno> {
    write_bytes(data, ptr, &v.to_le_bytes())
}

/// Stores a little-endian u64 at `ptr`.
pub fn write_u64(data: &mut [u8], ptr: u32, v: u64) -> Result<(), Errno> {
    write_bytes(data, ptr, &v.to_le_bytes())
}

/// Most bytes one call copies between the tool's memory and the host for iovec lists, their
/// buffers and `poll_oneoff`'s arrays: wasmtime-wasi's "hostcall fuel" (128 MiB a call). Past
/// it wasmtime-wasi answers ENOMEM before looking at the memory, and so does this.
pub const HOSTCALL_FUEL: u64 = 128 << 20;

/// Most non-empty iovecs one read or write uses (Linux's `IOV_MAX`); the rest of a longer
/// list is left for the next call, as a short read or write.
pub const MAX_IOVS: usize = 1024;

/// The non-empty entries of the iovec array of `count` entries at `ptr`, copied out (so a
/// read into memory that overlaps the array does not change it midway), at most
/// [`MAX_IOVS`] of them: the copy stays small whatever `count` the tool gives. The array
/// counts against [`HOSTCALL_FUEL`] (ENOMEM) and must be inside memory (EFAULT).
pub fn iovecs(data: &[u8], ptr: u32, count: u32) -> Result<Vec<Iovec>, Errno> {
    let size = u32::try_from(Iovec::SIZE).map_err(|_| Errno::Fault)?;
    if u64::from(count) * u64::from(size) > HOSTCALL_FUEL {
        return Err(Errno::NoMem);
    }
    let raw = slice(data, ptr, count.checked_mul(size).ok_or(Errno::Fault)?)?;
    Ok(raw
        .chunks_exact(Iovec::SIZE)
        .map(|c| {
            let mut b = [0u8; Iovec::SIZE];
            b.copy_from_slice(c);
            Iovec::decode(&b)
        })
        .filter(|iov| iov.len > 0)
        .take(MAX_IOVS)
        .collect())
}

/// A path argument: at most `bulwark_proto::tree::MAX_PATH` bytes (else ENAMETOOLONG), UTF-8
/// (else EILSEQ), copied out of the tool's memory.
pub fn path(data: &[u8], ptr: u32, len: u32) -> Result<String, Errno> {
    if len as usize > bulwark_proto::tree::MAX_PATH {
        return Err(Errno::NameTooLong);
    }
    let bytes = slice(data, ptr, len)?;
    core::str::from_utf8(bytes)
        .map(String::from)
        .map_err(|_| Errno::IlSeq)
}

/// Writes a list of strings as argv/environ do: pointers at `ptrs`, NUL-terminated bytes at `buf`.
pub fn write_strings(data: &mut [u8], list: &[String], ptrs: u32, buf: u32) -> Result<(), Errno> {
    let mut at = buf;
    for (i, s) in list.iter().enumerate() {
        let slot = u32::try_from(i)
            .ok()
            .and_then(|i| i.checked_mul(4))
            .and_then(|off| ptrs.checked_add(off))
            .ok_or(Errno::Fault)?;
        write_u32(data, slot, at)?;
        write_bytes(data, at, s.as_bytes())?;
        let len = u32::try_from(s.len()).map_err(|_| Errno::Fault)?;
        let nul = at.checked_add(len).ok_or(Errno::Fault)?;
        write_bytes(data, nul, &[0])?;
        at = nul.checked_add(1).ok_or(Errno::Fault)?;
    }
    Ok(())
}

/// Count and total NUL-terminated size of a string list, as `*_sizes_get` report them.
pub fn sizes(list: &[String]) -> (u32, u32) {
    let bytes: usize = list.iter().map(|s| s.len() + 1).sum();
    (
        u32::try_from(list.len()).unwrap_or(u32::MAX),
        u32::try_from(bytes).unwrap_or(u32::MAX),
    )
}
