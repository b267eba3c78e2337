//! The WASI preview 1 error numbers (`wasi_snapshot_preview1` `errno`): the one table of them
//! in Bulwark. Only the values this implementation returns are listed.

/// A WASI error number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum Errno {
    /// Resource unavailable, try again.
    Again = 6,
    /// Bad file descriptor.
    BadF = 8,
    /// Device or resource busy.
    Busy = 10,
    /// File exists.
    Exist = 20,
    /// Bad address: a pointer or length outside the tool's memory.
    Fault = 21,
    /// File too large.
    FBig = 22,
    /// Illegal byte sequence (a path that is not UTF-8).
    IlSeq = 25,
    /// Invalid argument.
    Inval = 28,
    /// I/O error.
    Io = 29,
    /// Is a directory.
    IsDir = 31,
    /// Too many levels of symbolic links.
    Loop = 32,
    /// Too many open descriptors.
    MFile = 33,
    /// Name too long.
    NameTooLong = 37,
    /// Not enough memory (for a request whose bookkeeping would not fit the guest).
    NoMem = 48,
    /// No such file or directory.
    NoEnt = 44,
    /// No space left (the shared directories' limits).
    NoSpc = 51,
    /// Function not supported.
    NoSys = 52,
    /// Not a directory.
    NotDir = 54,
    /// Directory not empty.
    NotEmpty = 55,
    /// Not a socket.
    NotSock = 57,
    /// Not supported.
    NotSup = 58,
    /// Value too large for its type.
    Overflow = 61,
    /// Operation not permitted (also: a path that leads outside its directory).
    Perm = 63,
    /// Invalid seek (on a stream).
    SPipe = 70,
    /// Extension: capabilities insufficient.
    NotCapable = 76,
}

impl Errno {
    /// The WASI number.
    pub fn code(self) -> u16 {
        self as u16
    }
}

impl From<Errno> for i32 {
    fn from(e: Errno) -> Self {
        i32::from(e.code())
    }
}

impl From<bulwark_memfs::Errno> for Errno {
    fn from(e: bulwark_memfs::Errno) -> Self {
        use bulwark_memfs::Errno as M;
        match e {
            M::BadF => Self::BadF,
            M::Exist => Self::Exist,
            M::FBig => Self::FBig,
            M::Inval => Self::Inval,
            M::IsDir => Self::IsDir,
            M::Loop => Self::Loop,
            M::NameTooLong => Self::NameTooLong,
            M::NoEnt => Self::NoEnt,
            M::NoSpc => Self::NoSpc,
            M::NotDir => Self::NotDir,
            M::NotEmpty => Self::NotEmpty,
            M::NotSup => Self::NotSup,
            M::Perm => Self::Perm,
            M::IlSeq => Self::IlSeq,
        }
    }
}

/// The value a WASI function returns: 0 on success, else the error number.
pub fn to_code(r: Result<(), Errno>) -> i32 {
    match r {
        Ok(()) => 0,
        Err(e) => e.into(),
    }
}
