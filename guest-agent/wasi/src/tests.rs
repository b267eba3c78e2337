//! Host tests of the encoders and of the fd/path logic over a byte-array memory.

use alloc::string::{String, ToString};
use alloc::vec;
use alloc::vec::Vec;

use bulwark_proto::tree::{Entry, Node, SharedDir};

use crate::types::*;
use crate::*;

/// A host with a clock the test moves and counting random bytes.
#[derive(Default)]
struct TestHost {
    now: u64,
    waited: u64,
}

impl Host for TestHost {
    fn monotonic_ns(&self) -> u64 {
        self.now
    }
    fn realtime_ns(&self) -> u64 {
        1_000_000_000 + self.now
    }
    fn random(&mut self, buf: &mut [u8]) {
        for (i, b) in buf.iter_mut().enumerate() {
            *b = i.to_le_bytes()[0];
        }
    }
    fn wait_ns(&mut self, ns: u64) {
        self.now += ns;
        self.waited += ns;
    }
}

const PATH: u32 = 1000;
const OUT: u32 = 2000;
const BUF: u32 = 3000;
const IOV: u32 = 4000;

fn ctx_with(entries: Vec<Entry>) -> WasiCtx<TestHost> {
    WasiCtx::new(
        Params {
            args: vec!["tool".to_string(), "a".to_string()],
            env: vec![("K".to_string(), "V".to_string())],
            stdin: b"input".to_vec(),
            dirs: vec![SharedDir {
                guest_path: "/".to_string(),
                entries,
            }],
            fs_limits: bulwark_memfs::Limits {
                max_bytes: 1 << 20,
                max_inodes: 100,
            },
            max_output: 1 << 16,
        },
        TestHost::default(),
    )
    .unwrap()
}

fn ctx() -> WasiCtx<TestHost> {
    ctx_with(vec![
        Entry {
            path: "file".into(),
            node: Node::File(b"hello".to_vec()),
        },
        Entry {
            path: "dir".into(),
            node: Node::Dir,
        },
    ])
}

fn put(mem: &mut [u8], at: u32, bytes: &[u8]) -> u32 {
    mem[at as usize..at as usize + bytes.len()].copy_from_slice(bytes);
    u32::try_from(bytes.len()).unwrap()
}

fn u32_at(mem: &[u8], at: u32) -> u32 {
    u32::from_le_bytes(mem[at as usize..at as usize + 4].try_into().unwrap())
}

fn u64_at(mem: &[u8], at: u32) -> u64 {
    u64::from_le_bytes(mem[at as usize..at as usize + 8].try_into().unwrap())
}

/// Opens `path` under the preopen (fd 3) and returns the new fd.
fn open(
    w: &mut WasiCtx<TestHost>,
    mem: &mut [u8],
    path: &str,
    lookup: u32,
    of: u16,
    base: u64,
    fdf: u16,
) -> Result<u32, Errno> {
    let len = put(mem, PATH, path.as_bytes());
    w.path_open(
        mem,
        3,
        lookup,
        PATH,
        len,
        u32::from(of),
        base,
        0,
        u32::from(fdf),
        OUT,
    )?;
    Ok(u32_at(mem, OUT))
}

fn write(w: &mut WasiCtx<TestHost>, mem: &mut [u8], fd: u32, data: &[u8]) -> Result<u32, Errno> {
    let n = put(mem, BUF, data);
    put(mem, IOV, &[BUF.to_le_bytes(), n.to_le_bytes()].concat());
    w.fd_write(mem, fd, IOV, 1, None, OUT)?;
    Ok(u32_at(mem, OUT))
}

fn read(w: &mut WasiCtx<TestHost>, mem: &mut [u8], fd: u32, len: u32) -> Result<Vec<u8>, Errno> {
    put(mem, IOV, &[BUF.to_le_bytes(), len.to_le_bytes()].concat());
    w.fd_read(mem, fd, IOV, 1, None, OUT)?;
    let n = u32_at(mem, OUT) as usize;
    Ok(mem[BUF as usize..BUF as usize + n].to_vec())
}

fn stat(
    w: &mut WasiCtx<TestHost>,
    mem: &mut [u8],
    path: &str,
    lookup: u32,
) -> Result<(u8, u64, u64), Errno> {
    let len = put(mem, PATH, path.as_bytes());
    w.path_filestat_get(mem, 3, lookup, PATH, len, OUT)?;
    Ok((
        mem[OUT as usize + 16],
        u64_at(mem, OUT + 24),
        u64_at(mem, OUT + 32),
    ))
}

/// Names from an `fd_readdir` of `fd` with a big buffer.
fn readdir(w: &mut WasiCtx<TestHost>, mem: &mut [u8], fd: u32) -> Vec<String> {
    w.fd_readdir(mem, fd, BUF, 900, 0, OUT).unwrap();
    let used = u32_at(mem, OUT) as usize;
    let buf = &mem[BUF as usize..BUF as usize + used];
    let mut names = Vec::new();
    let mut at = 0;
    while at + 24 <= buf.len() {
        let namlen = u32::from_le_bytes(buf[at + 16..at + 20].try_into().unwrap()) as usize;
        names.push(String::from_utf8(buf[at + 24..at + 24 + namlen].to_vec()).unwrap());
        at += 24 + namlen;
    }
    names
}

#[test]
fn encoders_lay_out_the_wasi_structs() {
    let fdstat = Fdstat {
        filetype: filetype::REGULAR_FILE,
        flags: fdflags::APPEND,
        rights_base: 0x0102,
        rights_inheriting: 0x0304,
    }
    .encode();
    assert_eq!(fdstat[0], 4);
    assert_eq!(&fdstat[2..4], &[1, 0]);
    assert_eq!(&fdstat[8..10], &[2, 1]);
    assert_eq!(&fdstat[16..18], &[4, 3]);
    let fs = Filestat {
        dev: 1,
        ino: 2,
        filetype: filetype::DIRECTORY,
        nlink: 3,
        size: 4,
        atim: 5,
        mtim: 6,
        ctim: 7,
    }
    .encode();
    for (i, v) in [(0, 1), (8, 2), (24, 3), (32, 4), (40, 5), (48, 6), (56, 7)] {
        assert_eq!(fs[i], v, "field at {i}");
    }
    assert_eq!(fs[16], 3);
    assert_eq!(Prestat { name_len: 9 }.encode(), [0, 0, 0, 0, 9, 0, 0, 0]);
    let d = Dirent {
        next: 1,
        ino: 2,
        namlen: 3,
        filetype: 7,
    }
    .encode();
    assert_eq!((d[0], d[8], d[16], d[20]), (1, 2, 3, 7));
    assert_eq!(
        Iovec::decode(&[1, 0, 0, 0, 2, 0, 0, 0]),
        Iovec { ptr: 1, len: 2 }
    );
    let mut sub = [0u8; 48];
    sub[0] = 9;
    sub[8] = eventtype::CLOCK;
    sub[16] = 1;
    sub[24] = 50;
    sub[40] = 1;
    assert_eq!(
        Subscription::decode(&sub),
        Ok(Subscription {
            userdata: 9,
            kind: SubscriptionKind::Clock {
                id: 1,
                timeout: 50,
                precision: 0,
                flags: 1
            }
        })
    );
    sub[8] = 7;
    assert_eq!(Subscription::decode(&sub), Err(Errno::Inval));
    let ev = Event {
        userdata: 5,
        error: 8,
        kind: 1,
        nbytes: 3,
        flags: 1,
    }
    .encode();
    assert_eq!((ev[0], ev[8], ev[10], ev[16], ev[24]), (5, 8, 1, 3, 1));
}

#[test]
fn bad_pointers_are_efault_never_a_panic() {
    let mut w = ctx();
    let mut mem = vec![0u8; 8192];
    assert_eq!(w.args_sizes_get(&mut mem, 8190, 0), Err(Errno::Fault));
    assert_eq!(w.args_get(&mut mem, u32::MAX - 2, 0), Err(Errno::Fault));
    assert_eq!(
        w.fd_write(&mut mem, 1, u32::MAX, 2, None, 0),
        Err(Errno::Fault)
    );
    put(
        &mut mem,
        IOV,
        &[u32::MAX.to_le_bytes(), 16u32.to_le_bytes()].concat(),
    );
    assert_eq!(w.fd_write(&mut mem, 1, IOV, 1, None, 0), Err(Errno::Fault));
    assert_eq!(
        w.path_open(&mut mem, 3, 0, 8000, 500, 0, 0, 0, 0, 0),
        Err(Errno::Fault)
    );
    assert_eq!(w.random_get(&mut mem, 8000, 500), Err(Errno::Fault));
    // The listing (106 bytes) would run past the end of memory.
    assert_eq!(
        w.fd_readdir(&mut mem, 3, 8150, 500, 0, 0),
        Err(Errno::Fault)
    );
    assert_eq!(w.poll_oneoff(&mut mem, 8190, 0, 1, 0), Err(Errno::Fault));
    // Nothing was written to stdout by the failed calls.
    assert!(w.stdout.bytes.is_empty());
}

#[test]
fn args_environ_clocks_and_random() {
    let mut w = ctx();
    let mut mem = vec![0u8; 8192];
    w.args_sizes_get(&mut mem, 0, 4).unwrap();
    assert_eq!((u32_at(&mem, 0), u32_at(&mem, 4)), (2, 7));
    w.args_get(&mut mem, 100, 200).unwrap();
    assert_eq!(u32_at(&mem, 104), 205);
    assert_eq!(&mem[200..207], b"tool\0a\0");
    w.environ_get(&mut mem, 100, 200).unwrap();
    assert_eq!(&mem[200..204], b"K=V\0");
    w.host.now = 42;
    w.clock_time_get(&mut mem, clockid::MONOTONIC, 0, 0)
        .unwrap();
    assert_eq!(u64_at(&mem, 0), 42);
    assert_eq!(
        w.clock_time_get(&mut mem, clockid::PROCESS_CPUTIME, 0, 0),
        Err(Errno::BadF)
    );
    assert_eq!(w.clock_res_get(&mut mem, 9, 0), Err(Errno::Inval));
    w.random_get(&mut mem, 10, 4).unwrap();
    assert_eq!(&mem[10..14], &[0, 1, 2, 3]);
}

#[test]
fn stdio_is_unknown_like_wasmtime_and_preopen_rights_are_its_fixed_set() {
    let mut w = ctx();
    let mut mem = vec![0u8; 8192];
    w.fd_fdstat_get(&mut mem, 1, 0).unwrap();
    assert_eq!(mem[0], filetype::UNKNOWN);
    assert_eq!(u64_at(&mem, 8), rights::FD_WRITE);
    w.fd_fdstat_get(&mut mem, 0, 0).unwrap();
    assert_eq!(u64_at(&mem, 8), rights::FD_READ);
    w.fd_fdstat_get(&mut mem, 3, 0).unwrap();
    let (base, inheriting) = (u64_at(&mem, 8), u64_at(&mem, 16));
    assert_eq!(mem[0], filetype::DIRECTORY);
    assert_eq!(base & (rights::FD_READ | rights::FD_WRITE), 0);
    assert_ne!(inheriting & rights::FD_WRITE, 0);
    // Reopening the preopen with its own rights works (it asks no write).
    let fd = open(&mut w, &mut mem, ".", 0, oflags::DIRECTORY, base, 0).unwrap();
    assert_eq!(fd, 4);
    // With FD_WRITE a directory is EISDIR, as on Linux.
    assert_eq!(
        open(
            &mut w,
            &mut mem,
            ".",
            0,
            oflags::DIRECTORY,
            rights::FD_WRITE,
            0
        ),
        Err(Errno::IsDir)
    );
    assert_eq!(
        open(
            &mut w,
            &mut mem,
            "dir",
            0,
            oflags::DIRECTORY | oflags::CREAT,
            0,
            0
        ),
        Err(Errno::Inval)
    );
    w.fd_prestat_get(&mut mem, 3, 0).unwrap();
    assert_eq!(u32_at(&mem, 4), 1);
    assert_eq!(w.fd_prestat_get(&mut mem, 4, 0), Err(Errno::BadF));
    assert_eq!(
        w.fd_prestat_dir_name(&mut mem, 4, 0, 10),
        Err(Errno::NotDir)
    );
    assert_eq!(w.fd_fdstat_set_rights(4, 0, 0), Err(Errno::NotSup));
    assert_eq!(w.fd_fdstat_set_rights(1, 0, 0), Err(Errno::BadF));
}

#[test]
fn files_open_read_write_seek_and_truncate_by_open_mode() {
    let mut w = ctx();
    let mut mem = vec![0u8; 8192];
    let ro = open(&mut w, &mut mem, "file", 0, 0, rights::FD_READ, 0).unwrap();
    assert_eq!(read(&mut w, &mut mem, ro, 3).unwrap(), b"hel");
    assert_eq!(read(&mut w, &mut mem, ro, 10).unwrap(), b"lo");
    assert_eq!(write(&mut w, &mut mem, ro, b"x"), Err(Errno::BadF));
    assert_eq!(w.fd_filestat_set_size(ro, 0), Err(Errno::Inval));
    w.fd_seek(&mut mem, ro, -2, u32::from(whence::END), OUT)
        .unwrap();
    assert_eq!(u64_at(&mem, OUT), 3);
    assert_eq!(
        w.fd_seek(&mut mem, ro, -1, u32::from(whence::SET), OUT),
        Err(Errno::Inval)
    );
    assert_eq!(w.fd_seek(&mut mem, 0, 0, 0, OUT), Err(Errno::SPipe));
    assert_eq!(w.fd_seek(&mut mem, 3, 0, 0, OUT), Err(Errno::BadF));
    let wr = open(
        &mut w,
        &mut mem,
        "new",
        0,
        oflags::CREAT,
        rights::FD_WRITE,
        fdflags::APPEND,
    )
    .unwrap();
    assert_eq!(write(&mut w, &mut mem, wr, b"abc"), Ok(3));
    assert_eq!(write(&mut w, &mut mem, wr, b"de"), Ok(2));
    assert_eq!(read(&mut w, &mut mem, wr, 5), Err(Errno::BadF));
    assert_eq!(
        stat(&mut w, &mut mem, "new", 0).unwrap(),
        (filetype::REGULAR_FILE, 1, 5)
    );
    assert_eq!(
        open(
            &mut w,
            &mut mem,
            "new",
            0,
            oflags::CREAT | oflags::EXCL,
            0,
            0
        ),
        Err(Errno::Exist)
    );
    let t = open(&mut w, &mut mem, "new", 0, oflags::TRUNC, 0, 0).unwrap();
    assert_eq!(stat(&mut w, &mut mem, "new", 0).unwrap().2, 0);
    assert_eq!(w.fd_allocate(t, 0, 10), Err(Errno::NotSup));
    assert_eq!(
        open(&mut w, &mut mem, "file", 0, oflags::DIRECTORY, 0, 0),
        Err(Errno::NotDir)
    );
    assert_eq!(
        open(&mut w, &mut mem, "file/", 0, 0, 0, 0),
        Err(Errno::NotDir)
    );
    assert_eq!(
        open(&mut w, &mut mem, "missing", 0, 0, 0, 0),
        Err(Errno::NoEnt)
    );
    assert_eq!(open(&mut w, &mut mem, "../x", 0, 0, 0, 0), Err(Errno::Perm));
    assert_eq!(
        open(&mut w, &mut mem, "file", 0, 0, 0, fdflags::SYNC),
        Err(Errno::NotSup)
    );
    w.fd_close(t).unwrap();
    assert_eq!(w.fd_close(t), Err(Errno::BadF));
}

#[test]
fn directories_list_in_host_order_then_creation_order_with_linux_stats() {
    let mut w = ctx_with(vec![
        Entry {
            path: "zz".into(),
            node: Node::File(vec![]),
        },
        Entry {
            path: "aa".into(),
            node: Node::Dir,
        },
    ]);
    let mut mem = vec![0u8; 8192];
    let len = put(&mut mem, PATH, b"mm");
    w.path_create_directory(&mut mem, 3, PATH, len).unwrap();
    assert_eq!(readdir(&mut w, &mut mem, 3), [".", "..", "zz", "aa", "mm"]);
    let (kind, nlink, size) = stat(&mut w, &mut mem, ".", 0).unwrap();
    assert_eq!((kind, nlink, size), (filetype::DIRECTORY, 4, 4096));
    // A buffer too small gets cut at its end and is reported full.
    w.fd_readdir(&mut mem, 3, BUF, 30, 0, OUT).unwrap();
    assert_eq!(u32_at(&mem, OUT), 30);
    // Cookie 3 starts at the fourth entry.
    w.fd_readdir(&mut mem, 3, BUF, 900, 3, OUT).unwrap();
    assert_eq!(&mem[BUF as usize + 24..BUF as usize + 26], b"aa");
    let fd = open(&mut w, &mut mem, "file", 0, 0, 0, 0);
    assert_eq!(fd, Err(Errno::NoEnt));
    let f = open(&mut w, &mut mem, "zz", 0, 0, 0, 0).unwrap();
    assert_eq!(
        w.fd_readdir(&mut mem, f, BUF, 100, 0, OUT),
        Err(Errno::BadF)
    );
}

#[test]
fn rename_unlink_and_link_follow_posix_and_wasmtime() {
    let mut w = ctx();
    let mut mem = vec![0u8; 8192];
    let p = |mem: &mut [u8], at: u32, s: &str| put(mem, at, s.as_bytes());
    let (l1, l2) = (
        p(&mut mem, PATH, "file"),
        p(&mut mem, PATH + 100, "dir/moved"),
    );
    w.path_rename(&mut mem, 3, PATH, l1, 3, PATH + 100, l2)
        .unwrap();
    assert_eq!(stat(&mut w, &mut mem, "dir/moved", 0).unwrap().2, 5);
    let (l1, l2) = (
        p(&mut mem, PATH, "dir/moved"),
        p(&mut mem, PATH + 100, "hard"),
    );
    assert_eq!(
        w.path_link(
            &mut mem,
            3,
            lookupflags::SYMLINK_FOLLOW,
            PATH,
            l1,
            3,
            PATH + 100,
            l2
        ),
        Err(Errno::Inval),
        "wasmtime-wasi refuses SYMLINK_FOLLOW on path_link"
    );
    w.path_link(&mut mem, 3, 0, PATH, l1, 3, PATH + 100, l2)
        .unwrap();
    assert_eq!(stat(&mut w, &mut mem, "hard", 0).unwrap().1, 2);
    let l = p(&mut mem, PATH, "hard/");
    assert_eq!(w.path_unlink_file(&mut mem, 3, PATH, l), Err(Errno::NotDir));
    let l = p(&mut mem, PATH, "dir");
    assert_eq!(w.path_unlink_file(&mut mem, 3, PATH, l), Err(Errno::IsDir));
    assert_eq!(
        w.path_remove_directory(&mut mem, 3, PATH, l),
        Err(Errno::NotEmpty)
    );
    let l = p(&mut mem, PATH, "hard");
    w.path_unlink_file(&mut mem, 3, PATH, l).unwrap();
    assert_eq!(stat(&mut w, &mut mem, "hard", 0), Err(Errno::NoEnt));
    assert_eq!(stat(&mut w, &mut mem, "dir/moved", 0).unwrap().1, 1);
}

#[test]
fn symlinks_are_made_read_followed_and_bounded() {
    let mut w = ctx();
    let mut mem = vec![0u8; 8192];
    let symlink = |w: &mut WasiCtx<TestHost>, mem: &mut [u8], target: &str, name: &str| {
        let lt = put(mem, PATH, target.as_bytes());
        let ln = put(mem, PATH + 200, name.as_bytes());
        w.path_symlink(mem, PATH, lt, 3, PATH + 200, ln)
    };
    symlink(&mut w, &mut mem, "file", "link").unwrap();
    symlink(&mut w, &mut mem, "dir", "dlink").unwrap();
    symlink(&mut w, &mut mem, "..", "up").unwrap();
    symlink(&mut w, &mut mem, "self", "self").unwrap();
    assert_eq!(symlink(&mut w, &mut mem, "/etc", "abs"), Err(Errno::Perm));
    assert_eq!(symlink(&mut w, &mut mem, "x", "file"), Err(Errno::Exist));
    assert_eq!(symlink(&mut w, &mut mem, "x", "new/"), Err(Errno::NoEnt));
    let follow = lookupflags::SYMLINK_FOLLOW;
    assert_eq!(
        stat(&mut w, &mut mem, "link", 0).unwrap().0,
        filetype::SYMBOLIC_LINK
    );
    assert_eq!(
        stat(&mut w, &mut mem, "link", follow).unwrap(),
        (filetype::REGULAR_FILE, 1, 5)
    );
    assert_eq!(
        stat(&mut w, &mut mem, "dlink/", 0).unwrap().0,
        filetype::DIRECTORY
    );
    assert_eq!(stat(&mut w, &mut mem, "up", follow), Err(Errno::Perm));
    assert_eq!(stat(&mut w, &mut mem, "self", follow), Err(Errno::Loop));
    // Opening through a link reads the target; not following it is ELOOP.
    let fd = open(&mut w, &mut mem, "link", follow, 0, rights::FD_READ, 0).unwrap();
    assert_eq!(read(&mut w, &mut mem, fd, 5).unwrap(), b"hello");
    assert_eq!(
        open(&mut w, &mut mem, "link", 0, 0, rights::FD_READ, 0),
        Err(Errno::Loop)
    );
    assert_eq!(
        open(&mut w, &mut mem, "dlink", 0, oflags::DIRECTORY, 0, 0),
        Err(Errno::NotDir)
    );
    // readlink cuts at the buffer without an error.
    let l = put(&mut mem, PATH, b"link");
    w.path_readlink(&mut mem, 3, PATH, l, BUF, 2, OUT).unwrap();
    assert_eq!(
        (u32_at(&mem, OUT), &mem[BUF as usize..BUF as usize + 2]),
        (2, &b"fi"[..])
    );
    let l = put(&mut mem, PATH, b"file");
    assert_eq!(
        w.path_readlink(&mut mem, 3, PATH, l, BUF, 10, OUT),
        Err(Errno::Inval)
    );
    // Unlinking the link leaves the file; links travel back to the host.
    let l = put(&mut mem, PATH, b"link");
    w.path_unlink_file(&mut mem, 3, PATH, l).unwrap();
    assert!(stat(&mut w, &mut mem, "file", 0).is_ok());
    let tree = w.take_dirs().unwrap();
    assert!(tree[0].contains(&Entry {
        path: "dlink".into(),
        node: Node::Symlink("dir".into())
    }));
}

#[test]
fn poll_oneoff_waits_for_clocks_through_the_host() {
    let mut w = ctx();
    let mut mem = vec![0u8; 8192];
    let mut sub = [0u8; 48];
    sub[0] = 7;
    sub[8] = eventtype::CLOCK;
    sub[16] = u8::try_from(clockid::MONOTONIC).unwrap();
    sub[24..32].copy_from_slice(&5000u64.to_le_bytes());
    put(&mut mem, 100, &sub);
    w.poll_oneoff(&mut mem, 100, 400, 1, OUT).unwrap();
    assert_eq!(u32_at(&mem, OUT), 1);
    assert_eq!(w.host.waited, 5000);
    assert_eq!((mem[400], mem[410]), (7, eventtype::CLOCK));
    // A ready descriptor means no wait: stdin has 5 bytes.
    let mut fdsub = [0u8; 48];
    fdsub[0] = 8;
    fdsub[8] = eventtype::FD_READ;
    put(&mut mem, 148, &fdsub);
    w.poll_oneoff(&mut mem, 100, 400, 2, OUT).unwrap();
    assert_eq!(u32_at(&mem, OUT), 1);
    assert_eq!(w.host.waited, 5000);
    assert_eq!((mem[400], u64_at(&mem, 416)), (8, 5));
    assert_eq!(w.poll_oneoff(&mut mem, 100, 400, 0, OUT), Err(Errno::Inval));
    fdsub[16] = 99;
    put(&mut mem, 148, &fdsub);
    assert_eq!(w.poll_oneoff(&mut mem, 148, 400, 1, OUT), Err(Errno::BadF));
}

/// Puts one iovec at `IOV`.
fn iov(mem: &mut [u8], ptr: u32, len: u32) {
    put(mem, IOV, &[ptr.to_le_bytes(), len.to_le_bytes()].concat());
}

#[test]
fn offsets_near_u64_max_are_errors_never_panics() {
    let mut w = ctx();
    let mut mem = vec![0u8; 1 << 16];
    let rw = rights::FD_READ | rights::FD_WRITE;
    let fd = open(&mut w, &mut mem, "file", 0, 0, rw, 0).unwrap();
    iov(&mut mem, BUF, 4);
    for off in [u64::MAX, u64::MAX - 3, 1 << 63, 1 << 40, 1 << 21] {
        assert_eq!(w.fd_read(&mut mem, fd, IOV, 1, Some(off), OUT), Ok(()));
        assert_eq!(u32_at(&mem, OUT), 0, "{off}");
        let r = w.fd_write(&mut mem, fd, IOV, 1, Some(off), OUT);
        assert!(matches!(r, Err(Errno::FBig | Errno::NoSpc)), "{off}: {r:?}");
        let r = w.fd_filestat_set_size(fd, off);
        assert!(matches!(r, Err(Errno::FBig | Errno::NoSpc)), "{off}: {r:?}");
        assert_eq!(w.fd_allocate(fd, off, off), Err(Errno::NotSup));
        assert_eq!(w.fd_advise(fd, off, off, 0), Ok(()));
    }
    // The file is as it was, and so are the books.
    assert_eq!(stat(&mut w, &mut mem, "file", 0).unwrap().2, 5);
    assert_eq!(w.fs().bytes(), 5);
    // Seeks: far is fine (reads give nothing, writes are refused), negative or past
    // u64::MAX is EINVAL, unknown whence EINVAL.
    assert_eq!(
        w.fd_seek(&mut mem, fd, i64::MAX, u32::from(whence::SET), OUT),
        Ok(())
    );
    assert_eq!(
        w.fd_seek(&mut mem, fd, i64::MAX, u32::from(whence::CUR), OUT),
        Ok(())
    );
    assert_eq!(u64_at(&mem, OUT), u64::MAX - 1);
    assert_eq!(
        w.fd_seek(&mut mem, fd, 2, u32::from(whence::CUR), OUT),
        Err(Errno::Inval)
    );
    assert_eq!(read(&mut w, &mut mem, fd, 4), Ok(Vec::new()));
    assert_eq!(write(&mut w, &mut mem, fd, b"abcd"), Err(Errno::FBig));
    assert_eq!(
        w.fd_seek(&mut mem, fd, -1, u32::from(whence::SET), OUT),
        Err(Errno::Inval)
    );
    assert_eq!(
        w.fd_seek(&mut mem, fd, i64::MIN, u32::from(whence::END), OUT),
        Err(Errno::Inval)
    );
    assert_eq!(w.fd_seek(&mut mem, fd, 0, u32::MAX, OUT), Err(Errno::Inval));
    assert_eq!(w.fd_seek(&mut mem, fd, 0, 3, OUT), Err(Errno::Inval));
}

#[test]
fn iovec_lists_are_bounded_and_short_transfers_keep_what_moved() {
    let mut w = ctx();
    let mut mem = vec![0u8; 1 << 20];
    // Lists past wasmtime-wasi's 128 MiB copy budget: ENOMEM, as it answers, before memory
    // is looked at; more iovecs than memory holds: EFAULT. Nothing is written either way.
    assert_eq!(
        w.fd_write(&mut mem, 1, IOV, u32::MAX, None, OUT),
        Err(Errno::NoMem)
    );
    assert_eq!(
        w.fd_write(&mut mem, 1, IOV, 1 << 29, None, OUT),
        Err(Errno::NoMem)
    );
    assert_eq!(
        w.fd_write(&mut mem, 1, IOV, (1 << 17) + 1, None, OUT),
        Err(Errno::Fault)
    );
    iov(&mut mem, 0, 200 << 20);
    assert_eq!(
        w.fd_write(&mut mem, 1, IOV, 1, None, OUT),
        Err(Errno::NoMem)
    );
    assert_eq!(w.fd_read(&mut mem, 0, IOV, 1, None, OUT), Err(Errno::NoMem));
    // A memory full of empty iovecs: nothing written, nothing kept.
    iov(&mut mem, 0, 0);
    assert_eq!(w.fd_write(&mut mem, 1, 0, 1 << 17, None, OUT), Ok(()));
    assert_eq!(u32_at(&mem, OUT), 0);
    // 4096 iovecs each naming the whole memory (4 GiB in all): the copy budget left after the
    // list cuts the transfer short, the count stays exact, and the output keeps to its cap.
    let whole = [0u32.to_le_bytes(), (1u32 << 20).to_le_bytes()].concat();
    for i in 0..4096 {
        put(&mut mem, (1 << 19) + i * 8, &whole);
    }
    assert_eq!(w.fd_write(&mut mem, 1, 1 << 19, 4096, None, OUT), Ok(()));
    assert_eq!(u32_at(&mem, OUT), (128 << 20) - 4096 * 8);
    assert_eq!(w.stdout.bytes.len(), 1 << 16);
    assert!(w.stdout.truncated);
    // A bad buffer anywhere in the list fails the read before stdin is consumed.
    put(
        &mut mem,
        IOV,
        &[BUF, 2, u32::MAX - 1, 4].map(u32::to_le_bytes).concat(),
    );
    assert_eq!(w.fd_read(&mut mem, 0, IOV, 2, None, OUT), Err(Errno::Fault));
    assert_eq!(read(&mut w, &mut mem, 0, 100), Ok(b"input".to_vec()));
    // A write that runs out of room part way is short, and what fit stays.
    let rw = rights::FD_READ | rights::FD_WRITE;
    let fd = open(&mut w, &mut mem, "file", 0, oflags::TRUNC, rw, 0).unwrap();
    put(&mut mem, BUF, b"abcd");
    put(
        &mut mem,
        IOV,
        &[BUF, 4, 0, 1 << 20].map(u32::to_le_bytes).concat(),
    );
    assert_eq!(w.fd_write(&mut mem, fd, IOV, 2, None, OUT), Ok(()));
    assert_eq!(u32_at(&mem, OUT), 4);
    assert_eq!(w.fd_tell(&mut mem, fd, OUT), Ok(()));
    assert_eq!(u64_at(&mem, OUT), 4);
    assert_eq!(w.fs().bytes(), 4);
    // Writing nothing past the end does not extend the file.
    iov(&mut mem, BUF, 0);
    assert_eq!(w.fd_write(&mut mem, fd, IOV, 1, Some(1000), OUT), Ok(()));
    assert_eq!(stat(&mut w, &mut mem, "file", 0).unwrap().2, 4);
}

#[test]
fn readdir_takes_any_buffer_length_and_cookie() {
    let mut w = ctx();
    let mut mem = vec![0u8; 4096];
    let all = 24 + 1 + 24 + 2 + 24 + 4 + 24 + 3;
    for (len, used) in [(0, 0), (1, 1), (23, 23), (24, 24), (25, 25), (300, all)] {
        mem[usize::try_from(BUF).unwrap()..].fill(0xaa);
        w.fd_readdir(&mut mem, 3, BUF, len, 0, OUT).unwrap();
        assert_eq!(u32_at(&mem, OUT), used, "{len}");
        // Nothing is written past what is reported.
        assert_eq!(mem[usize::try_from(BUF + used).unwrap()], 0xaa, "{len}");
    }
    // A length past the end of memory is fine while the entries fit (wasmtime-wasi too).
    w.fd_readdir(&mut mem, 3, BUF, u32::MAX, 0, OUT).unwrap();
    assert_eq!(u32_at(&mem, OUT), all);
    // Cookies: 2 starts after `..`, past the end gives nothing.
    w.fd_readdir(&mut mem, 3, BUF, 300, 2, OUT).unwrap();
    assert_eq!(u32_at(&mem, OUT), 24 + 4 + 24 + 3);
    for cookie in [4, 5, 1 << 40, u64::MAX] {
        w.fd_readdir(&mut mem, 3, BUF, 300, cookie, OUT).unwrap();
        assert_eq!(u32_at(&mem, OUT), 0, "{cookie}");
    }
    // Entries that would land past the end of memory, or past 4 GiB: EFAULT.
    assert_eq!(
        w.fd_readdir(&mut mem, 3, 4096 - 30, 300, 0, OUT),
        Err(Errno::Fault)
    );
    assert_eq!(
        w.fd_readdir(&mut mem, 3, u32::MAX - 5, u32::MAX, 0, OUT),
        Err(Errno::Fault)
    );
    // Not a directory: EBADF.
    assert_eq!(
        w.fd_readdir(&mut mem, 1, BUF, 300, 0, OUT),
        Err(Errno::BadF)
    );
}

#[test]
fn a_big_directory_reads_one_entry_at_a_time() {
    let mut w = ctx();
    w.fs = bulwark_memfs::Fs::new(bulwark_memfs::Limits {
        max_bytes: 1 << 20,
        max_inodes: 20_000,
    });
    let root = w.fs.add_root(0).unwrap();
    w.fs.open(root).unwrap();
    w.fds
        .get_mut(3)
        .map(|d| {
            *d = Desc::Dir {
                ino: root,
                preopen: Some("/".into()),
                read: true,
            }
        })
        .unwrap();
    for i in 0..10_000 {
        w.fs.create_file(root, &alloc::format!("file-{i:05}"), 0)
            .unwrap();
    }
    let mut mem = vec![0u8; 4096];
    let mut cookie = 0;
    let mut seen = 0;
    loop {
        // Room for one header and its name only.
        w.fd_readdir(&mut mem, 3, BUF, 24 + 10, cookie, OUT)
            .unwrap();
        if u32_at(&mem, OUT) == 0 {
            break;
        }
        let next = u64_at(&mem, BUF);
        assert_eq!(next, cookie + 1);
        cookie = next;
        seen += 1;
    }
    assert_eq!(seen, 10_002);
}

#[test]
fn the_descriptor_table_is_capped_and_a_full_table_creates_nothing() {
    let mut w = ctx();
    let mut mem = vec![0u8; 8192];
    let mut fds = Vec::new();
    let err = loop {
        match open(&mut w, &mut mem, "file", 0, 0, rights::FD_READ, 0) {
            Ok(fd) => fds.push(fd),
            Err(e) => break e,
        }
    };
    assert_eq!(err, Errno::MFile);
    assert_eq!(fds.len(), MAX_FDS - 4);
    assert_eq!(
        open(
            &mut w,
            &mut mem,
            "new",
            0,
            oflags::CREAT,
            rights::FD_WRITE,
            0
        ),
        Err(Errno::MFile)
    );
    assert_eq!(stat(&mut w, &mut mem, "new", 0), Err(Errno::NoEnt));
    // Renumbering moves, never adds; closing frees a slot.
    let last = fds[fds.len() - 1];
    assert_eq!(w.fd_renumber(last, fds[0]), Ok(()));
    assert_eq!(w.fd_renumber(last, fds[1]), Err(Errno::BadF));
    open(
        &mut w,
        &mut mem,
        "new",
        0,
        oflags::CREAT,
        rights::FD_WRITE,
        0,
    )
    .unwrap();
    // A file renumbered over the preopen: fd 3 is that file now, and no path goes through it.
    assert_eq!(w.fd_renumber(fds[1], 3), Ok(()));
    assert_eq!(
        open(&mut w, &mut mem, "file", 0, 0, rights::FD_READ, 0),
        Err(Errno::NotDir)
    );
    assert_eq!(w.fd_prestat_get(&mut mem, 3, OUT), Err(Errno::BadF));
    for fd in (0..2000).rev() {
        let _ = w.fd_close(fd);
    }
    let dirs = w.take_dirs().unwrap();
    assert_eq!(dirs.len(), 1);
    assert!(dirs[0].iter().any(|e| e.path == "new"));
}

#[test]
fn a_descriptor_of_a_removed_directory_sees_nothing_and_makes_nothing() {
    let mut w = ctx();
    let mut mem = vec![0u8; 8192];
    let len = put(&mut mem, PATH, b"gone");
    w.path_create_directory(&mut mem, 3, PATH, len).unwrap();
    let fd = open(
        &mut w,
        &mut mem,
        "gone",
        0,
        oflags::DIRECTORY,
        rights::FD_READ,
        0,
    )
    .unwrap();
    w.path_remove_directory(&mut mem, 3, PATH, len).unwrap();
    let x = put(&mut mem, PATH, b"x");
    let t = put(&mut mem, BUF, b"t");
    assert_eq!(
        w.path_open(
            &mut mem,
            fd,
            0,
            PATH,
            x,
            u32::from(oflags::CREAT),
            rights::FD_WRITE,
            0,
            0,
            OUT
        ),
        Err(Errno::NoEnt)
    );
    assert_eq!(
        w.path_create_directory(&mut mem, fd, PATH, x),
        Err(Errno::NoEnt)
    );
    assert_eq!(
        w.path_symlink(&mut mem, BUF, t, fd, PATH, x),
        Err(Errno::NoEnt)
    );
    let f = put(&mut mem, BUF, b"file");
    assert_eq!(
        w.path_link(&mut mem, 3, 0, BUF, f, fd, PATH, x),
        Err(Errno::NoEnt)
    );
    assert_eq!(
        w.path_rename(&mut mem, 3, BUF, f, fd, PATH, x),
        Err(Errno::NoEnt)
    );
    assert_eq!(readdir(&mut w, &mut mem, fd), [".", ".."]);
    let up = put(&mut mem, PATH, b"../file");
    assert_eq!(
        w.path_open(&mut mem, fd, 0, PATH, up, 0, rights::FD_READ, 0, 0, OUT),
        Err(Errno::Perm)
    );
    let inodes = w.fs().inode_count();
    w.fd_close(fd).unwrap();
    assert_eq!(w.fs().inode_count(), inodes - 1);
    let dirs = w.take_dirs().unwrap();
    let paths: Vec<&str> = dirs[0].iter().map(|e| e.path.as_str()).collect();
    assert_eq!(paths, ["file", "dir"]);
}

#[test]
fn poll_oneoff_counts_are_checked_before_anything_is_kept() {
    let mut w = ctx();
    let mut mem = vec![0u8; 8192];
    assert_eq!(w.poll_oneoff(&mut mem, 0, 4096, 0, OUT), Err(Errno::Inval));
    assert_eq!(
        w.poll_oneoff(&mut mem, 0, 4096, u32::MAX, OUT),
        Err(Errno::NoMem)
    );
    assert_eq!(
        w.poll_oneoff(&mut mem, 0, 4096, 1 << 20, OUT),
        Err(Errno::Fault)
    );
    assert_eq!(
        w.poll_oneoff(&mut mem, 0, 4096, 171, OUT),
        Err(Errno::Fault)
    );
    // 170 zeroed subscriptions: clocks (realtime, relative 0) all due at once.
    assert_eq!(w.poll_oneoff(&mut mem, 0, 0, 170, OUT), Ok(()));
    assert_eq!(u32_at(&mem, OUT), 170);
}

#[test]
fn output_take_hands_over_only_new_bytes_and_the_cap_counts_taken_ones() {
    let mut out = Output::new(10);
    out.push(b"abc");
    assert_eq!((out.kept(), out.pending()), (3, 3));
    assert_eq!(out.take(), b"abc");
    assert_eq!((out.kept(), out.pending()), (3, 0));
    // Nothing new: an empty take.
    assert!(out.take().is_empty());
    assert_eq!(out.kept(), 3);
    out.push(b"defg");
    assert_eq!(out.bytes, b"defg");
    assert_eq!(out.take(), b"defg");
    assert!(!out.truncated);
    // 7 taken: only 3 more fit, whatever was taken.
    out.push(b"hijkl");
    assert!(out.truncated);
    assert_eq!(out.take(), b"hij");
    assert_eq!((out.kept(), out.pending()), (10, 0));
    out.push(b"m");
    assert!(out.take().is_empty());
    assert_eq!(out.kept(), 10);
}

#[test]
fn output_exactly_at_the_cap_is_not_truncated() {
    let mut out = Output::new(4);
    out.push(b"ab");
    assert_eq!(out.take(), b"ab");
    out.push(b"cd");
    assert!(!out.truncated);
    out.push(b"");
    assert!(!out.truncated, "an empty write past the cap drops nothing");
    assert_eq!(out.take(), b"cd");
    out.push(b"e");
    assert!(out.truncated);
    // A zero cap keeps nothing.
    let mut none = Output::new(0);
    none.push(b"x");
    assert!(none.truncated);
    assert_eq!(none.kept(), 0);
}

#[test]
fn fd_write_to_stdout_after_a_take_keeps_to_the_cap_of_the_whole_call() {
    let mut w = ctx();
    let mut mem = vec![0u8; 1 << 17];
    let chunk = vec![b'x'; 40_000];
    assert_eq!(write(&mut w, &mut mem, 1, &chunk), Ok(40_000));
    assert_eq!(write(&mut w, &mut mem, 2, b"err"), Ok(3));
    assert_eq!(w.stdout.take().len(), 40_000);
    assert_eq!(w.stderr.take(), b"err");
    // The cap is 64 KiB: 40,000 taken, so 25,536 more are kept; the count is still all.
    assert_eq!(write(&mut w, &mut mem, 1, &chunk), Ok(40_000));
    assert!(w.stdout.truncated);
    assert!(!w.stderr.truncated);
    assert_eq!(w.stdout.take().len(), (1 << 16) - 40_000);
    assert_eq!(w.stdout.kept(), 1 << 16);
    assert_eq!(w.stderr.kept(), 3);
}
