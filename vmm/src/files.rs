//! Reading an input file (guest image, payload) once, safely: a path can name a FIFO that
//! never answers, a device that never ends, or a file that grows between a size check and the
//! read. The file is opened once without blocking, the descriptor is checked to be a regular
//! file, and at most the cap is read from it.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// Why an input file was refused.
#[derive(Debug, thiserror::Error)]
pub enum InputFileError {
    /// It could not be opened or read.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// It is not a regular file.
    #[error("it is a {0}, not a regular file")]
    NotRegular(&'static str),
    /// It is larger than the cap.
    #[error("it is {size} bytes, more than the {max}-byte limit")]
    TooLarge {
        /// Its size (or the first size over the cap that was read).
        size: u64,
        /// The cap.
        max: u64,
    },
}

/// What kind of non-regular file `t` is, for messages.
pub fn kind_name(t: std::fs::FileType) -> &'static str {
    if t.is_dir() {
        "directory"
    } else if t.is_fifo() {
        "FIFO"
    } else if t.is_char_device() {
        "character device"
    } else if t.is_block_device() {
        "block device"
    } else if t.is_socket() {
        "socket"
    } else if t.is_symlink() {
        "symbolic link"
    } else {
        "special file"
    }
}

/// Opens `path` once (non-blocking, so a FIFO cannot stall the open) and checks the descriptor
/// is a regular file of at most `max` bytes. Returns the file and its size; a caller that reads
/// it must still bound what it reads (the file can change size meanwhile).
pub fn open_regular(path: &Path, max: u64) -> Result<(File, u64), InputFileError> {
    let file = File::options()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY)
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.file_type().is_file() {
        return Err(InputFileError::NotRegular(kind_name(meta.file_type())));
    }
    if meta.len() > max {
        return Err(InputFileError::TooLarge {
            size: meta.len(),
            max,
        });
    }
    Ok((file, meta.len()))
}

/// Opens `path` once as [`open_regular`] does and reads it, never more than `max` bytes even if
/// it grows meanwhile.
pub fn read_regular(path: &Path, max: u64) -> Result<Vec<u8>, InputFileError> {
    let (file, len) = open_regular(path, max)?;
    let mut bytes = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
    file.take(max.saturating_add(1)).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max {
        return Err(InputFileError::TooLarge {
            size: bytes.len() as u64,
            max,
        });
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("bulwark-files-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn fifos_devices_and_directories_are_refused_without_blocking() {
        let dir = scratch("kinds");
        let fifo = dir.join("x.wasm");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: mkfifo reads the NUL-terminated path we own.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        // A FIFO with no writer: a blocking open would hang here forever.
        let e = read_regular(&fifo, 1 << 20).unwrap_err();
        assert!(matches!(e, InputFileError::NotRegular("FIFO")), "{e}");
        let e = read_regular(Path::new("/dev/zero"), 1 << 20).unwrap_err();
        assert!(
            matches!(e, InputFileError::NotRegular("character device")),
            "{e}"
        );
        let e = read_regular(&dir, 1 << 20).unwrap_err();
        assert!(matches!(e, InputFileError::NotRegular("directory")), "{e}");
        let e = open_regular(&fifo, 1 << 20).unwrap_err();
        assert!(matches!(e, InputFileError::NotRegular("FIFO")), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn the_cap_holds_and_regular_files_read_whole() {
        let dir = scratch("cap");
        let f = dir.join("f");
        std::fs::write(&f, vec![1u8; 100]).unwrap();
        assert_eq!(read_regular(&f, 100).unwrap().len(), 100);
        let e = read_regular(&f, 99).unwrap_err();
        assert!(
            matches!(e, InputFileError::TooLarge { size: 100, max: 99 }),
            "{e}"
        );
        assert_eq!(open_regular(&f, 100).unwrap().1, 100);
        let e = open_regular(&f, 99).unwrap_err();
        assert!(
            matches!(e, InputFileError::TooLarge { size: 100, max: 99 }),
            "{e}"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
